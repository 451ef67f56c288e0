"""The simulation: one seed, one virtual clock, one network, many nodes.

Determinism: all randomness comes from ``random.Random`` instances seeded
from ``seed`` (one stream for network fates, one for nonces, so adding a
pair does not shift which datagrams get lost), time only moves through the
scheduler, and nodes/ports/hosts are allocated in call order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import overload

from natpool.config import PairConfig
from natpool.endpoints import NONCE_MAX, EndpointPair
from natpool.machines.tables import ENTRY
from natpool.sim.clock import Scheduler, SimulationError, VirtualClock
from natpool.sim.network import Addr, NetConfig, Network
from natpool.sim.node import SimNode
from natpool.sim.records import INJECTED, DeliveredDatagram, SentDatagram, frame_kind
from natpool.sim.signalling import SimSignalling
from natpool.wire.signal import SID_SIZE

#: Entry states that must never send (spec/entry.toml, set ``silent``).
SILENT_STATES: frozenset[str] = frozenset(ENTRY.sets["silent"])


class Simulation:
    """Entry point of the simulator; see the package docstring."""

    def __init__(
        self,
        seed: int = 0,
        net: NetConfig | None = None,
        *,
        config: PairConfig | None = None,
        signalling_delay: float = 0.02,
        signalling_manual: bool = False,
        record_deliveries: bool = True,
    ) -> None:
        self.seed = seed
        self.config = config if config is not None else PairConfig()
        self.clock = VirtualClock()
        self.scheduler = Scheduler(self.clock)
        # Not cryptographic: reproducibility from the seed is the whole point.
        self.network = Network(self.scheduler, random.Random(f"natpool.sim.net/{seed}"), net)  # noqa: S311
        self.signalling = SimSignalling(self.scheduler, signalling_delay, manual=signalling_manual)
        self._nonce_rng = random.Random(f"natpool.sim.nonce/{seed}")  # noqa: S311
        self._sid_rng = random.Random(f"natpool.sim.sid/{seed}")  # noqa: S311
        self._nonces: set[int] = set()
        self.nodes: dict[str, SimNode] = {}
        self.log: list[SentDatagram] = []
        self.record_deliveries = record_deliveries
        self.deliveries: list[DeliveredDatagram] = []
        #: Invariants (e.g. Symmetry) run as :meth:`run_until`, :meth:`run_for` and
        #: :meth:`run_until_quiet` start and after every event they (or :meth:`step`) fire; a
        #: check raises to fail the run at the very event that broke it.
        self.checks: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.clock.now()

    # --- topology ----------------------------------------------------------------

    def add_node(
        self,
        identity: str,
        host: str | None = None,
        *,
        config: PairConfig | None = None,
        listeners: Sequence[object] = (),
    ) -> SimNode:
        """Create a node; hosts default to 10.0.x.y in creation order."""
        if identity in self.nodes:
            raise SimulationError(f"node {identity!r} already exists")
        if host is None:
            n = len(self.nodes)
            host = f"10.0.{n // 250}.{n % 250 + 1}"
        if any(node.host == host for node in self.nodes.values()):
            raise SimulationError(f"host {host} is already taken")
        node = SimNode(self, identity, host, config if config is not None else self.config, listeners)
        self.nodes[identity] = node
        return node

    def node(self, identity: str) -> SimNode:
        return self.nodes[identity]

    def new_nonce(self) -> int:
        """A fresh non-zero 64-bit nonce from the seeded nonce stream."""
        while True:
            nonce = self._nonce_rng.randint(1, NONCE_MAX)
            if nonce not in self._nonces:
                self._nonces.add(nonce)
                return nonce

    def new_sid(self) -> bytes:
        """A handover session id from the seeded stream (production uses ``secrets``)."""
        while True:
            sid = self._sid_rng.randbytes(SID_SIZE)
            if any(sid):
                return sid

    def punch(self, a: SimNode, b: SimNode, nonce: int | None = None, pinger: SimNode | None = None,
              key: bytes | None = None) -> EndpointPair:
        """Simulate a successful hole punch: the same pair is added on both nodes (``pinger`` defaults to ``a``).

        ``key``: the per-pair key both nodes get (keyed keepalives); None for the legacy frame.
        """
        if pinger is None:
            pinger = a
        if pinger is not a and pinger is not b:
            raise SimulationError("the pinger must be one of the two nodes")
        if nonce is None:
            nonce = self.new_nonce()
        else:
            self._nonces.add(nonce)
        pair = EndpointPair(a.endpoint(), b.endpoint(), nonce)
        a.add(pair, is_pinger=pinger is a, key=key)
        b.add(pair, is_pinger=pinger is b, key=key)
        return pair

    # --- traffic from outside any pool -------------------------------------------------

    def inject(self, src: Addr, dst: Addr, data: bytes, sender: str = INJECTED) -> int:
        """Send an arbitrary datagram (spoofed, malformed, replayed...); it is logged like any other."""
        now = self.now()
        dg_id = self.network.send(src, dst, data)
        self.log.append(SentDatagram(now, sender, 0, frame_kind(data), None, src, dst, dg_id))
        return dg_id

    @property
    def unowned(self) -> int:
        """Datagrams that reached an address no live entry owns."""
        return self.network.stats.unowned + sum(n.unowned for n in self.nodes.values())

    def sent_by(self, identity: str, nonce: int | None = None) -> list[SentDatagram]:
        return [d for d in self.log if d.sender == identity and (nonce is None or d.nonce == nonce)]

    def silence_violations(self) -> list[SentDatagram]:
        """Datagrams a pool sent from a silent state (StrictSilence says: none, ever)."""
        return [d for d in self.log if d.state in SILENT_STATES]

    def stray_deliveries(self) -> list[DeliveredDatagram]:
        """Keepalive frames that reached a pair already handed to the application (CleanHandover: none)."""
        return [d for d in self.deliveries if d.state == "InUse" and d.kind != "garbage"]

    def partition(self, a: SimNode | str, b: SimNode | str | None = None) -> None:
        """Shorthand for ``network.partition`` taking nodes or identities."""
        self.network.partition(self._host(a), None if b is None else self._host(b))

    def heal(self, a: SimNode | str | None = None, b: SimNode | str | None = None) -> None:
        self.network.heal(None if a is None else self._host(a), None if b is None else self._host(b))

    def _host(self, node: SimNode | str) -> str:
        return node.host if isinstance(node, SimNode) else self.nodes[node].host

    # --- running ---------------------------------------------------------------------

    @overload
    def run_until(self, target: float, timeout: None = None) -> bool: ...

    @overload
    def run_until(self, target: Callable[[], bool], timeout: float) -> bool: ...

    def run_until(self, target: float | Callable[[], bool], timeout: float | None = None) -> bool:
        """Run to virtual time ``target``, or until ``target()`` holds (checked after every event).

        With a predicate, give up after ``timeout`` virtual seconds and return
        False; the clock then stands at the deadline. A time target returns True.
        """
        if callable(target):
            if timeout is None:
                raise SimulationError("run_until(predicate) needs a timeout")
            return self.scheduler.run_until(self.now() + timeout, stop=self._checked(target))
        self.scheduler.run_until(target, stop=self._checked(None))
        return True

    def _checked(self, stop: Callable[[], bool] | None) -> Callable[[], bool] | None:
        """``stop`` with :attr:`checks` run first (the scheduler calls it after every event)."""
        checks = self.checks
        if not checks:
            return stop

        def stop_checked() -> bool:
            for check in checks:
                check()
            return stop() if stop is not None else False

        return stop_checked

    def step(self) -> bool:
        """Fire exactly one event (for step-wise stateful tests); False if nothing is scheduled."""
        fired = self.scheduler.step()
        for check in self.checks:
            check()
        return fired

    def run_for(self, dt: float) -> None:
        self.scheduler.run_until(self.now() + dt, stop=self._checked(None))

    def run_until_quiet(self, timeout: float) -> bool:
        """Run until nothing at all is scheduled (no timers, nothing in flight), within ``timeout``.

        Quiet only happens once every entry is silent or gone and every
        session has ended; with live keepalive it returns False at the deadline.
        """
        sched = self.scheduler
        return sched.run_until(self.now() + timeout, stop=self._checked(lambda: sched.next_time() is None))
