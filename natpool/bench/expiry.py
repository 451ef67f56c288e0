"""Expiry and removal cost: what ``natpool bench`` reports under ``ops.expiry``.

Why a loop-stall figure: ``CleanHandover`` rests on ``min_drain_grace``
(0.2 s) being longer than any delay a frame can suffer, and a callback that
blocks the event loop delays every frame the node handles. Many entries
expiring at once (a peer vanishing with thousands of pairs) must not block
the loop for anything close to that.

The stall is measured through :class:`AsyncPairPool`'s own timer callback:
``n`` ponger entries (real sockets) wait for their no-inbound deadline; one
callback blocks the loop until every deadline has passed, so the pool's next
timer wake-up finds all ``n`` due at once. A probe re-schedules itself with
``call_soon`` and stamps every loop iteration; the longest iteration after
the block is the stall. The same probe over a quiet loop gives the baseline.
The driver runs at most ``natpool.aio.pool.TIMER_BATCH`` due entries per
callback (the rest on the following iterations), so the stall is one batch's
core steps, event fan-out and socket closes, not all ``n`` of them.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from typing import Any

from natpool.aio.pool import AsyncPairPool
from natpool.bench.raw import open_udp
from natpool.config import PairConfig
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair

_TIMEOUT = 1.5  # no-inbound timeout of the measured entries: longer than adding them takes


def _pair(i: int) -> EndpointPair:
    return EndpointPair(Endpoint("a", "127.0.0.1", 1 + i % 60000), Endpoint("b", "127.0.0.1", 1 + i % 60000), i + 1)


class _Probe:
    """Stamps every loop iteration (``call_soon`` chain) with ``perf_counter``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stamps: list[float] = []
        self.running = True
        loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.stamps.append(time.perf_counter())
        if self.running:
            self.loop.call_soon(self._tick)

    def max_gap_after(self, t0: float) -> float:
        s = [t for t in self.stamps if t >= t0]
        return max((b - a for a, b in itertools.pairwise(s)), default=0.0)


async def _loop_stall(n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=_TIMEOUT, lock_timeout=_TIMEOUT / 2)
    async with AsyncPairPool("a", cfg) as pool:
        t_add = loop.time()
        for i in range(n):
            await pool.add(_pair(i), False, sock=open_udp())
        add_s = loop.time() - t_add
        last_deadline = loop.time() + _TIMEOUT
        # Quiet baseline: the same probe, same pool, nothing due.
        probe = _Probe(loop)
        q0 = time.perf_counter()
        await asyncio.sleep(0.1)
        baseline = probe.max_gap_after(q0)
        probe.running = False
        await asyncio.sleep(0)
        blocked: list[float] = []

        def block() -> None:  # every deadline passes while the loop is blocked: one wake-up finds all due
            time.sleep(max(0.0, last_deadline - loop.time()) + 0.01)
            blocked.append(time.perf_counter())

        gc.collect()
        loop.call_soon(block)
        await asyncio.sleep(0)
        probe = _Probe(loop)
        while len(pool) and loop.time() < last_deadline + 10.0:
            await asyncio.sleep(0.01)
        probe.running = False
        left = len(pool)
        stall = probe.max_gap_after(blocked[0]) if blocked else 0.0
    return {"stall_s": stall, "baseline_s": baseline, "add_s": add_s, "left": left}


def _sans_io_costs(n: int) -> dict[str, float]:
    """Per-entry cost of the core alone: ``n`` expiries in one ``handle_timer``, and ``n`` removals."""
    cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=_TIMEOUT, lock_timeout=_TIMEOUT / 2)
    pool = PairPool("a", cfg)
    for i in range(n):
        pool.add(_pair(i), False, 0.0)
    gc.collect()
    t0 = time.perf_counter()
    pool.handle_timer(_TIMEOUT + 1.0)
    expiry = (time.perf_counter() - t0) / n
    assert len(pool) == 0, "every entry was due"
    pool = PairPool("a", cfg)
    for i in range(n):
        pool.add(_pair(i), False, 0.0)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        pool.remove(i + 1, 1.0)
    removal = (time.perf_counter() - t0) / n
    d = {i: None for i in range(n)}
    t0 = time.perf_counter()
    for i in range(n):
        del d[i]
    dict_delete = (time.perf_counter() - t0) / n
    while pool.next_event() is not None:
        pass
    return {"expiry": expiry, "removal": removal, "dict_delete": dict_delete}


def expiry_figures(n: int, loop_stall: Any) -> dict[str, Any]:
    """``loop_stall(coro)`` runs a coroutine on a fresh loop (the bench's ``_run``)."""
    stall = loop_stall(_loop_stall(n))
    core = _sans_io_costs(n)
    return {
        "entries": n,
        "expiry_loop_stall_ms": round(stall["stall_s"] * 1e3, 2),
        "quiet_loop_max_iteration_ms": round(stall["baseline_s"] * 1e3, 3),
        "expiry_stall_vs_min_drain_grace": round(stall["stall_s"] / PairConfig().min_drain_grace, 3),
        "entries_left_after_expiry": stall["left"],
        "expiry_us_per_entry": round(core["expiry"] * 1e6, 2),
        "removal_us_per_entry": round(core["removal"] * 1e6, 2),
        "dict_delete_us": round(core["dict_delete"] * 1e6, 3),
        "add_s": round(stall["add_s"], 3),
    }
