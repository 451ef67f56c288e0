"""Keepalive survival under random loss, measured on the simulator (for ``natpool bench`` and the defaults).

One pair per seed, two nodes, uniform random loss on every datagram in both
directions: the pair is *alive* when neither side expired it within
``virtual_seconds``. The first expiry (either side, any reason) stops the
seed's run early, so dead configurations cost little. This is how the
:class:`natpool.config.PairConfig` defaults were chosen; ``natpool bench``
prints the same table for the defaults at 10/30/50 % loss.

Wall time is read only around the runs (as in :mod:`natpool.sim.bench`);
the simulation itself never sees it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from natpool.config import PairConfig
from natpool.sim.network import NetConfig
from natpool.sim.simulation import Simulation

#: One-way delay range of the lossy link: an Internet-ish path with jitter (reordering included).
DELAY_MIN = 0.01
DELAY_MAX = 0.08


@dataclass(frozen=True, slots=True)
class SurvivalResult:
    """Outcome of ``seeds`` independent one-pair runs at one loss rate and one config."""

    loss: float
    ping_interval: float
    no_inbound_timeout: float
    seeds: int
    virtual_seconds: float
    alive: int
    #: Virtual time of each expired pair's first expiry, in seed order.
    expiries: tuple[float, ...]
    wall_seconds: float

    @property
    def alive_fraction(self) -> float:
        return self.alive / self.seeds if self.seeds else 0.0

    @property
    def first_expiry_median(self) -> float | None:
        """Median first expiry over the pairs that expired; None when all survived."""
        return statistics.median(self.expiries) if self.expiries else None

    def as_dict(self) -> dict[str, float | int | None]:
        median = self.first_expiry_median
        return {
            "loss": self.loss, "ping_interval_s": self.ping_interval,
            "no_inbound_timeout_s": self.no_inbound_timeout, "seeds": self.seeds,
            "virtual_s": self.virtual_seconds, "alive": self.alive,
            "alive_fraction": round(self.alive_fraction, 4),
            "first_expiry_median_s": None if median is None else round(median, 1),
            "wall_s": round(self.wall_seconds, 3),
        }

    def __str__(self) -> str:
        median = self.first_expiry_median
        tail = "no expiry" if median is None else f"median first expiry {median:.0f} s"
        return (f"loss {self.loss:.0%}, ping {self.ping_interval:g} s / no-inbound {self.no_inbound_timeout:g} s: "
                f"{self.alive}/{self.seeds} alive after {self.virtual_seconds:g} s ({tail})")


def first_expiry(seed: int, loss: float, config: PairConfig, virtual_seconds: float) -> float | None:
    """Run one pair at ``loss`` for ``virtual_seconds``; the virtual time it first expired, or None."""
    net = NetConfig(loss=loss, delay_min=DELAY_MIN, delay_max=DELAY_MAX)
    sim = Simulation(seed, net, config=config, record_deliveries=False)
    a, b = sim.add_node("a"), sim.add_node("b")
    nonce = sim.punch(a, b).nonce
    pa, pb = a.pool, b.pool
    # An expired entry leaves its pool at once, so membership is the cheap liveness check.
    if sim.run_until(lambda: nonce not in pa or nonce not in pb, timeout=virtual_seconds):
        return sim.now()
    return None


def keepalive_survival(
    loss: float, config: PairConfig | None = None, seeds: int = 50, virtual_seconds: float = 600.0, first_seed: int = 0
) -> SurvivalResult:
    """Fraction of ``seeds`` one-pair runs still alive after ``virtual_seconds`` at ``loss`` (both directions)."""
    cfg = config if config is not None else PairConfig()
    start = time.perf_counter()
    expiries = []
    for seed in range(first_seed, first_seed + seeds):
        t = first_expiry(seed, loss, cfg, virtual_seconds)
        if t is not None:
            expiries.append(t)
    wall = time.perf_counter() - start
    return SurvivalResult(loss, cfg.ping_interval, cfg.no_inbound_timeout, seeds, virtual_seconds,
                          seeds - len(expiries), tuple(expiries), wall)
