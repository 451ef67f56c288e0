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
from typing import Any

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


# --- the `natpool bench` figure ------------------------------------------------------------------

#: Loss rates of the bench figure, and the one the defaults are held to.
BENCH_LOSSES = (0.1, 0.3, 0.5)
TARGET_LOSS = 0.3
TARGET_ALIVE = 0.99
#: What the defaults are compared with: the defaults before they were measured (ping 5 s / no-inbound 21 s).
BASELINE = PairConfig(ping_interval=5.0, no_inbound_timeout=21.0)


def bench_figure(quick: bool = False, config: PairConfig | None = None) -> dict[str, Any]:
    """Survival of ``config`` (the defaults) and of :data:`BASELINE` at :data:`BENCH_LOSSES` (JSON-ready).

    Full: 50 seeds x 10 virtual minutes per cell (a few seconds of wall time);
    ``quick``: 10 seeds x 3 virtual minutes.
    """
    cfg = config if config is not None else PairConfig()
    seeds, virtual = (10, 180.0) if quick else (50, 600.0)
    start = time.perf_counter()
    rows: dict[str, Any] = {}
    target_cell: SurvivalResult | None = None
    for name, c in (("defaults", cfg), ("baseline", BASELINE)):
        cells: dict[str, Any] = {}
        for loss in BENCH_LOSSES:
            res = keepalive_survival(loss, c, seeds=seeds, virtual_seconds=virtual)
            cells[f"{loss:g}"] = res.as_dict()
            if name == "defaults" and loss == TARGET_LOSS:
                target_cell = res
        rows[name] = {"ping_interval_s": c.ping_interval, "no_inbound_timeout_s": c.no_inbound_timeout,
                      "by_loss": cells}
    assert target_cell is not None
    return {
        "seeds": seeds, "virtual_s": virtual, "delay_s": [DELAY_MIN, DELAY_MAX], "configs": rows,
        "target": {"loss": TARGET_LOSS, "alive_fraction": TARGET_ALIVE, "value": round(target_cell.alive_fraction, 4),
                   "met": target_cell.alive_fraction >= TARGET_ALIVE},
        "wall_s": round(time.perf_counter() - start, 2),
    }


def format_figure(fig: dict[str, Any]) -> str:
    """The plain-text table ``natpool bench`` prints for :func:`bench_figure`'s result."""
    lines = [f"keepalive survival under random loss (simulator: one pair per seed, {fig['seeds']} seeds x "
             f"{fig['virtual_s']:g} s virtual, {fig['delay_s'][0] * 1000:g}-{fig['delay_s'][1] * 1000:g} ms one way; "
             f"{fig['wall_s']} s wall)"]
    losses = list(next(iter(fig["configs"].values()))["by_loss"])
    lines.append(f"  {'config':<30}" + "".join(f"{float(k):>24.0%}" for k in losses))
    for name, row in fig["configs"].items():
        label = f"{name} {row['ping_interval_s']:g} s / {row['no_inbound_timeout_s']:g} s"
        cells = []
        for k in losses:
            c = row["by_loss"][k]
            median = c["first_expiry_median_s"]
            cells.append(f"{c['alive']}/{c['seeds']} alive" + (f" ({median:g} s)" if median is not None else ""))
        lines.append(f"  {label:<30}" + "".join(f"{cell:>24}" for cell in cells))
    t = fig["target"]
    lines.append(f"  (alive after the run; median first expiry of the others in brackets) target: >= "
                 f"{t['alive_fraction']:.0%} alive at {t['loss']:.0%} loss: {t['value']:.0%} "
                 f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)
