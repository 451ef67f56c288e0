"""The hypothesis rule-based state machine over :class:`~tests.support.stateful.world.World`.

Rules are the faults and calls the spec's system model allows (spec/system.toml):
punching pairs (on both sides or one), time, keepalive fates (deliver any
in-flight copy - i.e. reorder -, drop, duplicate), takes from either node
(several at once, and simultaneous ones on one pair), signal delivery in any
interleaving with timers, broken channels, removals, garbage datagrams and
signals, and lease releases. After every step the invariants check the
spec's safety properties and the recorded trace; ``heal_and_run`` (a rule,
and again at teardown) checks the bounded liveness properties.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from natpool.wire import signal as wire
from natpool.wire.signal import Signal, SignalType
from tests.support.stateful.world import BOGUS_SID_TAG, NODES, Link, PairRef, World

MAX_PAIRS = 4
node_st = st.sampled_from(NODES)
#: Mostly short steps (one signalling/UDP hop), sometimes past ping/lock/no-inbound timeouts.
dt_st = st.one_of(st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.5]),
                  st.floats(min_value=0.0, max_value=5.0, allow_nan=False))
index_st = st.integers(min_value=0, max_value=63)


def _links(*maybe: Link | None) -> MultipleResults[Link]:
    """Only the takes that opened a channel (a refusal at once opens none)."""
    return multiple(*(link for link in maybe if link is not None))


class HandoverMachine(RuleBasedStateMachine):
    """Two pools, a faulty network and signalling; the spec's properties after every step."""

    pairs = Bundle("pairs")
    links = Bundle("links")

    def __init__(self) -> None:
        super().__init__()
        self.world = World(settle=False)
        self.faults = True

    @initialize(settle=st.booleans(), faults=st.booleans())
    def setup(self, settle: bool, faults: bool) -> None:
        """``settle``: settle_time > max datagram lifetime, and the network may duplicate (spec: settle).

        ``faults`` (swarm testing): without it, loss, breaks, removals and
        forged input are off, so short programs reach deep protocol states
        (simultaneous takes, drains) that faults would otherwise cut short.
        """
        self.world = World(settle=settle)
        self.faults = faults

    # --- pairs ---------------------------------------------------------------------

    @precondition(lambda self: len(self.world.pairs) < MAX_PAIRS)
    @rule(target=pairs, pinger=node_st)
    def punch(self, pinger: str) -> PairRef:
        return self.world.punch(pinger)

    @precondition(lambda self: self.faults and len(self.world.pairs) < MAX_PAIRS)
    @rule(target=pairs, node=node_st, is_pinger=st.booleans())
    def add_one_side(self, node: str, is_pinger: bool) -> PairRef:
        return self.world.add_one_side(node, is_pinger)

    @precondition(lambda self: self.faults)
    @rule(node=node_st, pair=pairs)
    def remove(self, node: str, pair: PairRef) -> None:
        self.world.remove(node, pair)

    # --- time and keepalive fates -------------------------------------------------------

    @rule(dt=dt_st)
    def advance(self, dt: float) -> None:
        self.world.advance(dt)

    @precondition(lambda self: bool(self.world.sim.network.in_flight))
    @rule(i=index_st)
    def deliver_datagram(self, i: int) -> None:
        """Any in-flight copy, not only the oldest: this is reordering."""
        self.world.deliver_datagram(i % len(self.world.sim.network.in_flight))

    @precondition(lambda self: self.faults and bool(self.world.sim.network.in_flight))
    @rule(i=index_st)
    def drop_datagram(self, i: int) -> None:
        self.world.drop_datagram(i % len(self.world.sim.network.in_flight))

    @precondition(lambda self: self.world.settle and bool(self.world.sim.network.in_flight))
    @rule(i=index_st)
    def duplicate_datagram(self, i: int) -> None:
        self.world.duplicate_datagram(i % len(self.world.sim.network.in_flight))

    @precondition(lambda self: self.faults)
    @rule(node=node_st, pair=pairs, kind=st.sampled_from(["garbage", "wrong_nonce", "foreign"]),
          junk=st.binary(max_size=24))
    def inject_datagram(self, node: str, pair: PairRef, kind: str, junk: bytes) -> None:
        self.world.inject_datagram(node, pair, kind, junk)

    # --- takes -------------------------------------------------------------------------

    @rule(target=links, node=node_st, pair=pairs)
    def take(self, node: str, pair: PairRef) -> MultipleResults[Link]:
        return _links(self.world.take(node, pair))

    @precondition(lambda self: bool(self.world.pairs))
    @rule(target=links, node=node_st, n=st.integers(min_value=1, max_value=3))
    def take_any(self, node: str, n: int) -> MultipleResults[Link]:
        """``n`` concurrent take_any(peer) calls on one node."""
        return _links(*(self.world.take(node, None) for _ in range(n)))

    @rule(target=links, pair=pairs, first=node_st)
    def take_both_sides(self, pair: PairRef, first: str) -> MultipleResults[Link]:
        """Simultaneous takes of one pair from both nodes (the tie-break case)."""
        return _links(self.world.take(first, pair), self.world.take(NODES[1 - NODES.index(first)], pair))

    @precondition(lambda self: bool(self.world.leases()))
    @rule(i=index_st)
    def release(self, i: int) -> None:
        leases = self.world.leases()
        self.world.release(leases[i % len(leases)][1])

    # --- signalling ------------------------------------------------------------------------

    @rule(link=links, to_responder=st.booleans())
    def deliver_signal(self, link: Link, to_responder: bool) -> None:
        """Deliver the head of one direction's queue (a no-op when it is empty)."""
        self.world.deliver_signal(link, link.resp_node if to_responder else link.ini_node)

    @rule(link=links)
    def deliver_link(self, link: Link) -> None:
        """Deliver everything queued on one link, both ways, in FIFO order (a prompt channel)."""
        moved = True
        while moved:
            moved = self.world.deliver_signal(link, link.resp_node) | self.world.deliver_signal(link, link.ini_node)

    @rule()
    def flush(self) -> None:
        """A prompt network for one moment: deliver every queued signal and in-flight datagram, FIFO."""
        self.world.flush()

    @precondition(lambda self: self.faults)
    @rule(link=links)
    def break_channel(self, link: Link) -> None:
        self.world.break_link(link)

    @precondition(lambda self: self.faults)
    @rule(link=links, to_responder=st.booleans(),
          kind=st.sampled_from(["garbage", "replay", "wrong_sid", "wrong_nonce", "seq_gap", "oversized"]),
          junk=st.binary(max_size=40))
    def inject_signal(self, link: Link, to_responder: bool, kind: str, junk: bytes) -> None:
        """A malformed, replayed or mismatched message queued on a live channel."""
        to_node = link.resp_node if to_responder else link.ini_node
        sender = link.session(link.ini_node if to_responder else link.resp_node)
        last = sender.sent[-1] if sender is not None and sender.sent else None
        if kind == "garbage" or last is None:
            data = junk
        elif kind == "oversized":
            data = b"\x91" * (wire.MAX_SIGNAL_SIZE + 1)
        elif kind == "replay":
            data = wire.encode(last)
        elif kind == "wrong_sid":
            data = wire.encode(Signal(last.type, last.nonce, b"\xee" * wire.SID_SIZE, last.seq + 1, last.reason))
        elif kind == "wrong_nonce":
            data = wire.encode(Signal(last.type, (last.nonce ^ 0x77) or 1, last.sid, last.seq + 1, last.reason))
        else:
            data = wire.encode(Signal(last.type, last.nonce, last.sid, last.seq + 5, last.reason))
        self.world.inject_signal(link, to_node, data)

    @precondition(lambda self: self.faults)
    @rule(target=links, node=node_st, pair=st.one_of(st.none(), pairs),
          kind=st.sampled_from(["garbage", "lock", "not_lock"]), junk=st.binary(max_size=40))
    def open_bogus_channel(self, node: str, pair: PairRef | None, kind: str, junk: bytes) -> Link:
        """A channel to ``node`` opened by no local initiator: garbage, a LOCK from a peer that then
        vanishes (or for an unknown nonce), or a session that does not start with LOCK #1."""
        nonce = pair.nonce if pair is not None else 0xDEAD
        sid = (BOGUS_SID_TAG << 120 | len(self.world.links) + 1).to_bytes(wire.SID_SIZE, "big")
        if kind == "garbage":
            data = junk
        elif kind == "lock":
            data = wire.encode(Signal(SignalType.LOCK, nonce, sid, 1))
        else:
            data = wire.encode(Signal(SignalType.TAKE, nonce, sid, 1))
        return self.world.open_bogus(node, data)

    # --- liveness ---------------------------------------------------------------------------

    @rule()
    def heal_and_run(self) -> None:
        """Bounded liveness: stop all faults, deliver everything promptly, run 3 x lock_timeout."""
        self.world.heal_and_run(3 * self.world.config.lock_timeout)
        self.world.check()
        self.world.check_liveness()

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def spec_properties(self) -> None:
        """SpecTrace, AtomicTake, StrictSilence, CleanHandover, Symmetry, NoLeak (see World.check)."""
        self.world.check()

    def teardown(self) -> None:
        self.world.heal_and_run(3 * self.world.config.lock_timeout)
        self.world.check()
        self.world.check_liveness()
