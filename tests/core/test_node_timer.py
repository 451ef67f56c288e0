"""Node.earlier_timer: the driver's cheap re-arm never sleeps past a deadline.

A driver re-arms after every input. ``earlier_timer(armed)`` skips reading
the entries' scheduler unless some entry got a timer slot earlier than the
armed wake-up since the last read. These tests drive two nodes by hand
through random keepalive traffic, takes, removals and timers, with a driver
that re-arms only through ``earlier_timer`` the way ``AsyncPairPool`` does,
and check after every step that the armed wake-up is no later than the
earliest deadline ``get_timer`` reports.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from natpool import Node
from natpool.config import PairConfig
from natpool.core.node import CloseChannel, OpenChannel
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import HandoverError, LocalError

CFG = PairConfig(ping_interval=1.0, no_inbound_timeout=4.0, ping_lifespan=0.5, lock_timeout=0.7)
PAIRS = [EndpointPair(Endpoint("alice", "10.0.0.1", 4000 + i), Endpoint("bob", "10.0.0.2", 5000 + i), 0x100 + i)
         for i in range(8)]
FIRST = 4  # pairs both nodes hold from the start; the others are added by the plan


class Driver:
    """One node and what AsyncPairPool keeps for it: the armed wake-up, re-armed only via earlier_timer."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.armed: float | None = None
        self.reads = 0  # rounds that found an earlier deadline (or had none armed)

    def rearm(self) -> None:
        t = self.node.earlier_timer(self.armed)
        if t is not None:
            self.armed = t
            self.reads += 1

    def fire(self, now: float) -> None:
        if self.armed is not None and self.armed <= now:
            self.armed = None  # the wake-up ran: the next round reads the whole scheduler
            self.node.handle_timer(now)

    def check(self) -> None:
        real = self.node.get_timer()
        if real is not None:
            assert self.armed is not None and self.armed <= real, (self.armed, real)


class World:
    def __init__(self) -> None:
        self.now = 0.0
        self.a, self.b = Driver(Node("alice", CFG)), Driver(Node("bob", CFG))
        for i in range(FIRST):
            self.add(i)
        self.links: dict[tuple[int, int], tuple[Driver, int]] = {}  # (id(driver), channel) -> peer, channel
        self.round()

    def add(self, i: int) -> None:
        """Pair ``i`` on both nodes (a new entry pings at once: a slot earlier than any armed wake-up)."""
        for d, pinger in ((self.a, i % 2 == 0), (self.b, i % 2 == 1)):
            if PAIRS[i].nonce not in d.node:
                d.node.add(PAIRS[i], pinger, self.now)

    def drivers(self) -> tuple[Driver, Driver]:
        return self.a, self.b

    def peer(self, d: Driver) -> Driver:
        return self.b if d is self.a else self.a

    def round(self, check: bool = True) -> None:
        """What the driver does after any input: events, signals out, re-arm; then the invariant."""
        for d in self.drivers():
            for ev in d.node.drain_events():
                if type(ev) is OpenChannel:
                    far = self.peer(d)
                    far_id = far.node.new_channel_id(d.node.local_identity)
                    self.links[(id(d), ev.channel)] = (far, far_id)
                    self.links[(id(far), far_id)] = (d, ev.channel)
                elif type(ev) is CloseChannel:
                    self.links.pop((id(d), ev.channel), None)
            d.rearm()
        if check:
            for d in self.drivers():
                d.check()

    def carry_signals(self, drop: bool) -> None:
        for d in self.drivers():
            for channel, data in d.node.signals_to_send():
                link = self.links.get((id(d), channel))
                if link is not None and not drop:
                    link[0].node.receive_signal(link[1], data, self.now)

    def carry_datagrams(self, drop: bool) -> None:
        for d in self.drivers():
            far = self.peer(d)
            for nonce, data, _addr in d.node.datagrams_to_send(self.now):
                if not drop and nonce in far.node:
                    src = far.node.get(nonce).remote
                    far.node.receive_datagram(nonce, data, (src.host, src.port), self.now)


