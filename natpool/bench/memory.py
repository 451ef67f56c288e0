"""Memory per endpoint, measured in a fresh subprocess so earlier allocations do not blur RSS.

``python -m natpool.bench.memory KIND N METRIC`` prints one JSON object:
bytes per endpoint for ``N`` pairs (``2N`` endpoints, both ends in one
process). KIND: ``socket`` (bare bound socket), ``asyncio`` (socket +
asyncio transport + trivial protocol), ``natpool`` (an AsyncPairPool entry:
socket + transport + protocol + PairEntry + indexes). METRIC: ``rss`` (from
/proc, user space only: the kernel's ~2.7 KB slab per UDP socket is not in
it) or ``heap`` (tracemalloc, Python objects only).
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import socket
import sys
import tracemalloc
from typing import Any

from natpool.aio.pool import AsyncPairPool
from natpool.bench.raw import open_udp
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair

QUIET = PairConfig(ping_interval=3600.0, no_inbound_timeout=7200.0)  # no traffic while measuring


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


async def _build(kind: str, n: int) -> list[Any]:
    keep: list[Any] = []
    loop = asyncio.get_running_loop()
    if kind == "socket":
        for _ in range(2 * n):
            keep.append(open_udp())
    elif kind == "asyncio":
        for _ in range(2 * n):
            t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=open_udp())
            keep.append(t)
    elif kind == "natpool":
        a, b = AsyncPairPool("a", QUIET), AsyncPairPool("b", QUIET)
        keep += [a, b]
        for i in range(n):
            sa, sb = open_udp(), open_udp()
            pair = EndpointPair(Endpoint("a", "127.0.0.1", sa.getsockname()[1]),
                                Endpoint("b", "127.0.0.1", sb.getsockname()[1]), i + 1)
            await a.add(pair, True, sock=sa)
            await b.add(pair, False, sock=sb)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    return keep


async def measure(kind: str, n: int, metric: str) -> float:
    # Warm up the loop and imports so one-off costs are not charged per endpoint.
    warm = await _build(kind, 8)
    _close(warm)
    gc.collect()
    if metric == "heap":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = rss_bytes()
    keep = await _build(kind, n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if metric == "heap" else rss_bytes()
    _close(keep)
    return (after - before) / (2 * n)


def _close(keep: list[Any]) -> None:
    for obj in keep:
        if isinstance(obj, socket.socket):
            obj.close()
        elif isinstance(obj, asyncio.BaseTransport):
            obj.close()
        elif isinstance(obj, AsyncPairPool):
            asyncio.get_running_loop().create_task(obj.close())


async def _main(kind: str, n: int, metric: str) -> float:
    value = await measure(kind, n, metric)
    await asyncio.sleep(0)
    return value


if __name__ == "__main__":
    k, count, m = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps({"kind": k, "n": count, "metric": m, "bytes_per_endpoint": asyncio.run(_main(k, count, m))}))
