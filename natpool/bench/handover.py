"""Handover latency: ``take()`` end to end on loopback, two pools in one process, reference TCP signalling.

Each sample is one full take: claim, fresh TCP connection, LOCK/LOCKED,
drain, TAKE/TAKEN, hand-over of the socket — what an application waits for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import TcpSignalling, TcpSignallingServer
from natpool.bench.raw import open_udp
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair
from natpool.signalling import MemoryChannel, MemorySignalling


async def handover_times(count: int, ping_interval: float = 0.05, transport: str = "tcp") -> list[float]:
    """``count`` sequential takes (alternating initiator side and pinger role), in seconds each.

    ``transport="memory"`` swaps the TCP signalling for in-process channels, which isolates the
    protocol's own cost (sessions, generated machines, drain) from connection set-up.
    """
    cfg = PairConfig(ping_interval=ping_interval, no_inbound_timeout=30.0, ping_lifespan=1.0)
    a, b = AsyncPairPool("a", cfg), AsyncPairPool("b", cfg)
    sa = await TcpSignallingServer(a.serve_handover).start()
    sb = await TcpSignallingServer(b.serve_handover).start()
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
        a.signalling = TcpSignalling("a", {"b": sb.address})
        b.signalling = TcpSignalling("b", {"a": sa.address})
    times: list[float] = []
    try:
        for i in range(count):
            s1, s2 = open_udp(), open_udp()
            pair = EndpointPair(Endpoint("a", "127.0.0.1", s1.getsockname()[1]),
                                Endpoint("b", "127.0.0.1", s2.getsockname()[1]), i + 1)
            await a.add(pair, is_pinger=i % 2 == 0, sock=s1)
            await b.add(pair, is_pinger=i % 2 == 1, sock=s2)
        # Let every pair run keepalives for a while, so takes meet outstanding pings like in real use.
        await asyncio.sleep(3 * ping_interval)
        for i in range(count):
            taker, giver = (a, b) if (i // 2) % 2 == 0 else (b, a)
            t0 = time.perf_counter()
            lease = await taker.take(i + 1)
            times.append(time.perf_counter() - t0)
            theirs = await giver.accept()
            taker.release(lease)
            giver.release(theirs)
    finally:
        await sa.close()
        await sb.close()
        await a.close()
        await b.close()
    return times
