"""Handover latency with each node in its own process, as deployed: ``take()`` here, the peer in a child.

:func:`natpool.bench.handover.handover_times` runs both pools on one event
loop, so every CPU microsecond of *both* nodes lies on a take's path: the
responder's bookkeeping after it answered, the initiator's after it sent,
each side's keepalives. That is the figure the issue's bar is judged on,
against a raw exchange in the same loop. Deployed, the peer is another
process on another host: its work after answering overlaps ours, and every
hop pays a cross-process wake-up instead. These functions measure that
shape on one machine — the peer pool (or the raw echo server) in a child
process with its own loop, so on a 2-core machine each side has a core —
next to the raw 2-round-trip exchange across the same process boundary.

The child is started with ``spawn`` (never ``fork``: a forked running event
loop is not safe), told what to do over a :mod:`multiprocessing` pipe, and
always reaped: :func:`run_peer` exits when the pipe closes.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import TcpSignalling, TcpSignallingServer, small_reads
from natpool.bench.handover import timed_exchanges
from natpool.bench.raw import echo_server, open_udp
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair

#: Bound on each step of the child's setup (spawn, imports, sockets, adds), so a broken child fails the run.
SETUP_TIMEOUT = 60.0


def _config(ping_interval: float) -> PairConfig:
    return PairConfig(ping_interval=ping_interval, no_inbound_timeout=30.0, ping_lifespan=1.0)


def _pair(i: int, port_a: int, port_b: int) -> EndpointPair:
    return EndpointPair(Endpoint("a", "127.0.0.1", port_a), Endpoint("b", "127.0.0.1", port_b), i + 1)


def run_peer(conn: Connection, mode: str, count: int, ping_interval: float) -> None:
    """The child's entry point: serve ``mode`` ("handover" or "echo") until the pipe says stop or closes."""
    asyncio.run(_peer(conn, mode, count, ping_interval))


async def _until_stopped(conn: Connection) -> None:
    """Until the parent says stop or goes away; the loop watches the pipe (no thread, no blocking read)."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_pipe() -> None:
        try:
            conn.recv()  # "stop"
        except EOFError:
            pass  # the parent is gone: stop as well
        if not stop.done():
            stop.set_result(None)

    loop.add_reader(conn.fileno(), on_pipe)
    try:
        await stop
    finally:
        loop.remove_reader(conn.fileno())


async def _peer(conn: Connection, mode: str, count: int, ping_interval: float) -> None:
    if mode == "echo":
        echo = await echo_server(34)
        conn.send(echo.sockets[0].getsockname()[1])
        try:
            await _until_stopped(conn)
        finally:
            echo.close()
            await echo.wait_closed()
        return
    pool = AsyncPairPool("b", _config(ping_interval))
    server = await TcpSignallingServer(pool.serve_handover, host="127.0.0.1", identity="b").start()
    socks = [open_udp() for _ in range(count)]
    conn.send((server.address, [s.getsockname()[1] for s in socks]))
    theirs: list[int] = conn.recv()  # the parent's ports (blocking: this pool has no entry yet)
    for i, sock in enumerate(socks):
        await pool.add(_pair(i, theirs[i], sock.getsockname()[1]), is_pinger=i % 2 == 1, sock=sock)

    async def release_leases() -> None:
        while True:
            pool.release(await pool.accept())

    releaser = asyncio.ensure_future(release_leases())
    conn.send("added")
    try:
        await _until_stopped(conn)
    finally:
        releaser.cancel()
        await asyncio.gather(releaser, return_exceptions=True)
        await server.close()
        await pool.close()


class _Peer:
    """The child process and its pipe; a context manager that always stops and reaps it."""

    def __init__(self, mode: str, count: int = 0, ping_interval: float = 0.05) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_peer, args=(child, mode, count, ping_interval), daemon=True)
        self.proc.start()
        child.close()

    def recv(self) -> Any:
        if not self.conn.poll(SETUP_TIMEOUT):
            raise RuntimeError("two-process bench: the peer process did not answer in time")
        return self.conn.recv()

    def __enter__(self) -> _Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(SETUP_TIMEOUT)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


async def handover_times_two_process(count: int, ping_interval: float = 0.05) -> list[float]:
    """``count`` sequential takes from this process to a peer pool in a child process, in seconds each.

    Persistent reference signalling, unkeyed (loopback, as
    :func:`~natpool.bench.handover.handover_times`); the pinger role
    alternates, this side is always the initiator and the child releases
    each lease it hands out. Keepalives run on every pair in both processes
    during the takes, at ``ping_interval``, as in the one-loop figure.
    """
    total = count + 1  # one unmeasured take first: it opens the persistent connection (as in the one-loop figure)
    with _Peer("handover", total, ping_interval) as peer:
        address, their_ports = peer.recv()
        pool = AsyncPairPool("a", _config(ping_interval))
        socks = [open_udp() for _ in range(total)]
        peer.conn.send([s.getsockname()[1] for s in socks])
        if peer.recv() != "added":
            raise RuntimeError("two-process bench: the peer failed to add its pairs")
        for i, sock in enumerate(socks):
            await pool.add(_pair(i, sock.getsockname()[1], their_ports[i]), is_pinger=i % 2 == 0, sock=sock)
        pool.signalling = signalling = TcpSignalling("a", {"b": tuple(address)}, persistent=True)
        times: list[float] = []
        try:
            pool.release(await pool.take(total))  # the warm-up take (the peer releases its side)
            gc.collect()  # as there: the setup's young objects must not be walked inside some take
            await asyncio.sleep(3 * ping_interval)  # keepalives running (and caught up), as in the one-loop figure
            for i in range(count):
                t0 = time.perf_counter()
                lease = await pool.take(i + 1)
                times.append(time.perf_counter() - t0)
                pool.release(lease)
                await asyncio.sleep(0)  # its socket closes in the next step: not inside the next take (as there)
        finally:
            await signalling.close()
            await pool.close()
    return times


async def open_exchange_times_two_process(count: int) -> list[float]:
    """The raw floor across the same boundary: 2 round trips of 30-byte messages to an echo server in a child."""
    with _Peer("echo") as peer:
        port = peer.recv()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        small_reads(writer.transport)
        try:
            return await timed_exchanges(reader, writer, count)
        finally:
            writer.close()
            await writer.wait_closed()
