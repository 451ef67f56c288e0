"""A simulated node: one ``PairPool`` driven sans-IO over the in-memory network.

The node is the simulator's equivalent of the asyncio driver: it gives each
pair entry a UDP address (the pair's local endpoint), and after *every*
input — a delivered datagram, a timer, a local call such as ``claim`` — it
drains ``pool.datagrams_to_send(now)`` into the network (recording each one
in the simulation's log together with the sender entry's state) and re-arms
a single timer at ``pool.get_timer()``. Tests that touch ``node.pool``
directly must call :meth:`SimNode.pump` afterwards, as a driver would.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from natpool.config import PairConfig
from natpool.core.entry import EntryOutput, ExpiryReason, PairEntry, StateChanged
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import UnknownPair
from natpool.sim.clock import SimulationError, TimerHandle
from natpool.sim.network import Addr
from natpool.sim.records import DeliveredDatagram, SentDatagram, frame_kind

if TYPE_CHECKING:
    from collections.abc import Sequence

    from natpool.sim.simulation import Simulation

#: First UDP port a node hands out; ports are allocated sequentially so runs are reproducible.
FIRST_PORT = 40000


class SimNode:
    """One peer: identity, host address, a :class:`PairPool` and the glue that drives it."""

    def __init__(
        self,
        sim: Simulation,
        identity: str,
        host: str,
        config: PairConfig | None = None,
        listeners: Sequence[object] = (),
    ) -> None:
        self.sim = sim
        self.identity = identity
        self.host = host
        self.pool = PairPool(identity, config if config is not None else PairConfig(), listeners)
        self.events: list[EntryOutput] = []  # every pool event, in order
        self.unowned = 0  # datagrams that reached a still-bound port whose entry had left the pool
        self._local: dict[int, Addr] = {}  # nonce -> local address of its entry
        self._next_port = FIRST_PORT
        self._timer: TimerHandle | None = None
        self._timer_at: float | None = None

    # --- addresses -------------------------------------------------------------

    def alloc_port(self) -> int:
        """Next free local port (deterministic: sequential, skipping bound ones)."""
        net = self.sim.network
        while True:
            port = self._next_port
            self._next_port += 1
            if self._next_port > 65535:
                raise SimulationError(f"node {self.identity} ran out of ports")
            if not net.is_bound((self.host, port)):
                return port

    def endpoint(self, port: int | None = None) -> Endpoint:
        return Endpoint(self.identity, self.host, self.alloc_port() if port is None else port)

    # --- pool operations (each followed by a pump, as a driver would) ------------

    def add(self, pair: EndpointPair, is_pinger: bool) -> PairEntry:
        """Add ``pair`` to the pool and bind its local endpoint on the network."""
        addr = pair.local(self.identity).addr
        if self.sim.network.is_bound(addr):
            raise SimulationError(f"{addr} is already bound on the simulated network")
        entry = self.pool.add(pair, is_pinger, self.sim.now())
        self._local[entry.nonce] = addr
        self.sim.network.bind(addr, partial(self._on_datagram, entry.nonce))
        self.pump()
        return entry

    def remove(self, nonce: int) -> PairEntry:
        entry = self.pool.remove(nonce, self.sim.now())
        self.pump()
        return entry

    def claim(self, nonce: int) -> PairEntry:
        """Local CAS claim (Idle -> InLocking), without any handover."""
        entry = self.pool.claim(nonce, self.sim.now())
        self.pump()
        return entry

    def claim_any(self, peer: str) -> PairEntry:
        entry = self.pool.claim_any(peer, self.sim.now())
        self.pump()
        return entry

    def entry(self, nonce: int) -> PairEntry:
        return self.pool.get(nonce)

    def state(self, nonce: int) -> str | None:
        """The entry's lifecycle state, or None once it has left the pool."""
        try:
            return self.pool.get(nonce).state
        except UnknownPair:
            return None

    def transitions(self, event: str | None = None) -> list[StateChanged]:
        """Every lifecycle transition of this node's entries so far (only ``event`` ones if given)."""
        return [e for e in self.events if isinstance(e, StateChanged) and (event is None or e.event == event)]

    def expiries(self) -> dict[int, ExpiryReason | None]:
        """nonce -> reason, for every entry of this node that expired so far."""
        return {e.nonce: e.reason for e in self.transitions("expire")}

    # --- driving -------------------------------------------------------------------

    def _on_datagram(self, nonce: int, data: bytes, src: Addr, dst: Addr) -> None:
        sim = self.sim
        now = sim.now()
        if sim.record_deliveries:
            sim.deliveries.append(
                DeliveredDatagram(now, self.identity, nonce, frame_kind(data), self.state(nonce), src, dst)
            )
        try:
            self.pool.receive_datagram(nonce, data, src, now)
        except UnknownPair:
            self.unowned += 1
            self._release(nonce)
            return
        self.pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.pool.handle_timer(self.sim.now())
        self.pump()

    def pump(self) -> None:
        """Flush the pool's output into the network, collect its events, re-arm the timer."""
        sim = self.sim
        now = sim.now()
        pool = self.pool
        out = pool.datagrams_to_send(now)
        if out:
            net = sim.network
            log = sim.log
            ident = self.identity
            for nonce, data, dst in out:
                src = self._local[nonce]
                state = self.state(nonce)
                dg_id = net.send(src, dst, data)
                log.append(SentDatagram(now, ident, nonce, frame_kind(data), state, src, dst, dg_id))
        ev = pool.next_event()
        while ev is not None:
            self.events.append(ev)
            if isinstance(ev, StateChanged) and ev.target == "Expired":
                self._release(ev.nonce)
            ev = pool.next_event()
        self._rearm()

    def _release(self, nonce: int) -> None:
        """The entry left the pool: close its simulated socket."""
        addr = self._local.pop(nonce, None)
        if addr is not None:
            self.sim.network.unbind(addr)

    def _rearm(self) -> None:
        t = self.pool.get_timer()
        if t == self._timer_at and (t is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = t
        self._timer = None if t is None else self.sim.scheduler.call_at(t, self._on_timer)

    def __repr__(self) -> str:
        return f"SimNode({self.identity}@{self.host}, {len(self._local)} bound)"
