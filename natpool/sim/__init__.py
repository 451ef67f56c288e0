"""Deterministic simulator: virtual clock, in-memory network and signalling, simulated nodes.

Everything is driven by one seeded scheduler, so a run is a pure function of
its seed: tests replay failures exactly and never sleep on the wall clock.
"""

from natpool.sim.bench import SimBenchResult, bench_ratio
from natpool.sim.clock import Scheduler, SimulationError, TimerHandle, VirtualClock
from natpool.sim.network import InFlight, NetConfig, NetStats, Network
from natpool.sim.node import SessionLink, SimNode, TakeHandle
from natpool.sim.records import INJECTED, DeliveredDatagram, SentDatagram, frame_kind
from natpool.sim.signalling import Channel, ChannelEnd, SimSignalling
from natpool.sim.simulation import Simulation

__all__ = [
    "INJECTED",
    "Channel",
    "ChannelEnd",
    "DeliveredDatagram",
    "InFlight",
    "NetConfig",
    "NetStats",
    "Network",
    "Scheduler",
    "SentDatagram",
    "SessionLink",
    "SimBenchResult",
    "SimNode",
    "SimSignalling",
    "Simulation",
    "SimulationError",
    "TakeHandle",
    "TimerHandle",
    "VirtualClock",
    "bench_ratio",
    "frame_kind",
]