steps = st.one_of(
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=1.5)),
    st.tuples(st.just("take"), st.integers(0, len(PAIRS) - 1), st.booleans()),
    st.tuples(st.just("take_any"), st.booleans()),
    st.tuples(st.just("claim_any"), st.booleans()),
    st.tuples(st.just("signals"), st.booleans()),
    st.tuples(st.just("datagrams"), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, len(PAIRS) - 1), st.booleans()),
    st.tuples(st.just("cancel"), st.booleans()),
    st.tuples(st.just("add"), st.integers(0, len(PAIRS) - 1)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(steps, min_size=1, max_size=60))
def test_the_armed_wake_up_is_never_later_than_a_deadline(plan: list[tuple[object, ...]]) -> None:
    w = World()
    for step in plan:
        kind = step[0]
        if kind == "advance":
            assert isinstance(step[1], float)
            w.now += step[1]
            for d in w.drivers():
                d.fire(w.now)
        elif kind == "take":
            d = w.a if step[2] else w.b
            nonce = PAIRS[int(str(step[1]))].nonce
            try:
                d.node.start_take(nonce, now=w.now)
            except (HandoverError, LocalError):
                pass  # busy, gone, or not Idle: nothing changed
        elif kind == "take_any":  # take_any's claim has a fast path of its own (the pool's claim_any)
            d = w.a if step[1] else w.b
            try:
                d.node.start_take(peer=w.peer(d).node.local_identity, now=w.now)
            except (HandoverError, LocalError):
                pass
        elif kind == "claim_any":  # a bare claim, no session: only the entry's own slot holds its lock timeout
            d = w.a if step[1] else w.b
            try:
                d.node.claim_any(w.peer(d).node.local_identity, w.now)
            except (HandoverError, LocalError):
                pass
        elif kind == "signals":
            w.carry_signals(drop=bool(step[1]))
        elif kind == "datagrams":
            w.carry_datagrams(drop=bool(step[1]))
        elif kind == "remove":
            d = w.a if step[2] else w.b
            nonce = PAIRS[int(str(step[1]))].nonce
            if nonce in d.node:
                try:
                    d.node.remove(nonce, w.now)
                except LocalError:
                    pass  # owned by a handover
        elif kind == "add":
            w.add(int(str(step[1])))
        elif kind == "cancel":
            d = w.a if step[1] else w.b
            for channel in list(d.node.sessions()):
                d.node.cancel(channel, w.now)
        w.round()


def test_a_round_that_moves_no_deadline_earlier_reads_no_scheduler() -> None:
    """The point of it: a round with no earlier slot is answered from the sessions alone."""
    w = World()
    node = w.a.node
    before = w.a.reads
    calls = 0
    real = node.pool._earliest

    def counting() -> float | None:
        nonlocal calls
        calls += 1
        return real()

    node.pool._earliest = counting  # type: ignore[method-assign]
    for _ in range(5):
        w.round(check=False)  # nothing happened: every deadline is where it was
    assert calls == 0 and w.a.reads == before
    w.now += 0.01
    w.a.node.start_take(PAIRS[1].nonce, now=w.now)  # a ponger's claim: its lock timeout is a new, later slot
    w.round(check=False)
    assert calls == 0  # later than the armed ping: still no read
    del node.pool._earliest
    w.a.check()
    w.now = w.a.armed if w.a.armed is not None else w.now
    w.a.fire(w.now)  # the wake-up ran: the next round reads again
    node.pool._earliest = counting  # type: ignore[method-assign]
    w.round(check=False)
    assert calls == 1 and w.a.reads == before + 1


def test_a_bare_claim_brings_the_wake_up_forward_to_its_lock_timeout() -> None:
    """take_any's claim slots its lock timeout on a fast path of its own; the re-arm must still see it."""
    node = Node("bob", CFG)
    node.add(PAIRS[0], False, 0.0)  # a ponger: its only deadline is liveness, 4 s out
    driver = Driver(node)
    driver.rearm()
    assert driver.armed == CFG.no_inbound_timeout
    node.claim_any("alice", 1.0)  # InLocking: the lock times out at 1.7, before the armed 4.0
    node.drain_events()
    driver.rearm()
    assert driver.armed == 1.0 + CFG.lock_timeout
    driver.check()
