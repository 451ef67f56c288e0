"""Deterministic simulator: virtual clock, in-memory network and signalling, simulated nodes.

Everything is driven by one seeded scheduler, so a run is a pure function of
its seed: tests replay failures exactly and never sleep on the wall clock.
"""

from natpool.sim.clock import Scheduler, SimulationError, TimerHandle, VirtualClock
from natpool.sim.network import InFlight, NetConfig, NetStats, Network
from natpool.sim.signalling import Channel, ChannelEnd, SimSignalling

__all__ = [
    "Channel",
    "ChannelEnd",
    "InFlight",
    "NetConfig",
    "NetStats",
    "Network",
    "Scheduler",
    "SimSignalling",
    "SimulationError",
    "TimerHandle",
    "VirtualClock",
]
