"""How much faster than real time the simulator runs keepalive (for ``natpool bench``).

This is the one place in ``natpool.sim`` that reads a clock, and only to
time the run from outside: the simulation itself never sees wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from natpool.config import PairConfig
from natpool.sim.simulation import Simulation


@dataclass(frozen=True, slots=True)
class SimBenchResult:
    nodes: int
    pairs: int
    virtual_seconds: float
    wall_seconds: float
    datagrams: int
    events: int

    @property
    def ratio(self) -> float:
        """Virtual seconds simulated per wall-clock second."""
        return self.virtual_seconds / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"sim: {self.nodes} nodes x {self.pairs} pairs, {self.virtual_seconds:.0f} s virtual in "
            f"{self.wall_seconds * 1000:.0f} ms wall -> {self.ratio:,.0f}x real time "
            f"({self.datagrams} datagrams, {self.events} events)"
        )


def bench_ratio(
    pairs: int = 100, virtual_seconds: float = 600.0, seed: int = 0, config: PairConfig | None = None
) -> SimBenchResult:
    """Two nodes keep ``pairs`` pairs alive for ``virtual_seconds``; time it on the wall clock."""
    sim = Simulation(seed, config=config, record_deliveries=False)
    a = sim.add_node("a")
    b = sim.add_node("b")
    for _ in range(pairs):
        sim.punch(a, b)
    start = time.perf_counter()
    sim.run_until(virtual_seconds)
    wall = time.perf_counter() - start
    return SimBenchResult(2, pairs, virtual_seconds, wall, len(sim.log), sim.scheduler.fired)
