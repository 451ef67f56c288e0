"""Reference signalling over asyncio TCP streams.

One TCP connection carries one handover session (spec/handover.md: "one
session per take"), so a broken connection maps one-to-one onto
``channel_closed`` and no multiplexing state can leak between sessions.

Framing: a 4-byte big-endian length, then that many bytes of signal. The very
first frame a client sends is a hello naming its identity, so the server knows
which peer is on the line. A frame larger than ``max_frame`` cannot be skipped
safely (we would have to read it), so it ends the connection and is counted as
``DropReason.OVERSIZED``; a read that does not complete within
``read_timeout`` ends it too. Nothing here raises remote input out of the
library: every bad frame is dropped, counted and logged at DEBUG; a peer
sending garbage must not flood the application's log, so beyond that only
one INFO summary per :data:`DROP_SUMMARY_INTERVAL` says how much was dropped.

Users can replace this module with their own transport: anything that
implements :class:`natpool.signalling.Signalling` works with
:class:`natpool.aio.pool.AsyncPairPool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from natpool.errors import ChannelBroken, DropReason, LocalError

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
HELLO_PREFIX = b"natpool-signal/1 "
DEFAULT_MAX_FRAME = 4096
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

    async def recv(self) -> bytes:
        """Read one frame; raise ChannelBroken once the connection has ended for any reason."""
        if self._closed:
            raise ChannelBroken("signalling channel is closed")
        try:
            # asyncio.timeout (not wait_for): no extra task per read, which is most of a read's cost here.
            async with asyncio.timeout(self.read_timeout):
                header = await self._reader.readexactly(_LEN.size)
            (length,) = _LEN.unpack(header)
            if length == 0 or length > self.max_frame:
                reason = DropReason.OVERSIZED if length else DropReason.MALFORMED
                self.drops[reason] += 1
                self.drop_log.note(reason.value, "signalling frame of %d bytes from %s dropped (%s); closing",
                                   length, self.peer, reason.value)
                self._abort()
                raise ChannelBroken(f"bad frame length {length}")
            async with asyncio.timeout(self.read_timeout):
                return await self._reader.readexactly(length)
        except TimeoutError as exc:
            self.drop_log.note("read_timeout", "signalling read from %s timed out; closing", self.peer)
            self._abort()
            raise ChannelBroken("read timeout") from exc
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._abort()
            raise ChannelBroken(f"connection ended: {exc!r}") from exc

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
    """Client side: opens one TCP connection per session to a peer, looked up by identity.

    ``peers`` maps a peer identity to the ``(host, port)`` of its
    :class:`TcpSignallingServer`; it may be mutated as peers come and go.
    """

    def __init__(
        self,
        local_identity: str,
        peers: Mapping[str, tuple[str, int]] | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if not local_identity:
            raise LocalError("local_identity must be non-empty")
        hello = len(HELLO_PREFIX) + len(local_identity.encode())
        if hello > max_frame:
            # Checked here, not in open(): a refused hello would leave the new connection open.
            raise LocalError(f"hello for {local_identity!r} is {hello} bytes, more than max_frame {max_frame}")
        self.local_identity = local_identity
        self.peers: dict[str, tuple[str, int]] = dict(peers or {})
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.drops: Counter[DropReason] = Counter()
        self.drop_log = DropLog()

    async def open(self, peer: str) -> TcpChannel:
        """Connect to ``peer``'s server and introduce ourselves; ChannelBroken if unreachable."""
        try:
            host, port = self.peers[peer]
        except KeyError:
            raise LocalError(f"no signalling address known for peer {peer!r}") from None
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (TimeoutError, OSError) as exc:
            raise ChannelBroken(f"cannot reach {peer!r} at {host}:{port}: {exc!r}") from exc
        channel = TcpChannel(reader, writer, peer=peer, max_frame=self.max_frame,
                             read_timeout=self.read_timeout, drops=self.drops, drop_log=self.drop_log)
        await channel.send(HELLO_PREFIX + self.local_identity.encode())
        return channel


Handler = Callable[[TcpChannel], Awaitable[object]]


class TcpSignallingServer:
    """Server side: accepts connections and hands each one, after its hello, to ``handler``.

    The handler typically is ``AsyncPairPool.serve_handover``. Connections
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
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.drops: Counter[DropReason] = Counter()
        self.sessions_served = 0
        self.handler_errors = 0
        self.drop_log = DropLog()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: set[TcpChannel] = set()

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
        if not hello.startswith(HELLO_PREFIX) or len(hello) == len(HELLO_PREFIX):
            self.drops[DropReason.MALFORMED] += 1
            self.drop_log.note(DropReason.MALFORMED.value, "signalling connection without a valid hello dropped")
            return
        try:
            channel.peer = hello[len(HELLO_PREFIX):].decode()
        except UnicodeDecodeError:
            self.drops[DropReason.MALFORMED] += 1
            self.drop_log.note(DropReason.MALFORMED.value, "signalling hello with an undecodable identity dropped")
            return
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
        for channel in list(self._channels):
            await channel.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
