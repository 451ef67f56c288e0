"""Handover latency: ``take()`` end to end on loopback, two pools in one process, reference TCP signalling.

Each sample is one full take: claim, (per-take mode: a fresh TCP connection;
persistent mode: a session opened on the peer's one connection), LOCK/LOCKED,
drain, TAKE/TAKEN, hand-over of the socket — what an application waits for.
:func:`open_exchange_times` is its floor: the same two round trips of
30-byte messages between two asyncio streams on an already open connection.
Both pools share this process's loop, so both nodes' CPU is on every take's
path; :mod:`natpool.bench.two_process` measures the deployed shape (the
peer in a process of its own) next to the raw exchange across that boundary.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import struct
import time
from collections.abc import Callable

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import TcpSignalling, TcpSignallingServer, small_reads
from natpool.bench.raw import echo_server, open_udp
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair
from natpool.signalling import MemoryChannel, MemorySignalling


def pair_key(i: int) -> bytes:
    """A distinct 32-byte key per pair, as the traversal layer would derive one per punched pair."""
    return hashlib.blake2b(i.to_bytes(8, "big"), person=b"natpool-bench").digest()[:32]


#: Unmeasured takes before the measured ones, one each way: they open the persistent connections.
WARMUP_TAKES = 2

#: The signalling secret of the keyed runs (one for the network: both nodes hold it).
BENCH_SECRET = hashlib.blake2b(b"natpool bench signalling", digest_size=32).digest()


#: Takes between two samples of :func:`handover_times`' ``gauge``.
GAUGE_EVERY = 50


async def handover_times(count: int, ping_interval: float = 0.05, transport: str = "tcp",
                         keyed: bool = False, gauge: Callable[[], None] | None = None) -> list[float]:
    """``count`` sequential takes (alternating initiator side and pinger role), in seconds each.

    ``transport``: ``"tcp"`` the persistent reference signalling (one connection per peer, sessions
    multiplexed), ``"tcp-per-take"`` a fresh connection per take, ``"memory"`` in-process channels,
    which isolates the protocol's own cost (sessions, machines, drain) from the transport.

    ``keyed``: the authenticated setup of issue 10 — every pair with its own key (MAC'd keepalives,
    signed and fresh signals) and, over TCP, the challenge–response hello (``secrets=``; the servers
    name themselves with ``identity=``), so each channel carries the verified peer the responder
    checks. Unkeyed runs use the unauthenticated hello, which the reference signalling allows only
    on loopback, where this bench stays (servers on 127.0.0.1, dialled there): that is its test mode.

    ``gauge``: called every :data:`GAUGE_EVERY` takes, outside the clock (the bench's machine probe:
    the machine's speed *while* the takes ran, not only before and after). It blocks the loop for a few
    ms, so the keepalive catches up for ``2 * ping_interval`` before the next take starts.
    """
    cfg = PairConfig(ping_interval=ping_interval, no_inbound_timeout=30.0, ping_lifespan=1.0)
    a, b = AsyncPairPool("a", cfg), AsyncPairPool("b", cfg)
    secrets = BENCH_SECRET if keyed and transport != "memory" else None
    sa = await TcpSignallingServer(a.serve_handover, host="127.0.0.1", identity="a", secrets=secrets).start()
    sb = await TcpSignallingServer(b.serve_handover, host="127.0.0.1", identity="b", secrets=secrets).start()
    if transport == "memory":
        tasks: set[asyncio.Task[object]] = set()

        def spawn(pool: AsyncPairPool) -> Callable[[str, MemoryChannel], None]:
            def on_incoming(_peer: str, channel: MemoryChannel) -> None:
                task = asyncio.ensure_future(pool.serve_handover(channel))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            return on_incoming

        a.signalling = MemorySignalling(spawn(b))
        b.signalling = MemorySignalling(spawn(a))
    else:
        persistent = transport == "tcp"
        a.signalling = TcpSignalling("a", {"b": sb.address}, persistent=persistent, secrets=secrets)
        b.signalling = TcpSignalling("b", {"a": sa.address}, persistent=persistent, secrets=secrets)
    times: list[float] = []
    try:
        for i in range(count + WARMUP_TAKES):
            s1, s2 = open_udp(), open_udp()
            pair = EndpointPair(Endpoint("a", "127.0.0.1", s1.getsockname()[1]),
                                Endpoint("b", "127.0.0.1", s2.getsockname()[1]), i + 1)
            key = pair_key(i + 1) if keyed else None
            await a.add(pair, is_pinger=i % 2 == 0, sock=s1, key=key)
            await b.add(pair, is_pinger=i % 2 == 1, sock=s2, key=key)
        # Let every pair run keepalives for a while, so takes meet outstanding pings like in real use.
        # They keep running during the takes on purpose: the figure is a take on a live pool, whose
        # signals share the loop with the keepalive. The full run (400 pairs x 20 pings/s, both ends in this
        # loop) handles ~16k datagrams/s (~11 during each take), the inbound load of a node with
        # ~16k pairs at the default 1 s interval; all pairs start together, so pings come in bursts.
        # One take each way first, unmeasured: a persistent connection (and its hello) opens on a peer's first
        # take and then carries every later one; the raw baseline's connection is open too. Before this, the
        # two connection set-ups (~1-2 ms each) were two of the four slowest takes of 400: the p99 itself.
        for n, (taker, giver) in enumerate(((a, b), (b, a))[:WARMUP_TAKES]):
            lease = await taker.take(count + n + 1)
            theirs = await giver.accept()
            taker.release(lease)
            giver.release(theirs)
        # The setup's objects (sockets, entries, transports) are still young: the first collections of
        # generation 1 would walk all of them (~1.7 ms each, measured) inside some take. Collect once now so
        # the takes meet the collector as a long-running node does, with those objects in the old generation;
        # before the warm-up, so that the pings this stall delays are caught up before the first take.
        gc.collect()
        await asyncio.sleep(3 * ping_interval)
        for i in range(count):
            taker, giver = (a, b) if (i // 2) % 2 == 0 else (b, a)
            t0 = time.perf_counter()
            lease = await taker.take(i + 1)
            times.append(time.perf_counter() - t0)
            theirs = await giver.accept()
            taker.release(lease)
            giver.release(theirs)
            # One loop step between takes, outside the clock, as a take on a live loop gets: the released
            # sockets close in it (asyncio defers connection_lost), and the keepalive datagrams and timers that
            # came due during this take are served in it. Without it every take also absorbed the previous
            # one's keepalive backlog (twice the interference a take at a random moment meets) and its
            # clean-up: measured, ~25 µs of the p50 with no keepalive running, ~80 µs at the 50 ms ping.
            await asyncio.sleep(0)
            if gauge is not None and i % GAUGE_EVERY == GAUGE_EVERY - 1:
                gauge()
                await asyncio.sleep(2 * ping_interval)
        if secrets is not None and (sa.stats.authenticated < 1 or sb.stats.authenticated < 1 or sa.drops or sb.drops):
            # The keyed figure must be of keyed takes over authenticated channels, never a silent fallback.
            raise RuntimeError(f"keyed handover bench: hellos not authenticated ({sa.stats}, {sb.stats})")
    finally:
        for sig in (a.signalling, b.signalling):
            if isinstance(sig, TcpSignalling):
                await sig.close()
        await sa.close()
        await sb.close()
        await a.close()
        await b.close()
    return times


async def open_exchange_times(count: int) -> list[float]:
    """The raw floor of a persistent-signalling handover: 2 request/response round trips on an open connection.

    Length-prefixed 30-byte messages between two asyncio streams in this loop, the shape of
    LOCK/LOCKED + TAKE/TAKEN, with no natpool code on the path.
    """
    server = await echo_server(len(_EXCHANGE_MSG))
    host, port = server.sockets[0].getsockname()[:2]
    reader, writer = await asyncio.open_connection(host, port)
    small_reads(writer.transport)
    try:
        return await timed_exchanges(reader, writer, count)
    finally:
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


#: One raw exchange message: a length prefix and 30 bytes, the size of a LOCK/LOCKED/TAKE/TAKEN signal.
_EXCHANGE_MSG = struct.pack("!I", 30) + bytes(30)


async def timed_exchanges(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int) -> list[float]:
    """``count`` times two request/response round trips of :data:`_EXCHANGE_MSG` to an echo peer, in seconds each."""
    msg, out = _EXCHANGE_MSG, []
    for _ in range(count):
        t0 = time.perf_counter()
        for _ in range(2):
            writer.write(msg)
            await reader.readexactly(len(msg))
        out.append(time.perf_counter() - t0)
    return out
