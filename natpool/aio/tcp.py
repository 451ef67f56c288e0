"""Reference signalling over asyncio TCP streams.

By default (``TcpSignalling(persistent=True)``) a client keeps ONE connection
per peer, opened on first use and reused by every later take, and runs all
its handover sessions on it through :class:`natpool.mux.Mux` (session id and
OPEN / DATA / CLOSE in each message). A fresh TCP connect costs ≈ 220 µs on
loopback — five times a whole 2-round-trip exchange on an open connection —
so a connection per take cannot get a handover under ≈ 0.8 ms. Losing the
connection fails every session on it (each sees ``channel_closed``, as the
spec requires); the next ``open`` connects again. One reader per connection
dispatches each message straight into its session's inbox.

``persistent=False`` keeps the original mode: one TCP connection per
handover session, so a broken connection maps one-to-one onto
``channel_closed``. The server speaks both; the hello says which.

Framing: a 4-byte big-endian length, then that many bytes of signal (or, on
a persistent connection, of mux frame). The very first frame a client sends
is a hello naming its identity (:data:`HELLO_PREFIX` for a per-take
connection, :data:`MUX_HELLO_PREFIX` for a persistent one), so the server
knows which peer is on the line. A frame larger than ``max_frame`` cannot be
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
import logging
import struct
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from natpool.errors import ChannelBroken, DropReason, LocalError
from natpool.mux import DEFAULT_MAX_SESSIONS, Mux, MuxChannel
from natpool.wire import mux as mux_wire

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
HELLO_PREFIX = b"natpool-signal/1 "
MUX_HELLO_PREFIX = b"natpool-mux/1 "
DEFAULT_MAX_FRAME = 4096
READ_CHUNK = 65536
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DROP_SUMMARY_INTERVAL = 60.0  # seconds between two INFO summaries of dropped remote input


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
    before it were delivered.
    """

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
        self.peer = peer
        self.drop_log = drop_log if drop_log is not None else DropLog()
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.drops: Counter[DropReason] = drops if drops is not None else Counter()
        self._reader = reader
        self._writer = writer
        self._closed = False
        self._buf = bytearray()  # bytes read but not yet a whole frame
        self._frames: deque[bytes] = deque()  # whole frames not yet returned
        self._bad: str | None = None  # a bad length was read after the queued frames

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        """Write one frame; ChannelBroken if the connection is closed or the frame too large."""
        if self._closed:
            raise ChannelBroken("signalling channel is closed")
        if len(data) > self.max_frame:
            raise LocalError(f"signal of {len(data)} bytes exceeds max_frame {self.max_frame}")
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
        anyway; ChannelBroken if the connection is gone.
        """
        if self._closed or self._writer.transport.is_closing():
            raise ChannelBroken("signalling channel is closed")
        if len(data) > self.max_frame:
            raise LocalError(f"signal of {len(data)} bytes exceeds max_frame {self.max_frame}")
        try:
            self._writer.write(_LEN.pack(len(data)) + data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._abort()
            raise ChannelBroken(f"send failed: {exc}") from exc

    async def recv(self) -> bytes:
        """Read one frame; raise ChannelBroken once the connection has ended for any reason."""
        if self._frames:
            return self._frames.popleft()
        if self._closed:
            raise ChannelBroken("signalling channel is closed")
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

    def _split(self, chunk: bytes) -> None:
        buf = self._buf
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
            self._closed = True
            self._writer.close()

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
    ) -> None:
        if not local_identity:
            raise LocalError("local_identity must be non-empty")
        hello = max(len(HELLO_PREFIX), len(MUX_HELLO_PREFIX)) + len(local_identity.encode())
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
            return await self._connect(peer, HELLO_PREFIX, self.read_timeout)
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
        channel = await self._connect(peer, MUX_HELLO_PREFIX, None)  # an idle persistent connection is normal
        mux = Mux(channel, peer=peer, max_sessions=self.max_sessions, max_payload=self.max_frame - mux_wire.HEAD_SIZE,
                  read_timeout=self.read_timeout, drop_note=self.drop_log.note)
        old = self.links.get(peer)
        self.links[peer] = mux.start()
        if old is not None:
            await old.close()
        return mux

    async def _connect(self, peer: str, prefix: bytes, read_timeout: float | None) -> TcpChannel:
        host, port = self.peers[peer]
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (TimeoutError, OSError) as exc:
            raise ChannelBroken(f"cannot reach {peer!r} at {host}:{port}: {exc!r}") from exc
        self.connects += 1  # (asyncio sets TCP_NODELAY on its TCP sockets itself)
        channel = TcpChannel(reader, writer, peer=peer, max_frame=self.max_frame,
                             read_timeout=read_timeout, drops=self.drops, drop_log=self.drop_log)
        await channel.send(prefix + self.local_identity.encode())
        return channel

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

    peer: str | None

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


Handler = Callable[[IncomingChannel], Awaitable[object]]


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
    ) -> None:
        if max_frame <= mux_wire.HEAD_SIZE:
            raise LocalError(f"max_frame {max_frame} leaves no room for a mux frame")
        self.handler = handler
        self.host = host
        self.port = port
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.max_sessions = max_sessions
        self.drops: Counter[DropReason] = Counter()
        self.sessions_served = 0
        self.handler_errors = 0
        self.drop_log = DropLog()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: set[TcpChannel] = set()
        self.links: set[Mux] = set()  # the live persistent connections

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; valid after :meth:`start`."""
        if self._server is None or not self._server.sockets:
            raise LocalError("server is not started")
        name = self._server.sockets[0].getsockname()
        return (str(name[0]), int(name[1]))

    async def start(self) -> TcpSignallingServer:
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        return self

    async def __aenter__(self) -> TcpSignallingServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        channel = TcpChannel(reader, writer, max_frame=self.max_frame, read_timeout=self.read_timeout,
                             drops=self.drops, drop_log=self.drop_log)
        self._channels.add(channel)
        try:
            try:
                await self._serve(channel)
            finally:
                await channel.close()
        except asyncio.CancelledError:
            # This task belongs to asyncio's server and nobody awaits it but close(): end it normally, or
            # asyncio's done-callback calls task.exception() on it and logs that at ERROR.
            if task is not None:
                task.uncancel()
        finally:
            self._channels.discard(channel)
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, channel: TcpChannel) -> None:
        try:
            hello = await channel.recv()
        except ChannelBroken:
            return
        prefix = MUX_HELLO_PREFIX if hello.startswith(MUX_HELLO_PREFIX) else HELLO_PREFIX
        if not hello.startswith(prefix) or len(hello) == len(prefix):
            self.drops[DropReason.MALFORMED] += 1
            self.drop_log.note(DropReason.MALFORMED.value, "signalling connection without a valid hello dropped")
            return
        try:
            channel.peer = hello[len(prefix):].decode()
        except UnicodeDecodeError:
            self.drops[DropReason.MALFORMED] += 1
            self.drop_log.note(DropReason.MALFORMED.value, "signalling hello with an undecodable identity dropped")
            return
        if prefix is HELLO_PREFIX:
            await self._handle(channel)
            return
        # Persistent: this task is the connection's one reader; each session runs in its own task.
        channel.read_timeout = None  # an idle persistent connection is normal; each session's recv times out
        mux = Mux(channel, peer=channel.peer, on_session=self._handle, max_sessions=self.max_sessions,
                  max_payload=self.max_frame - mux_wire.HEAD_SIZE, read_timeout=self.read_timeout,
                  drop_note=self.drop_log.note)
        self.links.add(mux)
        try:
            await mux.run()
            await mux.wait_sessions()  # they see ChannelBroken and end on their own
        finally:
            self.links.discard(mux)
            await mux.close()

    async def _handle(self, channel: IncomingChannel) -> None:
        try:
            await self.handler(channel)
            self.sessions_served += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            # A handler bug must not kill the server; it is logged loudly, not swallowed silently.
            self.handler_errors += 1
            log.exception("signalling handler failed for peer %s", channel.peer)

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
