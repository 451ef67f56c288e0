"""Two nodes on :mod:`natpool.sim` for the handover tests, and the assertions they share.

Not a simulator: everything runs on :class:`natpool.sim.Simulation` (virtual
clock, timed network and signalling with scripted faults). This module only
builds the two-node setup the tests use (alice at 10.0.0.1, bob at
10.0.0.2, UDP one-way ``udp_delay``, signalling one-way ``sig_delay``),
checks Symmetry after every simulated event, and reads the simulator's
records (sent datagrams with the sender's state, sent signals, transitions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from natpool.config import PairConfig
from natpool.core.handover import Session
from natpool.core.lease import Lease
from natpool.endpoints import EndpointPair
from natpool.sim import Channel, ChannelEnd, NetConfig, SimNode, Simulation, TakeHandle
from natpool.wire import signal as wire

A, B = "alice", "bob"

#: ``(sender identity, message) -> bool``: which messages a fault applies to.
Match = Callable[[str, bytes], bool]


@dataclass
class Faults:
    """Signalling faults for the next channel a take opens (see :meth:`Duo.take`)."""

    break_after: Match | None = None  # break the channel once a matching message was handled
    drop_in_flight: Match | None = None  # break the channel instead of carrying a matching message
    tamper: Callable[[str, bytes], list[bytes]] | None = None  # what travels instead of a message


@dataclass
class Duo:
    """alice and bob on one simulation, with Symmetry checked after every event."""

    sim: Simulation
    nodes: dict[str, SimNode]
    udp_delay: float
    sig_delay: float
    pairs: list[EndpointPair] = field(default_factory=list)
    handles: list[TakeHandle] = field(default_factory=list)
    _pending: Faults | None = None

    @property
    def now(self) -> float:
        return self.sim.now()

    def __getitem__(self, identity: str) -> SimNode:
        return self.nodes[identity]

    def add_pair(self, nonce: int, pinger: str = A) -> EndpointPair:
        pair = self.sim.punch(self.nodes[A], self.nodes[B], nonce=nonce, pinger=self.nodes[pinger])
        self.pairs.append(pair)
        return pair

    def take(self, node: str, nonce: int | None = None, peer: str | None = None, *,
             faults: Faults | None = None) -> TakeHandle:
        """``node.take`` with ``faults`` on the channel it opens (installed before LOCK is sent)."""
        self._pending = faults
        try:
            handle = self.nodes[node].take(nonce, peer)
        finally:
            self._pending = None
        self.handles.append(handle)
        return handle

    def _on_open(self, channel: Channel) -> None:
        faults = self._pending
        if faults is None:
            return
        if faults.drop_in_flight is not None or faults.tamper is not None:
            drop, tamper = faults.drop_in_flight, faults.tamper

            def intercept(end: ChannelEnd, data: bytes) -> Sequence[bytes]:
                if drop is not None and drop(end.owner, data):
                    channel.break_()
                    return []
                return tamper(end.owner, data) if tamper is not None else [data]

            channel.intercept = intercept
        if faults.break_after is not None:
            after = faults.break_after

            def on_deliver(to: ChannelEnd, data: bytes) -> None:
                if after(to.peer.owner, data):
                    channel.break_()

            channel.on_deliver = on_deliver

    # --- running ---

    def run_until(self, t: float, until: Callable[[], bool] | None = None) -> None:
        if until is None:
            self.sim.run_until(t)
        elif not self.sim.run_until(until, timeout=max(0.0, t - self.now)):
            raise AssertionError(f"condition not reached by t={t}")

    def run_sessions(self, limit: float = 30.0) -> None:
        """Run until every session ended and nothing (signal or datagram copy) is on its way."""
        sim = self.sim
        done = sim.run_until(lambda: all(s.done for _, s in sessions(sim))
                             and sim.signalling.quiet() and sim.network.in_transit == 0, timeout=limit)
        assert done, "sessions did not end"

    # --- inspection ---

    def state(self, node: str, nonce: int) -> str:
        """The entry's state; ``Expired`` once it left the pool."""
        return self.nodes[node].state(nonce) or "Expired"

    def locked_at(self, node: str, nonce: int) -> float | None:
        for change in self.nodes[node].transitions():
            if change.nonce == nonce and change.target == "Locked":
                return change.at
        return None


def duo(config: PairConfig, udp_delay: float = 0.005, sig_delay: float = 0.02, seed: int = 0) -> Duo:
    sim = Simulation(seed, NetConfig(delay_min=udp_delay, delay_max=udp_delay), config=config,
                     signalling_delay=sig_delay)
    nodes = {A: sim.add_node(A, "10.0.0.1"), B: sim.add_node(B, "10.0.0.2")}
    d = Duo(sim, nodes, udp_delay, sig_delay)
    sim.signalling.on_open = d._on_open
    sim.checks.append(lambda: symmetry_everywhere(d))
    return d


# --- reading the records ---


def sessions(sim: Simulation) -> list[tuple[str, Session]]:
    """Every handover session of every node (either role), with its node's identity."""
    return [(ident, link.session) for ident, node in sim.nodes.items() for link in node.links]


def channel(handle: TakeHandle) -> Channel:
    assert handle.end is not None, "the take opened no channel"
    return handle.end.channel


def types(d: Duo, handle: TakeHandle) -> list[str]:
    """The decodable signal types sent on ``handle``'s channel, in send order (before any tampering)."""
    out = []
    for rec in d.sim.signalling.sent_on(channel(handle)):
        if not rec.accepted or rec.injected:
            continue
        try:
            out.append(wire.decode(rec.data).type.name)
        except Exception:  # garbage is not a protocol message
            continue
    return out


def leases(handle: TakeHandle) -> list[Lease]:
    """The leases both ends of ``handle``'s session produced."""
    out = [lease] if (lease := handle.lease) is not None else []
    resp = handle.responder
    if resp is not None and isinstance(resp.outcome, Lease):
        out.append(resp.outcome)
    return out


def symmetry_everywhere(d: Duo) -> None:
    for pair in d.pairs:
        assert_symmetry(d, pair.nonce)


def assert_symmetry(d: Duo, nonce: int) -> None:
    """Never one side InUse while the other is Idle (spec Symmetry)."""
    states = {d.state(A, nonce), d.state(B, nonce)}
    assert states != {"InUse", "Idle"}, states


def assert_no_leak(d: Duo, nonce: int) -> None:
    """Every session ended, none still owns an entry, and no entry is stuck claimed."""
    for _, s in sessions(d.sim):
        assert s.done
    for ident, node in d.nodes.items():
        assert all(link.session.done for link in node.links), ident
        assert not node.pool.handovers.sessions(), ident
        assert d.state(ident, nonce) in ("Idle", "InUse", "Expired"), (ident, d.state(ident, nonce))


def assert_silent_after_lock(d: Duo, nonce: int) -> None:
    """StrictSilence: no keepalive frame leaves a side after its entry locked (and none from a silent state)."""
    for node in (A, B):
        locked = d.locked_at(node, nonce)
        assert locked is not None, node
        late = [s for s in d.sim.sent_by(node, nonce) if s.time >= locked]
        assert late == [], late
    assert d.sim.silence_violations() == []
