"""The keepalive section's two sides run the same schedule (no timing assertions: benchmarks are not tests)."""

from __future__ import annotations

import asyncio
import time

from natpool.bench.cli import _keepalive_natpool, _keepalive_raw, _paced


def test_paced_adds_spread_over_the_span_in_order() -> None:
    """Pair i is not started before its slot ``t0 + span * i / n``: both sides get the same ping phases."""

    async def run() -> list[float]:
        t0 = time.perf_counter()
        started = []
        for i in range(5):
            await _paced(i, 5, t0, 0.05)
            started.append(time.perf_counter() - t0)
        return started

    started = asyncio.run(run())
    assert started == sorted(started)
    # Lower bounds only (a loaded machine may be late, never meaningfully early; 1 ms of loop clock slack).
    assert all(t >= 0.05 * i / 5 - 0.001 for i, t in enumerate(started))


def test_both_sides_exchange_keepalives_on_loopback() -> None:
    """A tiny run of each side: pongs come back and every natpool pair stays alive."""
    raw = asyncio.run(_keepalive_raw(3, 0.25, 0.3))
    nat = asyncio.run(_keepalive_natpool(3, 0.25, 0.3))  # ping_lifespan >= min_drain_grace
    assert raw["exchanges_per_s"] > 0 and raw["cpu"] >= 0
    assert nat["exchanges_per_s"] > 0 and nat["alive"] == 3
    keyed = asyncio.run(_keepalive_natpool(3, 0.25, 0.3, keyed=True))  # the keyed run of issue 10
    assert keyed["exchanges_per_s"] > 0 and keyed["alive"] == 3
