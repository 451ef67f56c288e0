"""Deterministic simulator: virtual clock, in-memory network and signalling, simulated nodes.

Everything is driven by one seeded scheduler, so a run is a pure function of
its seed: tests replay failures exactly and never sleep on the wall clock.

Quick start::

    sim = Simulation(seed=1, net=NetConfig(duplicate=0.1, delay_min=0.005, delay_max=0.05))
    a, b = sim.add_node("alice"), sim.add_node("bob")
    pair = sim.punch(a, b)                    # same pair on both nodes, alice pings
    sim.run_until(600.0)                      # ten virtual minutes of keepalive
    handle = a.take(pair.nonce)               # handover over a SimSignalling channel
    sim.run_until(lambda: handle.done, timeout=10.0)
    assert sim.silence_violations() == []     # nothing sent from Locked/InUse/Expired

Knobs for exhaustive tests: ``NetConfig(manual=True)`` (datagrams wait in
``sim.network.in_flight`` for ``deliver``/``drop``/``duplicate``),
``Simulation(signalling_manual=True)`` (signals wait in
``sim.signalling.in_flight``, FIFO per direction), ``sim.step()``,
``sim.partition``/``heal``, ``channel.break_()``, ``node.fail_sends``.

Scripted faults on a timed run: ``sim.network.fate`` (copies per datagram),
``sim.signalling.on_open`` to set a channel's ``intercept`` (rewrite, replay,
swallow, or break instead of carrying a message) and ``on_deliver`` (break
right after a message), ``sim.signalling.inject`` (a forger), ``node.serve``
(answer a channel the test opened; ``anonymous=True``: as a transport that
cannot name the peer), ``node.cancel`` (the application gives up a take),
``sim.checks`` (invariants after every event); records: ``sim.log``, ``sim.signalling.log``, ``in_transit`` counters.
"""

from natpool.sim.bench import SimBenchResult, bench_ratio
from natpool.sim.clock import Scheduler, SimulationError, TimerHandle, VirtualClock
from natpool.sim.network import InFlight, NetConfig, NetStats, Network
from natpool.sim.node import SessionLink, SimNode, TakeHandle
from natpool.sim.records import INJECTED, DeliveredDatagram, SentDatagram, SentSignal, frame_kind
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
    "SentSignal",
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
