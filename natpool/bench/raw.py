"""Raw baselines: what the same work costs with no protocol logic at all.

These are the physical references the bench divides natpool's numbers by:
a bare asyncio ping/pong keepalive with one heap scheduler, a bare UDP
round trip, a bare TCP signalling exchange, and a bare socket's memory.
They use the same receive-buffer fix as the driver (``max_size``: the UDP
endpoints' and, through :func:`natpool.aio.tcp.small_reads`, the TCP connections'), so the
ratio measures natpool's logic, not asyncio's default buffer.
"""

from __future__ import annotations

import asyncio
import heapq
import socket
import struct
import time
from typing import Any, cast

from natpool.aio.pool import RECV_BUFFER, TIMER_SLACK
from natpool.aio.tcp import small_reads

_FRAME = struct.Struct("!QB")


def open_udp(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((host, 0))
    return sock


def _fix_buffer(transport: asyncio.BaseTransport) -> None:
    if hasattr(transport, "max_size"):
        transport.max_size = RECV_BUFFER  # private asyncio attribute; see natpool.aio.pool


class _RawProto(asyncio.DatagramProtocol):
    """Answers pings with pongs; counts pongs. No state, no validation beyond the flag byte."""

    def __init__(self, owner: RawKeepalive | None = None) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11: not a DatagramTransport subclass
        _fix_buffer(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) == 9 and data[8] == 0:
            assert self.transport is not None
            self.transport.sendto(data[:8] + b"\x01", addr)
        elif self.owner is not None:
            self.owner.pongs += 1


class RawKeepalive:
    """N pinger/ponger socket pairs in one process, pinged every ``interval`` by ONE heap scheduler."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.pongs = 0
        self.pings = 0
        self.wakeups = 0  # timer callbacks: reported next to natpool's, whose pings share grid points
        self.transports: list[asyncio.DatagramTransport] = []
        self._heap: list[tuple[float, int]] = []
        self._targets: list[tuple[asyncio.DatagramTransport, bytes, tuple[str, int]]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    async def add_pair(self) -> None:
        a, b = open_udp(), open_udp()
        ta, _ = await self._loop.create_datagram_endpoint(lambda: _RawProto(self), sock=a)
        tb, _ = await self._loop.create_datagram_endpoint(lambda: _RawProto(None), sock=b)
        self.transports += [ta, tb]
        idx = len(self._targets)
        self._targets.append((ta, _FRAME.pack(idx + 1, 0), b.getsockname()))
        heapq.heappush(self._heap, (self._loop.time() + self.interval, idx))
        self._rearm()

    def _rearm(self) -> None:
        if self._handle is None and self._heap:
            self._handle = self._loop.call_at(self._heap[0][0], self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.wakeups += 1
        now = self._loop.time()
        horizon = now + TIMER_SLACK
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            due, idx = heapq.heappop(heap)
            transport, frame, addr = self._targets[idx]
            transport.sendto(frame, addr)
            self.pings += 1
            heapq.heappush(heap, (max(due, now) + self.interval, idx))
        self._rearm()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        for t in self.transports:
            t.close()


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11: not a DatagramTransport subclass
        _fix_buffer(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _Waiter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.fut: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _fix_buffer(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)


async def udp_rtts(count: int) -> list[float]:
    """``count`` sequential 9-byte UDP round trips on loopback, same loop, in seconds."""
    loop = asyncio.get_running_loop()
    te, _ = await loop.create_datagram_endpoint(_Echo, sock=open_udp())
    waiter = _Waiter()
    tw, _ = await loop.create_datagram_endpoint(lambda: waiter, sock=open_udp())
    addr = te.get_extra_info("sockname")
    out: list[float] = []
    try:
        for i in range(count):
            waiter.fut = loop.create_future()
            t0 = time.perf_counter()
            tw.sendto(_FRAME.pack(i + 1, 0), addr)
            await asyncio.wait_for(waiter.fut, 5.0)
            out.append(time.perf_counter() - t0)
    finally:
        te.close()
        tw.close()
    return out


async def echo_server(size: int) -> asyncio.Server:
    """A loopback TCP server echoing every ``size``-byte message back: the far end of the raw baselines."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        small_reads(writer.transport)
        try:
            while True:
                writer.write(await reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def tcp_exchange_times(count: int) -> list[float]:
    """Fresh TCP connection + two request/response round trips of 30-byte messages (a handover's shape)."""

    server = await echo_server(34)
    host, port = server.sockets[0].getsockname()[:2]
    out: list[float] = []
    msg = bytes(34)
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection(host, port)
            small_reads(writer.transport)
            for _ in range(2):
                writer.write(msg)
                await reader.readexactly(34)
            out.append(time.perf_counter() - t0)
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return out
