"""Reference signalling over asyncio TCP streams.

By default (``TcpSignalling(persistent=True)``) a client keeps ONE connection
per peer, opened on first use and reused by every later take, and runs all
its handover sessions on it through :class:`natpool.mux.Mux` (session id and
OPEN / DATA / CLOSE in each message). A fresh TCP connect costs ≈ 220 µs on
loopback — five times a whole 2-round-trip exchange on an open connection —
so a connection per take cannot get a handover under ≈ 0.8 ms. Losing the
connection fails every session on it (each sees ``channel_closed``, as the
spec requires); the next ``open`` connects again. A persistent connection
is read in push mode (:meth:`TcpChannel.listen`): the transport's read
callback splits the bytes into frames and the mux dispatches each one
straight to its session, with no StreamReader, no reader task and no loop
iteration in between; a reply made there leaves in the same callback
(a session's OPEN carries its first message, see :class:`natpool.mux.Mux`).
That took a take on loopback from ~10 event-loop iterations to ~6.

``persistent=False`` keeps the original mode: one TCP connection per
handover session, so a broken connection maps one-to-one onto
``channel_closed``. The server speaks both; the hello says which.

Framing: a 4-byte big-endian length, then that many bytes of signal (or, on
a persistent connection, of mux frame). The very first frame a client sends
is a hello naming its identity (:data:`HELLO_PREFIX` for a per-take
connection, :data:`MUX_HELLO_PREFIX` for a persistent one), so the server
knows which peer is on the line. With ``secrets`` that hello is the mutual
challenge–response of :mod:`natpool.wire.hello` (``AUTH_HELLO_PREFIX``), and
with ``ssl`` it runs inside TLS; only then do channels carry a
``peer_identity``. Without either, the hello is a bare claim anyone can make:
that mode serves and dials loopback only, FOR TESTS (see
:class:`TcpSignallingServer`). A frame larger than ``max_frame`` cannot be
skipped safely (we would have to read it), so it ends the connection and is
counted as ``DropReason.OVERSIZED``; a read that does not complete within
``read_timeout`` ends a per-take connection too (on a persistent one the
timeout applies to each session's ``recv``: an idle connection is normal).
Nothing here raises remote input out of the library: every bad frame is
dropped, counted and logged at DEBUG; a peer sending garbage must not flood
the application's log, so beyond that only one INFO summary per
:data:`DROP_SUMMARY_INTERVAL` says how much was dropped.

Users can replace this module with their own transport: anything that
implements :class:`natpool.signalling.Signalling` works with
:class:`natpool.aio.pool.AsyncPairPool` (and a control connection they
already have works through :class:`natpool.mux.Mux`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import ssl as _ssl
import struct
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from natpool.errors import ChannelBroken, DropReason, LocalError, RemoteProtocolError
from natpool.mux import DEFAULT_MAX_SESSIONS, Mux, MuxChannel
from natpool.wire import hello as auth
from natpool.wire import mux as mux_wire

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
HELLO_PREFIX = b"natpool-signal/1 "
MUX_HELLO_PREFIX = b"natpool-mux/1 "
DEFAULT_MAX_FRAME = 4096
READ_CHUNK = 65536
#: What the connection's transport reads per ``recv`` (its private ``max_size``; asyncio's default is 256 KiB).
#: A signalling read is a few ~40-byte frames, and anything longer than this arrives in further reads (the
#: frame splitter joins them). 64 KiB stays below glibc's default mmap threshold (128 KiB). A 256 KiB buffer
#: is an mmap + mremap + munmap per read whenever the process's malloc history has not raised that threshold
#: (measured with it held at 128 KiB: take p50 769-883 us with 256 KiB reads, 456-647 us with these, 3
#: alternating runs); a process that once freed a large block reads from its heap either way.
SIGNAL_RECV_BUFFER = 65_536
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DROP_SUMMARY_INTERVAL = 60.0  # seconds between two INFO summaries of dropped remote input
DEFAULT_HELLO_TIMEOUT = 5.0  # the whole hello (and its challenge-response) must be done within this
DEFAULT_MAX_CONNECTIONS = 1024  # per server, in any state
DEFAULT_MAX_PENDING_PER_HOST = 16  # connections from one address that have not finished their hello
DEFAULT_MAX_CONNECTIONS_PER_PEER = 64  # per authenticated (or, without secrets, claimed) identity
DEFAULT_MAX_SESSIONS_PER_PEER = 256  # concurrent handover sessions per identity, over all its connections
MAX_QUEUED_FRAMES = 64  # frames read but not yet taken by a pull-mode recv before reading pauses

#: Pre-shared signalling secrets: one ``bytes`` for the whole network, or one per peer identity.
Secrets = bytes | Mapping[str, bytes]

_warned_unauthenticated = False


def _check_secrets(secrets: Secrets | None) -> Secrets | None:
    if secrets is None or isinstance(secrets, bytes | bytearray):
        return None if secrets is None else auth.check_secret(secrets)
    return {str(k): auth.check_secret(v) for k, v in secrets.items()}


def _secret_for(secrets: Secrets, identity: str) -> bytes | None:
    return secrets if isinstance(secrets, bytes) else secrets.get(identity)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cert_identities(cert: Mapping[str, Any] | None) -> frozenset[str]:
    """The identities a verified peer certificate names: its DNS and URI subjectAltNames and subject commonName.

    ``cert`` is what ``getpeercert()`` returns (empty unless the certificate
    was verified against the context's CAs). Matching is exact: no wildcards.
    """
    if not cert:
        return frozenset()
    names = {str(v) for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "URI")}
    for rdn in cert.get("subject", ()):
        names.update(str(v) for k, v in rdn if k == "commonName")
    return frozenset(names)


def _verifies_peers(context: _ssl.SSLContext | None) -> bool:
    """True for a TLS context that only completes a handshake with a certificate its CAs vouch for."""
    return context is not None and context.verify_mode == _ssl.CERT_REQUIRED


def _warn_unauthenticated(what: str) -> None:
    """One WARNING per process: unauthenticated signalling beyond loopback lets anyone claim any identity."""
    global _warned_unauthenticated
    if not _warned_unauthenticated:
        _warned_unauthenticated = True
        log.warning("%s runs WITHOUT authentication (allow_unauthenticated=True, no secrets): anyone who can reach "
                    "it can claim any identity; use this for tests only", what)


class DropLog:
    """Logs remote bad input: every event at DEBUG, and at most one INFO summary per ``interval``.

    The first drop is summarised at once (so one bad peer is visible at INFO),
    later ones are collected until ``interval`` has passed since the last
    summary and then reported with the next drop. ``clock`` is injectable so a
    test can step time instead of sleeping.
    """

    def __init__(self, interval: float = DROP_SUMMARY_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.pending: Counter[str] = Counter()
        self.summaries = 0
        self._last: float | None = None

    def note(self, kind: str, msg: str, *args: object) -> None:
        log.debug(msg, *args)
        self.pending[kind] += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            return
        since = "" if self._last is None else f" in the last {now - self._last:.0f} s"
        log.info("signalling: dropped %d bad input(s) from peers%s (%s); details at DEBUG",
                 sum(self.pending.values()), since, ", ".join(f"{k}: {n}" for k, n in sorted(self.pending.items())))
        self.pending.clear()
        self.summaries += 1
        self._last = now



def small_reads(transport: asyncio.BaseTransport | None) -> None:
    """Make ``transport`` read at most :data:`SIGNAL_RECV_BUFFER` per ``recv``.

    ``max_size`` is a private attribute of asyncio's selector socket transport, so it is set only where it
    exists: a TLS transport reads into its own buffer, and uvloop has no such attribute. natpool.aio.pool does
    the same for UDP.
    """
    if transport is not None and hasattr(transport, "max_size"):
        transport.max_size = SIGNAL_RECV_BUFFER


class _FrameProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, except that received bytes go to this connection's :class:`TcpChannel`.

    The channel splits them into frames and either queues them for ``recv``
    or, in push mode (:meth:`TcpChannel.listen`), hands them to its listener
    right in this read callback. The StreamReader stays empty (it still sees
    EOF and errors); the StreamWriter keeps working as usual (write, drain,
    close, wait_closed). Bytes that arrive before the channel exists (a
    server's connection task has not run yet) are kept and fed to it on
    :meth:`attach`.
    """

    def __init__(self, reader: asyncio.StreamReader, client_connected_cb: Any = None) -> None:
        super().__init__(reader, client_connected_cb)
        self._channel: TcpChannel | None = None
        self._early = bytearray()
        self._lost: str | None = None

    def attach(self, channel: TcpChannel) -> None:
        self._channel = channel
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            channel._on_data(early)
        if self._lost is not None:
            channel._on_lost(self._lost)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        small_reads(transport)  # before the first read (a server's bytes can come before its channel exists)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        channel = self._channel
        if channel is not None:
            channel._on_data(data)
        else:
            self._early += data

    def eof_received(self) -> bool:
        self._end("EOF")
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("EOF" if exc is None else repr(exc))
        super().connection_lost(exc)

    def _end(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            if self._channel is not None:
                self._channel._on_lost(why)


async def _open_connection(host: str, port: int, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with :class:`_FrameProtocol`, so the channel can be read in push mode."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = _FrameProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, host, port, **kwargs)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class TcpChannel:
    """One framed, size-limited TCP connection: a signalling channel for one session.

    ``recv`` returns the next signal or raises :class:`ChannelBroken` when the
    connection ended (EOF, reset, timeout, oversized or malformed frame);
    ``send`` raises :class:`ChannelBroken` if the connection is gone.
    ``drops`` counts the reasons remote input was discarded.

    Reads take whatever the socket has (one ``read`` per segment, not two
    ``readexactly`` per frame) and split it into frames here: frames that
    arrived together are returned by the next ``recv`` calls without
    suspending, and a bad length is raised only after the good frames
    before it were delivered. A connection made by this module (its client
    or server) is read by :class:`_FrameProtocol` directly; it can then also
    :meth:`listen` (push mode). One from plain asyncio streams is read
    through its StreamReader, pull mode only.
    """

    @property
    def peercert(self) -> dict[str, Any] | None:
        """The peer's verified TLS certificate (``getpeercert()``), or None (no TLS, or no certificate)."""
        cert = self._writer.get_extra_info("peercert")
        return dict(cert) if cert else None

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        drops: Counter[DropReason] | None = None,
        drop_log: DropLog | None = None,
    ) -> None:
        self.peer = peer  # the identity the peer claimed (or we dialled), for logs
        self.peer_identity: str | None = None  # set once the hello verified it
        self.drop_log = drop_log if drop_log is not None else DropLog()
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.drops: Counter[DropReason] = drops if drops is not None else Counter()
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport  # the hot sends write to it directly (what StreamWriter.write does)
        small_reads(writer.transport)  # a plain asyncio stream's too (ours have it already)
        self._closed = False
        self._buf = bytearray()  # bytes read but not yet a whole frame
        self._frames: deque[bytes] = deque()  # whole frames not yet returned
        self._bad: str | None = None  # a bad length was read after the queued frames
        self._ended: str | None = None  # why the connection ended (EOF, reset), seen by the frame protocol
        self._waiter: asyncio.Future[None] | None = None  # a pull-mode recv waiting for data
        self._paused = False  # reading paused: MAX_QUEUED_FRAMES frames queued with nobody reading
        self._on_message: Callable[[bytes], None] | None = None  # push mode (listen)
        self._on_end: Callable[[str], None] | None = None
        self._cork: list[bytes] | None = None  # frames written while a push-mode read is dispatched
        self._on_batch_end: Callable[[], None] | None = None  # listen(): called before the cork is written
        proto = writer.transport.get_protocol() if writer.transport is not None else None
        self._proto = proto if isinstance(proto, _FrameProtocol) else None
        if self._proto is not None:
            self._proto.attach(self)

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        """Write one frame; ChannelBroken if the connection is closed or the frame too large."""
        if self._closed:
            raise ChannelBroken("signalling channel is closed")
        if len(data) > self.max_frame:
            raise LocalError(f"signal of {len(data)} bytes exceeds max_frame {self.max_frame}")
        self._uncork()  # (never corked here in practice: a coroutine does not run inside a read callback)
        try:
            self._writer.write(_LEN.pack(len(data)) + data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._abort()
            raise ChannelBroken(f"send failed: {exc}") from exc

    def send_nowait(self, data: bytes) -> None:
        """Write one frame now, without waiting for the buffer to drain (for tiny signals; see :class:`Mux`).

        A handover session has a handful of 30-byte signals in flight at most,
        and a mux caps its sessions, so skipping ``drain`` bounds the buffer
        anyway; ChannelBroken if the connection is gone. Frames sent while a
        push-mode read is being dispatched (replies made in the listener) are
        collected and leave in one write when that read's frames are done.
        """
        transport = self._transport
        if self._closed or transport.is_closing():
            raise ChannelBroken("signalling channel is closed")
        n = len(data)
        if n > self.max_frame:
            raise LocalError(f"signal of {n} bytes exceeds max_frame {self.max_frame}")
        if self._cork is not None:
            self._cork.append(_LEN.pack(n) + data)
            return
        try:
            transport.write(_LEN.pack(n) + data)  # StreamWriter.write forwards to it: one call less
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._abort()
            raise ChannelBroken(f"send failed: {exc}") from exc

    def _uncork(self) -> None:
        cork, self._cork = self._cork, None
        if cork:
            try:  # not contextlib.suppress: once per read with replies (three calls less)
                self._transport.write(b"".join(cork))
            except (ConnectionError, OSError, RuntimeError):
                pass  # the read callback reports the loss

    async def recv(self) -> bytes:
        """Read one frame; raise ChannelBroken once the connection has ended for any reason."""
        if self._frames:
            frame = self._frames.popleft()
            if self._paused and not self._frames:
                self._set_reading(True)
            return frame
        if self._closed:
            raise ChannelBroken("signalling channel is closed")
        if self._proto is None:
            return await self._recv_stream()
        if self._waiter is not None or self._on_message is not None:
            raise LocalError("one recv at a time, and none while a listener is set")
        while self._bad is None and self._ended is None and not self._closed:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                if self.read_timeout is None:
                    await waiter
                else:
                    async with asyncio.timeout(self.read_timeout):
                        await waiter
            except TimeoutError as exc:
                self.drop_log.note("read_timeout", "signalling read from %s timed out; closing", self.peer)
                self._abort()
                raise ChannelBroken("read timeout") from exc
            finally:
                self._waiter = None
            if self._frames:
                return await self.recv()
        self._abort()
        if self._bad is None and self._ended is None:
            raise ChannelBroken("signalling channel is closed")
        raise ChannelBroken(self._bad or f"connection ended: {self._ended}{' mid-frame' if self._buf else ''}")

    async def _recv_stream(self) -> bytes:
        """:meth:`recv` on plain asyncio streams (a channel not made by this module's connect or server)."""
        while self._bad is None:
            try:
                if self.read_timeout is None:
                    chunk = await self._reader.read(READ_CHUNK)
                else:
                    # asyncio.timeout (not wait_for): no extra task per read, which is most of a read's cost here.
                    async with asyncio.timeout(self.read_timeout):
                        chunk = await self._reader.read(READ_CHUNK)
            except TimeoutError as exc:
                self.drop_log.note("read_timeout", "signalling read from %s timed out; closing", self.peer)
                self._abort()
                raise ChannelBroken("read timeout") from exc
            except (ConnectionError, OSError) as exc:
                self._abort()
                raise ChannelBroken(f"connection ended: {exc!r}") from exc
            if not chunk:
                self._abort()
                raise ChannelBroken(f"connection ended: EOF{' mid-frame' if self._buf else ''}")
            self._split(chunk)
            if self._frames:
                return self._frames.popleft()
        self._abort()
        raise ChannelBroken(self._bad)

    @property
    def can_listen(self) -> bool:
        """True if :meth:`listen` works: the connection was made by this module (its frame protocol)."""
        return self._proto is not None

    @property
    def batching(self) -> bool:
        """True while a push-mode read's frames are being dispatched: what is sent meanwhile leaves in one write."""
        return self._cork is not None

    def listen(self, on_message: Callable[[bytes], None] | None, on_end: Callable[[str], None] | None = None,
               on_batch_end: Callable[[], None] | None = None) -> None:
        """Push mode: each frame goes to ``on_message`` from the transport's read callback; ``on_end`` once, at the end.

        ``on_batch_end``, if given, is called after the last frame of each
        read, while :attr:`batching` still holds: what it sends joins that
        read's one write (the mux uses it to hold a CLOSE the peer's own
        CLOSE in the same read makes unnecessary).

        This is how a persistent connection's :class:`~natpool.mux.Mux` reads:
        no reader task, no StreamReader, no loop iteration between a segment
        arriving and its signals reaching their sessions. Frames already
        queued are pushed at once; a bad length or the end of the connection
        closes it and calls ``on_end`` with the reason. Callbacks must not
        raise (what they raise is logged and ends the connection).
        ``listen(None)`` goes back to :meth:`recv`. Needs :attr:`can_listen`.
        """
        if self._proto is None:
            raise LocalError("this channel reads through a StreamReader; listen needs a natpool TCP connection")
        self._on_message, self._on_end = on_message, on_end
        self._on_batch_end = on_batch_end if on_message is not None else None
        if on_message is None:
            return
        if self._paused:
            self._set_reading(True)
        self._push_frames()

    # --- called by the frame protocol (push and pull) ---------------------------------------------

    def _on_data(self, chunk: bytes) -> None:
        if self._closed or self._bad is not None:
            return
        self._split(chunk)
        on_message = self._on_message
        if on_message is not None:
            self._cork = []
            frames = self._frames
            try:
                # _push_frames, inlined for the common read (whole frames, the connection fine).
                try:
                    while frames and self._on_message is on_message:
                        on_message(frames.popleft())
                except Exception:
                    self._listener_failed()
                if self._bad is not None or self._ended is not None:
                    self._end_push()
            finally:
                batch_end = self._on_batch_end
                if batch_end is not None:
                    try:
                        batch_end()
                    except Exception:
                        log.exception("signalling batch listener failed for %s", self.peer)
                cork, self._cork = self._cork, None  # _uncork, inlined: the listener's replies leave in one write
                if cork:
                    try:
                        self._transport.write(b"".join(cork))
                    except (ConnectionError, OSError, RuntimeError):
                        pass  # the read callback reports the loss
            return
        if len(self._frames) >= MAX_QUEUED_FRAMES and not self._paused:
            # Nobody reads (a hello still in progress): let TCP push back instead of queueing for ever.
            self._set_reading(False)
        if self._bad is not None or self._frames:
            self._wake()

    def _on_lost(self, why: str) -> None:
        if self._ended is None:
            self._ended = why
        if self._on_message is not None:
            self._push_frames()
        else:
            self._wake()

    def _push_frames(self) -> None:
        on_message = self._on_message
        frames = self._frames
        try:
            while frames and on_message is not None and self._on_message is on_message:
                on_message(frames.popleft())
        except Exception:
            self._listener_failed()
        self._end_push()

    def _listener_failed(self) -> None:
        log.exception("signalling listener failed for %s; closing the connection", self.peer)
        self._bad = self._bad or "listener failed"

    def _end_push(self) -> None:
        """Push mode, after the frames: a bad length or the connection's end ends the listener (once)."""
        if (self._bad is not None or self._ended is not None) and self._on_message is not None:
            why = self._bad or f"connection ended: {self._ended}"
            on_end, self._on_message, self._on_end = self._on_end, None, None
            self._abort()
            if on_end is not None:
                try:
                    on_end(why)
                except Exception:
                    log.exception("signalling end listener failed for %s", self.peer)

    def _set_reading(self, on: bool) -> None:
        self._paused = not on
        transport = self._writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _split(self, chunk: bytes) -> None:
        buf = self._buf
        if not buf and type(chunk) is bytes:
            # The usual read: nothing left over, and the chunk is exactly one frame. Sliced straight from the
            # chunk (no copy into the buffer and out again); anything else takes the general path below.
            n = len(chunk)
            if n > _LEN.size:
                (length,) = _LEN.unpack_from(chunk)
                if n == _LEN.size + length and length <= self.max_frame:
                    self._frames.append(chunk[_LEN.size:])
                    return
        buf += chunk
        start, end = 0, len(buf)
        while end - start >= _LEN.size:
            (length,) = _LEN.unpack_from(buf, start)
            if length == 0 or length > self.max_frame:
                reason = DropReason.OVERSIZED if length else DropReason.MALFORMED
                self.drops[reason] += 1
                self.drop_log.note(reason.value, "signalling frame of %d bytes from %s dropped (%s); closing",
                                   length, self.peer, reason.value)
                self._bad = f"bad frame length {length}"
                start = end
                break
            stop = start + _LEN.size + length
            if stop > end:
                break
            self._frames.append(bytes(buf[start + _LEN.size:stop]))
            start = stop
        del buf[:start]

    def _abort(self) -> None:
        if not self._closed:
            self._uncork()  # replies already made still go out, before the close
            self._closed = True
            self._writer.close()
            self._wake()

    async def close(self) -> None:
        """Close the connection; idempotent and never raises."""
        self._abort()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class TcpSignalling:
    """Client side: reaches a peer's :class:`TcpSignallingServer` by identity.

    ``persistent=True`` (the default): one TCP connection per peer, opened on
    the first ``open`` and shared by every session to that peer (concurrent
    first opens share one connect); after the connection is lost, the next
    ``open`` connects again. ``persistent=False``: one TCP connection per
    session, as before. ``peers`` maps a peer identity to the ``(host, port)``
    of its server; it may be mutated as peers come and go. :meth:`close`
    ends the persistent connections (and so every session on them).

    ``secrets`` (one ``bytes`` for the network, or a mapping from peer
    identity to ``bytes``, each at least 16 bytes) turns on the mutual
    challenge–response hello (:mod:`natpool.wire.hello`): ``open`` then
    returns only a channel to a server that proved it holds the secret and
    named itself as the peer dialled, with ``peer_identity`` set; a server
    that fails is counted (``drops``) and ``open`` raises ChannelBroken.
    Without ``secrets`` the hello is the old unauthenticated one, channels
    carry ``peer_identity=None``, and only loopback peers may be dialled
    (``allow_unauthenticated=True`` lifts that, for test rigs, with one
    WARNING): FOR TESTS ONLY.

    ``ssl`` runs every connection over TLS with that client context; the
    server's certificate is then checked to name the peer identity dialled
    (``server_hostname`` is the identity, and :func:`cert_identities` must
    contain it), and a context that verifies certificates
    (``CERT_REQUIRED``) authenticates the peer by itself: channels carry
    ``peer_identity`` with or without ``secrets``. With both, both must pass.
    """

    def __init__(
        self,
        local_identity: str,
        peers: Mapping[str, tuple[str, int]] | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        persistent: bool = True,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        secrets: Secrets | None = None,
        allow_unauthenticated: bool = False,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        if not local_identity:
            raise LocalError("local_identity must be non-empty")
        self.secrets = _check_secrets(secrets)
        self.allow_unauthenticated = allow_unauthenticated
        self.ssl = ssl
        if self.secrets is None and not _verifies_peers(ssl) and allow_unauthenticated:
            _warn_unauthenticated(f"TcpSignalling({local_identity!r})")
        hello = (max(len(HELLO_PREFIX), len(MUX_HELLO_PREFIX)) if self.secrets is None
                 else len(auth.AUTH_HELLO_PREFIX) + 1 + auth.NONCE_SIZE) + len(local_identity.encode())
        if hello > max_frame:
            # Checked here, not in open(): a refused hello would leave the new connection open.
            raise LocalError(f"hello for {local_identity!r} is {hello} bytes, more than max_frame {max_frame}")
        if max_frame <= mux_wire.HEAD_SIZE:
            raise LocalError(f"max_frame {max_frame} leaves no room for a mux frame")
        self.local_identity = local_identity
        self.peers: dict[str, tuple[str, int]] = dict(peers or {})
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.persistent = persistent
        self.max_sessions = max_sessions
        self.drops: Counter[DropReason] = Counter()
        self.drop_log = DropLog()
        self.connects = 0  # TCP connections opened (persistent mode: one per peer, plus one per reconnect)
        self.links: dict[str, Mux] = {}  # persistent mode: the live (or last) link to each peer
        self._dialing: dict[str, asyncio.Task[Mux]] = {}

    async def open(self, peer: str) -> TcpChannel | MuxChannel:
        """A channel for one session to ``peer``; ChannelBroken if unreachable, LocalError if unknown.

        Persistent mode: a virtual channel on the peer's connection (connected
        now if there is none or it was lost); OPEN has been sent when this returns.
        """
        if peer not in self.peers:
            raise LocalError(f"no signalling address known for peer {peer!r}")
        if not self.persistent:
            return await self._connect(peer, False, self.read_timeout)
        mux = self.links.get(peer)
        if mux is None or not mux.alive:
            mux = await self._link(peer)
        return await mux.open(peer)

    async def _link(self, peer: str) -> Mux:
        task = self._dialing.get(peer)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._dial(peer))
            self._dialing[peer] = task
            task.add_done_callback(functools.partial(self._dialed, peer))
        # shield: one caller's cancellation must not cancel the connect the others wait for.
        return await asyncio.shield(task)

    def _dialed(self, peer: str, task: asyncio.Task[Mux]) -> None:
        if self._dialing.get(peer) is task:
            del self._dialing[peer]
        if not task.cancelled():
            task.exception()  # retrieved: a connect nobody awaits any more is not logged at ERROR

    async def _dial(self, peer: str) -> Mux:
        channel = await self._connect(peer, True, None)  # an idle persistent connection is normal
        mux = Mux(channel, peer=peer, max_sessions=self.max_sessions, max_payload=self.max_frame - mux_wire.HEAD_SIZE,
                  read_timeout=self.read_timeout, drop_note=self.drop_log.note)
        old = self.links.get(peer)
        self.links[peer] = mux.start()
        if old is not None:
            await old.close()
        return mux

    async def _connect(self, peer: str, mux: bool, read_timeout: float | None) -> TcpChannel:
        host, port = self.peers[peer]
        secret: bytes | None = None
        if self.secrets is not None:
            secret = _secret_for(self.secrets, peer)
            if secret is None:
                raise LocalError(f"no signalling secret for peer {peer!r}")
        elif not self.allow_unauthenticated and not _verifies_peers(self.ssl) and not _is_loopback(host):
            raise LocalError(f"refusing unauthenticated signalling to {peer!r} at {host}: pass secrets= "
                             "or a verifying ssl= context (or allow_unauthenticated=True, for tests only)")
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.ssl is None:
                    reader, writer = await _open_connection(host, port)
                else:
                    reader, writer = await _open_connection(host, port, ssl=self.ssl, server_hostname=peer)
        except (TimeoutError, OSError) as exc:  # (ssl.SSLError is an OSError: a certificate that fails too)
            raise ChannelBroken(f"cannot reach {peer!r} at {host}:{port}: {exc!r}") from exc
        self.connects += 1  # (asyncio sets TCP_NODELAY on its TCP sockets itself)
        channel = TcpChannel(reader, writer, peer=peer, max_frame=self.max_frame,
                             read_timeout=read_timeout, drops=self.drops, drop_log=self.drop_log)
        cert = channel.peercert
        if cert is not None and peer not in cert_identities(cert):
            await channel.close()
            self.drops[DropReason.UNEXPECTED_PEER] += 1
            self.drop_log.note(DropReason.UNEXPECTED_PEER.value, "signalling to %s: its TLS certificate names %s",
                               peer, sorted(cert_identities(cert)))
            raise ChannelBroken(f"the TLS certificate at {peer!r}'s address does not name {peer!r}")
        if secret is None:
            await channel.send((MUX_HELLO_PREFIX if mux else HELLO_PREFIX) + self.local_identity.encode())
            if cert is not None:
                channel.peer_identity = peer
            return channel
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._authenticate(channel, peer, auth.MODE_MUX if mux else auth.MODE_SESSION, secret)
        except BaseException as exc:
            await channel.close()
            if isinstance(exc, TimeoutError):
                raise ChannelBroken(f"{peer!r} at {host}:{port} did not answer the hello in time") from exc
            raise
        return channel

    async def _authenticate(self, channel: TcpChannel, peer: str, mode: bytes, secret: bytes) -> None:
        """Client half of the challenge–response; ChannelBroken (counted) unless ``peer`` proved itself."""
        nonce = os.urandom(auth.NONCE_SIZE)
        me = self.local_identity
        await channel.send(auth.encode_hello(mode, nonce, me))
        try:
            challenge = auth.decode_challenge(await channel.recv())
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            self.drop_log.note(exc.reason.value, "signalling hello to %s: bad challenge (%s)", peer, exc)
            raise ChannelBroken(f"{peer!r} sent no valid hello challenge") from None
        if challenge.identity != peer:
            self.drops[DropReason.UNEXPECTED_PEER] += 1
            self.drop_log.note(DropReason.UNEXPECTED_PEER.value, "signalling hello to %s: the server says it is %r",
                               peer, challenge.identity)
            raise ChannelBroken(f"the signalling server at {peer!r}'s address says it is {challenge.identity!r}")
        expected = auth.transcript_mac(secret, auth.ROLE_SERVER, mode, me, peer, nonce, challenge.nonce)
        if not auth.mac_ok(expected, challenge.mac):
            self.drops[DropReason.BAD_MAC] += 1
            self.drop_log.note(DropReason.BAD_MAC.value, "signalling hello to %s: the server failed to "
                               "authenticate (bad MAC)", peer)
            raise ChannelBroken(f"{peer!r} failed to authenticate its hello")
        await channel.send(auth.encode_proof(
            auth.transcript_mac(secret, auth.ROLE_CLIENT, mode, me, peer, nonce, challenge.nonce)))
        channel.peer_identity = peer

    async def close(self) -> None:
        """Close every persistent connection; their sessions fail with ChannelBroken. Never raises."""
        for task in list(self._dialing.values()):
            task.cancel()
        links, self.links = list(self.links.values()), {}
        for mux in links:
            await mux.close()

    async def __aenter__(self) -> TcpSignalling:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class IncomingChannel(Protocol):
    """What a server handler gets: a :class:`TcpChannel` (per-take) or a :class:`MuxChannel` (persistent)."""

    peer: str | None  # the claimed identity (for logs)
    peer_identity: str | None  # the verified one: None without secrets

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


Handler = Callable[[IncomingChannel], Awaitable[object]]


@dataclass
class ServerStats:
    """What a :class:`TcpSignallingServer` refused and accepted, for monitoring (all counters since start).

    ``open_connections`` and ``pending`` are gauges (now); the rest only grow.
    The reasons of refused hellos are in the server's ``drops`` too.
    """

    connections: int = 0  # TCP connections accepted by the listener
    authenticated: int = 0  # hellos whose identity was verified (secrets)
    unauthenticated: int = 0  # unauthenticated hellos accepted (no secrets: tests only)
    hellos_refused: int = 0  # malformed, unverifiable identity, bad MAC, or not done within hello_timeout
    refused_busy: int = 0  # closed at once: max_connections live already
    refused_host: int = 0  # closed at once: max_pending_per_host hellos pending from that address
    refused_peer: int = 0  # closed after the hello: max_connections_per_peer live for that identity
    sessions_refused: int = 0  # max_sessions_per_peer sessions live for that identity
    open_connections: int = 0
    pending: int = 0


class TcpSignallingServer:
    """Server side: accepts connections and hands each session, after the hello, to ``handler``.

    A per-take connection is one session: its :class:`TcpChannel` goes to the
    handler. A persistent connection (mux hello) carries many: each session
    the client opens goes to the handler as a :class:`MuxChannel`, at most
    ``max_sessions`` at once per connection. The handler typically is
    ``AsyncPairPool.serve_handover``. Connections
    without a valid hello are dropped and counted. ``close`` stops listening
    and closes every live connection; no connection task ends cancelled (on
    Python 3.11.x/3.12 asyncio logs such a task at ERROR, "Exception in
    callback StreamReaderProtocol…", since nobody can retrieve it).

    Authentication: with ``secrets`` (one ``bytes`` for the network, or a
    mapping from peer identity to ``bytes``) and this node's ``identity``,
    every hello must complete the mutual challenge–response of
    :mod:`natpool.wire.hello`; a hello naming an identity with no secret, an
    unauthenticated hello, a wrong MAC or a replayed transcript is refused:
    the connection is closed, counted (``drops``: UNEXPECTED_PEER, BAD_MAC,
    MALFORMED; ``stats.hellos_refused``) and logged at DEBUG. The channels
    handed to ``handler`` then carry ``peer_identity``, the verified
    identity. A network-wide secret proves membership only: any holder can
    claim any identity; per-peer secrets bind the identity. Without
    ``secrets`` every hello is believed and ``peer_identity`` is None; the
    server then listens only on loopback unless ``allow_unauthenticated=True``
    (with one WARNING): FOR TESTS ONLY.

    ``ssl`` (a server context) runs every connection over TLS. If the
    context requires client certificates (``CERT_REQUIRED``) a hello is
    verified by the certificate too: its claimed identity must be one the
    certificate names (:func:`cert_identities`), else it is refused as
    UNEXPECTED_PEER; such a server authenticates without ``secrets``. With
    both, both must pass. The TLS handshake itself happens before the hello,
    bounded by ``hello_timeout`` too, but outside ``max_pending_per_host``.

    Limits, each refusal counted in :attr:`stats`, in ``drops`` as
    RATE_LIMITED and logged at DEBUG (the INFO summary of :class:`DropLog` at
    most once per interval): ``max_connections`` live connections in all;
    ``max_pending_per_host`` connections from one address still in their
    hello (which must end within ``hello_timeout``), so one address cannot
    starve the others' hellos; ``max_connections_per_peer`` connections per
    identity; ``max_sessions_per_peer`` concurrent sessions per identity over
    all its connections (a session beyond it is closed before the handler
    sees it: on a persistent connection its CLOSE, on a per-take one the
    connection). Without secrets the per-identity limits apply to the
    claimed identity, which anyone can claim.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame: int = DEFAULT_MAX_FRAME,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        identity: str | None = None,
        secrets: Secrets | None = None,
        allow_unauthenticated: bool = False,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending_per_host: int = DEFAULT_MAX_PENDING_PER_HOST,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        max_sessions_per_peer: int = DEFAULT_MAX_SESSIONS_PER_PEER,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        if max_frame <= mux_wire.HEAD_SIZE:
            raise LocalError(f"max_frame {max_frame} leaves no room for a mux frame")
        self.secrets = _check_secrets(secrets)
        self.ssl = ssl
        if self.secrets is not None and not identity:
            raise LocalError("an authenticating server needs its own identity= (the clients check it)")
        unauthenticated = self.secrets is None and not _verifies_peers(ssl)
        if unauthenticated and not allow_unauthenticated and not _is_loopback(host):
            raise LocalError(f"refusing to serve unauthenticated signalling on {host!r}: pass identity= and "
                             "secrets= or a client-verifying ssl= context (or allow_unauthenticated=True, for tests "
                             "only)")
        if min(max_connections, max_pending_per_host, max_connections_per_peer, max_sessions_per_peer) < 1:
            raise LocalError("connection and session limits must be at least 1")
        if unauthenticated and allow_unauthenticated:
            _warn_unauthenticated(f"TcpSignallingServer on {host!r}")
        self.handler = handler
        self.host = host
        self.port = port
        self.identity = identity
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.max_sessions = max_sessions
        self.hello_timeout = hello_timeout
        self.max_connections = max_connections
        self.max_pending_per_host = max_pending_per_host
        self.max_connections_per_peer = max_connections_per_peer
        self.max_sessions_per_peer = max_sessions_per_peer
        self.drops: Counter[DropReason] = Counter()
        self.stats = ServerStats()
        self.sessions_served = 0
        self.handler_errors = 0
        self.drop_log = DropLog()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: set[TcpChannel] = set()
        self._pending: Counter[str] = Counter()  # hellos in progress, per remote address
        self._peer_connections: Counter[str] = Counter()  # live connections per identity
        # live sessions per identity (a set, not a count: a session task cancelled before it ran leaves nothing behind)
        self._peer_sessions: dict[str, set[IncomingChannel]] = {}
        self.links: set[Mux] = set()  # the live persistent connections

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; valid after :meth:`start`."""
        if self._server is None or not self._server.sockets:
            raise LocalError("server is not started")
        name = self._server.sockets[0].getsockname()
        return (str(name[0]), int(name[1]))

    async def start(self) -> TcpSignallingServer:
        loop = asyncio.get_running_loop()

        def factory() -> _FrameProtocol:  # asyncio.start_server's, with the push-capable protocol
            return _FrameProtocol(asyncio.StreamReader(loop=loop), self._on_connect)

        if self.ssl is None:
            self._server = await loop.create_server(factory, self.host, self.port)
        else:
            self._server = await loop.create_server(factory, self.host, self.port, ssl=self.ssl,
                                                    ssl_handshake_timeout=self.hello_timeout)
        return self

    async def __aenter__(self) -> TcpSignallingServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _refuse(self, reason: DropReason, msg: str, *args: object) -> None:
        self.drops[reason] += 1
        self.drop_log.note(reason.value, msg, *args)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        stats = self.stats
        stats.connections += 1
        name = writer.get_extra_info("peername")
        host = str(name[0]) if name else "?"
        if len(self._channels) >= self.max_connections or self._pending[host] >= self.max_pending_per_host:
            # Refused before anything is read: costs one accept and one close.
            if len(self._channels) >= self.max_connections:
                stats.refused_busy += 1
                self._refuse(DropReason.RATE_LIMITED, "signalling connection from %s refused: %d connections "
                             "live (max_connections)", host, len(self._channels))
            else:
                stats.refused_host += 1
                self._refuse(DropReason.RATE_LIMITED, "signalling connection from %s refused: %d hellos pending "
                             "from that address (max_pending_per_host)", host, self._pending[host])
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            return
        if task is not None:
            self._tasks.add(task)
        channel = TcpChannel(reader, writer, max_frame=self.max_frame, read_timeout=self.read_timeout,
                             drops=self.drops, drop_log=self.drop_log)
        self._channels.add(channel)
        stats.open_connections = len(self._channels)
        try:
            try:
                await self._serve(channel, host)
            finally:
                await channel.close()
        except asyncio.CancelledError:
            # This task belongs to asyncio's server and nobody awaits it but close(): end it normally, or
            # asyncio's done-callback calls task.exception() on it and logs that at ERROR.
            if task is not None:
                task.uncancel()
        finally:
            self._channels.discard(channel)
            stats.open_connections = len(self._channels)
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, channel: TcpChannel, host: str) -> None:
        self._pending[host] += 1
        self.stats.pending += 1
        try:
            try:
                async with asyncio.timeout(self.hello_timeout):
                    hello = await self._hello(channel)
            except TimeoutError:
                hello = None
                self._refuse(DropReason.MALFORMED, "signalling hello from %s not done within %.1f s; closing",
                             host, self.hello_timeout)
        finally:
            self.stats.pending -= 1
            self._pending[host] -= 1
            if not self._pending[host]:
                del self._pending[host]
        if hello is None:
            self.stats.hellos_refused += 1
            return
        peer, persistent = hello
        if self._peer_connections[peer] >= self.max_connections_per_peer:
            self.stats.refused_peer += 1
            self._refuse(DropReason.RATE_LIMITED, "signalling connection from %s (%s) refused: %d live for that "
                         "peer (max_connections_per_peer)", peer, host, self._peer_connections[peer])
            return
        self._peer_connections[peer] += 1
        mine: set[IncomingChannel] = set()  # this connection's live sessions
        try:
            if not persistent:
                if self._claim_session(peer, channel, mine):
                    await self._handle_counted(channel, peer, mine)
                return
            # Persistent: this task is the connection's one reader; each session runs in its own task.
            channel.read_timeout = None  # an idle persistent connection is normal; each session's recv times out
            mux = Mux(channel, peer=peer, on_session=functools.partial(self._on_mux_session, peer, mine),
                      max_sessions=self.max_sessions, max_payload=self.max_frame - mux_wire.HEAD_SIZE,
                      read_timeout=self.read_timeout, drop_note=self.drop_log.note)
            self.links.add(mux)
            try:
                await mux.run()
                await mux.wait_sessions()  # they see ChannelBroken and end on their own
            finally:
                self.links.discard(mux)
                await mux.close()
        finally:
            self._peer_connections[peer] -= 1
            if not self._peer_connections[peer]:
                del self._peer_connections[peer]
            for session in mine:
                self._end_session(peer, session)

    async def _hello(self, channel: TcpChannel) -> tuple[str, bool] | None:
        """Read (and with secrets, verify) the hello; ``(identity, persistent)`` or None (refused, counted)."""
        try:
            hello = await channel.recv()
        except ChannelBroken:
            return None
        if hello.startswith(auth.AUTH_HELLO_PREFIX):
            return await self._challenge(channel, hello)
        prefix = MUX_HELLO_PREFIX if hello.startswith(MUX_HELLO_PREFIX) else HELLO_PREFIX
        if not hello.startswith(prefix) or len(hello) == len(prefix):
            self._refuse(DropReason.MALFORMED, "signalling connection without a valid hello dropped")
            return None
        try:
            peer = hello[len(prefix):].decode()
        except UnicodeDecodeError:
            self._refuse(DropReason.MALFORMED, "signalling hello with an undecodable identity dropped")
            return None
        if self.secrets is not None:
            self._refuse(DropReason.UNEXPECTED_PEER, "unauthenticated signalling hello from %r refused "
                         "(this server requires secrets)", peer)
            return None
        certified = self._certified(channel, peer)
        if certified is False:
            return None
        channel.peer = peer
        if certified:
            channel.peer_identity = peer
            self.stats.authenticated += 1
        else:
            self.stats.unauthenticated += 1
        return peer, prefix is MUX_HELLO_PREFIX

    def _certified(self, channel: TcpChannel, peer: str) -> bool | None:
        """None: no verified client certificate; True: it names ``peer``; False: it does not (refused, counted)."""
        cert = channel.peercert
        if cert is None:
            return None
        if peer in cert_identities(cert):
            return True
        self._refuse(DropReason.UNEXPECTED_PEER, "signalling hello from %r refused: its TLS certificate names %s",
                     peer, sorted(cert_identities(cert)))
        return False

    async def _challenge(self, channel: TcpChannel, data: bytes) -> tuple[str, bool] | None:
        """Server half of the challenge–response (see :mod:`natpool.wire.hello`)."""
        try:
            hello = auth.decode_hello(data)
        except RemoteProtocolError as exc:
            self._refuse(exc.reason, "signalling hello dropped: %s", exc)
            return None
        peer = hello.identity
        if self.secrets is None or self.identity is None:
            self._refuse(DropReason.UNEXPECTED_PEER, "authenticated signalling hello from %r refused: this "
                         "server has no secrets", peer)
            return None
        secret = _secret_for(self.secrets, peer)
        if secret is None:
            self._refuse(DropReason.UNEXPECTED_PEER, "signalling hello from %r refused: no secret for that "
                         "identity", peer)
            return None
        if self._certified(channel, peer) is False:
            return None
        me, nonce = self.identity, os.urandom(auth.NONCE_SIZE)
        mac = auth.transcript_mac(secret, auth.ROLE_SERVER, hello.mode, peer, me, hello.nonce, nonce)
        try:
            await channel.send(auth.encode_challenge(nonce, mac, me))
            proof = auth.decode_proof(await channel.recv())
        except ChannelBroken:
            return None
        except RemoteProtocolError as exc:
            self._refuse(exc.reason, "signalling hello from %r: bad proof frame (%s)", peer, exc)
            return None
        expected = auth.transcript_mac(secret, auth.ROLE_CLIENT, hello.mode, peer, me, hello.nonce, nonce)
        if not auth.mac_ok(expected, proof):
            self._refuse(DropReason.BAD_MAC, "signalling hello from %r refused: bad MAC (wrong secret or a "
                         "replayed hello)", peer)
            return None
        channel.peer = channel.peer_identity = peer
        self.stats.authenticated += 1
        return peer, hello.mode == auth.MODE_MUX

    def _claim_session(self, peer: str, channel: IncomingChannel, mine: set[IncomingChannel]) -> bool:
        """Count a new session against ``peer``'s cap (synchronously: a burst of OPENs is one loop step)."""
        live = self._peer_sessions.setdefault(peer, set())
        if len(live) >= self.max_sessions_per_peer:
            self.stats.sessions_refused += 1
            self._refuse(DropReason.RATE_LIMITED, "signalling session from %s refused: %d live for that peer "
                         "(max_sessions_per_peer)", peer, len(live))
            return False
        live.add(channel)
        mine.add(channel)
        return True

    def _end_session(self, peer: str, channel: IncomingChannel) -> None:
        live = self._peer_sessions.get(peer)
        if live is not None:
            live.discard(channel)
            if not live:
                del self._peer_sessions[peer]

    def _on_mux_session(self, peer: str, mine: set[IncomingChannel], channel: MuxChannel) -> Awaitable[None]:
        if not self._claim_session(peer, channel, mine):
            return channel.close()  # the mux runs it: CLOSE goes out, the handler never sees the session
        # The handler is called here, in the mux's OPEN callback, not at its task's first step: a handler
        # whose start is synchronous (AsyncPairPool.serve_handover: the responder's LOCKED) then answers
        # in this loop step, one iteration earlier per session.
        try:
            work = self.handler(channel)
        except Exception:
            self.handler_errors += 1
            log.exception("signalling handler failed for peer %s", channel.peer)
            mine.discard(channel)
            self._end_session(peer, channel)
            return channel.close()
        return self._handle_counted(channel, peer, mine, work)

    async def _handle_counted(self, channel: IncomingChannel, peer: str, mine: set[IncomingChannel],
                              work: Awaitable[object] | None = None) -> None:
        # One coroutine for the handler's run and the session's count (every session resumes through it).
        try:
            await (self.handler(channel) if work is None else work)
            self.sessions_served += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            # A handler bug must not kill the server; it is logged loudly, not swallowed silently.
            self.handler_errors += 1
            log.exception("signalling handler failed for peer %s", channel.peer)
        finally:
            mine.discard(channel)
            self._end_session(peer, channel)

    async def close(self) -> None:
        """Stop accepting, close every connection and wait for handlers to finish. Logs nothing at ERROR."""
        if self._server is not None:
            self._server.close()
        for mux in list(self.links):
            await mux.close()
        for channel in list(self._channels):
            await channel.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
