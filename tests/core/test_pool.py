"""PairPool: validation, indexes, CAS claims (also across real threads) and the shared scheduler."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.config import PairConfig
from natpool.core.entry import Drained, ExpiryReason, PairEntry, StateChanged
from natpool.core.pool import PairPool
from natpool.endpoints import NONCE_MAX, Endpoint, EndpointPair
from natpool.errors import DropReason, DuplicateNonce, EventBacklog, InvalidPair, PairBusy, UnknownPair
from natpool.wire.frame import Frame, Kind, encode

CFG = PairConfig(lock_timeout=PairConfig().no_inbound_timeout - PairConfig().ping_interval)


def ep(identity: str, port: int, host: str = "127.0.0.1") -> Endpoint:
    return Endpoint(identity, host, port)


def pair(nonce: int, peer: str = "bob", port: int = 0) -> EndpointPair:
    base = 20000 + 2 * (nonce % 10000) + port
    return EndpointPair(ep("alice", base), ep(peer, base + 1), nonce)


def snapshot(pool: PairPool) -> tuple[object, ...]:
    """Everything observable about the pool, to show a rejected add changed nothing."""
    return (
        len(pool),
        sorted(e.nonce for e in pool.entries()),
        pool.idle_count(),
        pool.get_timer(),
        dict(pool.drops),
    )


def drain_events(pool: PairPool) -> list[StateChanged | Drained]:
    out: list[StateChanged | Drained] = []
    while (ev := pool.next_event()) is not None:
        out.append(ev)
    return out


# --- add / get / entries / remove -------------------------------------------------------

BAD_PAIRS: list[tuple[str, EndpointPair, type[Exception]]] = [
    ("zero-nonce", EndpointPair(ep("alice", 1000), ep("bob", 1001), 0), InvalidPair),
    ("nonce-too-big", EndpointPair(ep("alice", 1000), ep("bob", 1001), NONCE_MAX + 1), InvalidPair),
    ("negative-nonce", EndpointPair(ep("alice", 1000), ep("bob", 1001), -5), InvalidPair),
    ("duplicate", EndpointPair(ep("alice", 3000), ep("carol", 3001), 7), DuplicateNonce),
    ("not-local", EndpointPair(ep("carol", 1000), ep("bob", 1001), 99), InvalidPair),
    ("same-identity", EndpointPair(ep("alice", 1000), ep("alice", 1001), 99), InvalidPair),
    ("bad-host", EndpointPair(ep("alice", 1000), ep("bob", 1001, host="example.com"), 99), InvalidPair),
    ("bad-port", EndpointPair(ep("alice", 0), ep("bob", 1001), 99), InvalidPair),
    ("port-too-big", EndpointPair(ep("alice", 1000), ep("bob", 70000), 99), InvalidPair),
    ("empty-identity", EndpointPair(ep("alice", 1000), ep("", 1001), 99), InvalidPair),
    ("str-port", EndpointPair(ep("alice", 1000), ep("bob", "1001"), 99), InvalidPair),  # type: ignore[arg-type]
    ("float-port", EndpointPair(ep("alice", 1000), ep("bob", 1001.5), 99), InvalidPair),  # type: ignore[arg-type]
    ("bool-port", EndpointPair(ep("alice", 1000), ep("bob", True), 99), InvalidPair),
    ("int-identity", EndpointPair(ep("alice", 1000), ep(5, 1001), 99), InvalidPair),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("bad", "error"), [(p, e) for _, p, e in BAD_PAIRS], ids=[n for n, _, _ in BAD_PAIRS])
def test_rejected_add_raises_typed_error_and_changes_nothing(bad: EndpointPair, error: type[Exception]) -> None:
    pool = PairPool("alice", CFG)
    pool.add(pair(7), is_pinger=True, now=0.0)
    before = snapshot(pool)
    with pytest.raises(error):
        pool.add(bad, is_pinger=True, now=1.0)
    assert snapshot(pool) == before
    assert pool.entries("carol") == []


def test_add_get_entries_by_peer() -> None:
    pool = PairPool("alice", CFG)
    e1 = pool.add(pair(1, "bob"), True, 0.0)
    e2 = pool.add(pair(2, "carol"), False, 0.0)
    e3 = pool.add(pair(3, "bob"), True, 0.0)
    assert isinstance(e1, PairEntry)
    assert (e1.state, e1.is_pinger, e1.remote.identity, e1.local.identity) == ("Idle", True, "bob", "alice")
    assert pool.get(2) is e2
    assert pool.entries("bob") == [e1, e3]
    assert pool.entries("carol") == [e2]
    assert pool.entries("dave") == []
    assert sorted(e.nonce for e in pool.entries()) == [1, 2, 3]
    assert len(pool) == 3 and 2 in pool and 4 not in pool
    with pytest.raises(UnknownPair):
        pool.get(4)


def test_remove_expires_closed_and_drops_the_entry() -> None:
    pool = PairPool("alice", CFG)
    e = pool.add(pair(1), True, 0.0)
    pool.add(pair(2), True, 0.0)
    assert pool.remove(1, 2.0) is e
    assert e.state == "Expired"
    assert 1 not in pool and [x.nonce for x in pool.entries("bob")] == [2]
    assert drain_events(pool) == [StateChanged(1, "Idle", "Expired", "expire", ExpiryReason.CLOSED, 2.0)]
    with pytest.raises(UnknownPair):
        pool.remove(1, 3.0)
    pool.remove(2, 3.0)
    assert pool.entries("bob") == [] and len(pool) == 0
    assert pool.get_timer() is None
    assert pool.datagrams_to_send(3.0) == []


def test_expired_entries_leave_the_pool_by_themselves() -> None:
    pool = PairPool("alice", CFG)
    pool.add(pair(1), True, 0.0)  # nobody ever answers
    t = pool.get_timer()
    while t is not None:
        pool.datagrams_to_send(t)
        pool.handle_timer(t)
        t = pool.get_timer()
    assert len(pool) == 0 and pool.entries("bob") == [] and pool.idle_count("bob") == 0
    assert drain_events(pool) == [
        StateChanged(1, "Idle", "Expired", "expire", ExpiryReason.NO_INBOUND, CFG.no_inbound_timeout)
    ]
    with pytest.raises(PairBusy):
        pool.claim_any("bob", 30.0)


def test_entry_driven_directly_keeps_the_pool_in_step() -> None:
    pool = PairPool("alice", CFG)
    e = pool.add(pair(1), False, 0.0)
    with pool.lock:  # what a handover session does
        assert e.begin_lock(1.0)
        assert e.finish_lock(1.0)
        assert e.use(1.0)
    assert pool.idle_count("bob") == 0
    assert pool.get_timer() is None  # InUse: nothing to schedule
    with pool.lock:
        e.expire(ExpiryReason.CLOSED, 2.0)
    assert len(pool) == 0
    assert [ev.target for ev in drain_events(pool) if isinstance(ev, StateChanged)] == [
        "InLocking", "Locked", "InUse", "Expired"
    ]


# --- claim --------------------------------------------------------------------------


def test_claim_is_a_cas() -> None:
    pool = PairPool("alice", CFG)
    e = pool.add(pair(1), True, 0.0)
    assert pool.claim(1, 1.0) is e
    assert e.state == "InLocking"
    with pytest.raises(PairBusy):
        pool.claim(1, 1.0)
    with pytest.raises(UnknownPair):
        pool.claim(2, 1.0)
    with pytest.raises(PairBusy):
        pool.claim_any("bob", 1.0)
    with pool.lock:
        e.abort_lock(1.5)
    assert pool.claim_any("bob", 2.0) is e


def test_claim_any_never_returns_the_same_pair_twice() -> None:
    pool = PairPool("alice", CFG)
    for n in range(1, 21):
        pool.add(pair(n, "bob" if n % 2 else "carol"), n % 3 == 0, 0.0)
    got = []
    while True:
        try:
            got.append(pool.claim_any("bob", 1.0).nonce)
        except PairBusy:
            break
    assert got == list(range(1, 21, 2))  # longest idle first, each once
    assert pool.idle_count("bob") == 0 and pool.idle_count("carol") == 10


def test_claim_any_order_after_abort_and_claim() -> None:
    pool = PairPool("alice", CFG)
    for n in (1, 2, 3):
        pool.add(pair(n), False, 0.0)
    pool.claim(2, 1.0)  # claimed by nonce: leaves the idle index
    e1 = pool.claim_any("bob", 1.0)
    assert e1.nonce == 1
    with pool.lock:
        e1.abort_lock(1.1)  # back to Idle: now the most recently idle
    assert [pool.claim_any("bob", 2.0).nonce for _ in range(2)] == [3, 1]


def test_claim_any_events_are_the_general_claims_events() -> None:
    """take_any's inline claim queues markers; next_event hands out the same typed events as begin_lock's."""
    inline, general = PairPool("alice", CFG), PairPool("alice", CFG)
    for p in (inline, general):
        for n in (1, 2):
            p.add(pair(n), False, 0.0)
        drain_events(p)
    inline.claim_any("bob", 1.5)
    inline.claim_any("bob", 2.5)
    assert inline.pending_events == 4  # two per claim, counted for backpressure as before
    first, second = general.get(1), general.get(2)
    with general.lock:
        first.begin_lock(1.5)
        second.begin_lock(2.5)
    got, want = drain_events(inline), drain_events(general)
    assert got == want == [
        StateChanged(1, "Idle", "InLocking", "begin_lock", None, 1.5), Drained(1, 1.5),
        StateChanged(2, "Idle", "InLocking", "begin_lock", None, 2.5), Drained(2, 2.5),
    ]
    assert [type(e) for e in got] == [StateChanged, Drained, StateChanged, Drained]
    assert inline.next_event() is None


def race(n_threads: int, work: Callable[[], PairEntry]) -> tuple[list[PairEntry], int]:
    """Start ``n_threads`` at once on ``work``; return winners and the number of PairBusy losers."""
    barrier = threading.Barrier(n_threads)
    winners: list[PairEntry] = []
    busy: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            winners.append(work())
        except PairBusy:
            busy.append(1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return winners, len(busy)


def test_claim_exactly_one_winner_across_threads() -> None:
    pool = PairPool("alice", CFG)
    entry = pool.add(pair(1), True, 0.0)
    for round_ in range(25):
        now = float(round_)
        winners, busy = race(8, lambda: pool.claim(1, now))  # noqa: B023 - joined before the next round
        assert winners == [entry] and busy == 7
        with pool.lock:
            entry.abort_lock(now + 0.5)


def test_claim_any_distinct_winners_across_threads() -> None:
    for _ in range(10):
        pool = PairPool("alice", CFG)
        for n in range(1, 4):
            pool.add(pair(n), n == 2, 0.0)
        winners, busy = race(8, lambda: pool.claim_any("bob", 1.0))  # noqa: B023 - pool is per round
        assert sorted(e.nonce for e in winners) == [1, 2, 3] and busy == 5
        assert all(e.state == "InLocking" for e in winners)


# --- sans-IO driving and the scheduler ------------------------------------------------


def test_two_pools_keep_each_other_alive() -> None:
    pa, pb = PairPool("alice", CFG), PairPool("bob", CFG)
    for n in range(1, 6):
        pa.add(pair(n), True, 0.0)
        pb.add(pair(n), False, 0.0)
    sources = {id(pa): {n: pair(n).a.addr for n in range(1, 6)}, id(pb): {n: pair(n).b.addr for n in range(1, 6)}}
    now, exchanged = 0.0, 0
    while now <= 120.0:
        for _ in range(2):  # ping one way, pong back; arrivals are stamped 1 ms after the send step
            for src, dst in ((pa, pb), (pb, pa)):
                for nonce, data, to in src.datagrams_to_send(now):
                    assert to == sources[id(dst)][nonce]
                    dst.receive_datagram(nonce, data, sources[id(src)][nonce], now + 0.001)
                    exchanged += 1
            now += 0.001
        timers = [t for t in (pa.get_timer(), pb.get_timer()) if t is not None]
        now = max(now, min(timers))
        pa.handle_timer(now)
        pb.handle_timer(now)
    pings = int(120.0 / CFG.ping_interval) + 1  # at 0, 1 interval, ..., 120 s
    assert exchanged == 2 * 5 * pings  # each ping answered
    assert len(pa) == len(pb) == 5
    assert all(e.state == "Idle" and e.last_seen > 115.0 for e in pa.entries() + pb.entries())
    assert all(e.srtt == pytest.approx(0.001) for e in pa.entries())  # both arrivals stamped now + 1 ms
    assert drain_events(pa) == drain_events(pb) == []
    assert pa.drops == pb.drops == {}


def test_pool_drops_aggregate_entry_drops_and_unknown_nonces() -> None:
    pool = PairPool("alice", CFG)
    e = pool.add(pair(1), True, 0.0)
    remote = e.remote.addr
    pool.receive_datagram(1, b"junk", remote, 0.1)
    pool.receive_datagram(1, encode(Frame(7, Kind.PING)), ("127.0.0.1", 9), 0.1)
    pool.receive_datagram(1, encode(Frame(1, Kind.PING)), ("127.0.0.1", 9), 0.1)  # its own frame, elsewhere
    pool.receive_datagram(42, encode(Frame(42, Kind.PONG)), remote, 0.1)
    assert pool.drops == {DropReason.MALFORMED: 1, DropReason.FOREIGN_ADDRESS: 1, DropReason.ADDRESS_MISMATCH: 1,
                          DropReason.WRONG_NONCE: 1}
    assert e.stats.drops == {DropReason.MALFORMED: 1, DropReason.FOREIGN_ADDRESS: 1, DropReason.ADDRESS_MISMATCH: 1}
    assert e.seen_from == ("127.0.0.1", 9)
    pool.remove(1, 0.2)
    assert sum(pool.drops.values()) == 4  # counts outlive the entry


def test_send_failures_through_the_pool() -> None:
    pool = PairPool("alice", CFG)
    pool.add(pair(1), True, 0.0)
    for _ in range(CFG.max_send_failures):
        pool.send_failed(1, 0.5)
    assert len(pool) == 0
    pool.send_failed(1, 0.6)  # stale report: ignored
    last = drain_events(pool)[-1]
    assert isinstance(last, StateChanged) and last.reason is ExpiryReason.SEND_FAILURES


def test_get_timer_is_the_minimum_deadline() -> None:
    pool = PairPool("alice", CFG)
    entries = [pool.add(pair(n), n % 2 == 0, float(n)) for n in range(1, 9)]
    pool.datagrams_to_send(10.0)
    assert pool.get_timer() == min(t for e in entries if (t := e.get_timer()) is not None)
    pool.claim(2, 10.0)
    pool.remove(1, 10.0)
    assert pool.get_timer() == min(t for e in pool.entries() if (t := e.get_timer()) is not None)


def test_handle_timer_only_touches_due_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = PairPool("alice", CFG)
    for n in range(1, 7):
        pool.add(pair(n), False, float(n))  # pongers: only the no-inbound deadline, at n + timeout
    t = CFG.no_inbound_timeout
    touched: list[int] = []
    original = PairEntry.handle_timer

    def spy(self: PairEntry, now: float) -> None:
        touched.append(self.nonce)
        original(self, now)

    monkeypatch.setattr(PairEntry, "handle_timer", spy)
    assert pool.get_timer() == t + 1
    pool.handle_timer(t + 0.5)
    assert touched == []
    pool.handle_timer(t + 3)
    assert sorted(touched) == [1, 2, 3]
    assert sorted(e.nonce for e in pool.entries()) == [4, 5, 6]
    assert pool.get_timer() == t + 4
    touched.clear()
    pool.handle_timer(t + 4 - 0.0005)  # an early-firing loop timer still counts (1 ms slack)
    assert touched == [4]


def test_scheduler_heap_stays_bounded_under_re_arming() -> None:
    # ping_interval 2 ms: the pong rate limit (PONGS_PER_INTERVAL per interval) admits this ping flood.
    pool = PairPool("alice", PairConfig(ping_interval=0.002, no_inbound_timeout=3.0, lock_timeout=2.0))
    pool.add(pair(1), False, 0.0)
    ping = encode(Frame(1, Kind.PING))
    remote = pair(1).b.addr
    for i in range(5000):
        pool.receive_datagram(1, ping, remote, i * 0.001)  # each one moves the deadline
        pool.datagrams_to_send(i * 0.001)
    assert pool.get(1).stats.received == 5000
    assert len(pool._heap) + len(pool._fifo) + len(pool._fifo2) <= 2 * len(pool) + 1024
    assert pool.get_timer() == pytest.approx(4.999 + 3.0)


# --- index consistency, property style ---------------------------------------------------

POOL_OPS = st.lists(
    st.tuples(st.sampled_from(["add", "claim", "claim_any", "abort", "finish", "use", "remove", "tick"]),
              st.integers(1, 6), st.sampled_from(["bob", "carol"]), st.floats(0.0, 4.0)),
    max_size=30,
)


@given(POOL_OPS)
def test_indexes_follow_every_transition(ops: list[tuple[str, int, str, float]]) -> None:
    cfg = PairConfig(ping_interval=2.0, no_inbound_timeout=6.0, lock_timeout=5.0)
    pool = PairPool("alice", cfg)
    now = 0.0
    for op, n, peer, dt in ops:
        now += dt
        if op == "add":
            if n not in pool:
                pool.add(pair(n, peer), n % 2 == 0, now)
        elif op == "claim":
            if n in pool:
                state = pool.get(n).state
                try:
                    pool.claim(n, now)
                    assert state == "Idle"
                except PairBusy:
                    assert state != "Idle"
        elif op == "claim_any":
            idle = [e.nonce for e in pool.entries(peer) if e.state == "Idle"]
            try:
                assert pool.claim_any(peer, now).nonce in idle
            except PairBusy:
                assert idle == []
        elif op == "tick":
            pool.handle_timer(now)
            pool.datagrams_to_send(now)
        elif n in pool:
            e = pool.get(n)
            with pool.lock:
                if op == "abort" and e.state == "InLocking":
                    e.abort_lock(now)
                elif op == "finish":
                    e.finish_lock(now)
                elif op == "use":
                    e.use(now)
            if op == "remove":
                pool.remove(n, now)
        for p in ("bob", "carol"):
            live = pool.entries(p)
            assert all(e.state != "Expired" and e.remote.identity == p for e in live)
            assert pool.idle_count(p) == sum(e.state == "Idle" for e in live)
        timers = [t for e in pool.entries() if (t := e.get_timer()) is not None]
        assert pool.get_timer() == (min(timers) if timers else None)


def test_a_deadline_moving_later_costs_no_heap_push_and_stays_exact() -> None:
    # ping_interval 2 ms: the pong rate limit (PONGS_PER_INTERVAL per interval) admits this ping flood.
    pool = PairPool("alice", PairConfig(ping_interval=0.002, no_inbound_timeout=3.0, lock_timeout=2.0))
    pool.add(pair(1), False, 0.0)
    ping = encode(Frame(1, Kind.PING))
    remote = pair(1).b.addr
    for i in range(100):
        assert pool.receive_and_reply(1, ping, remote, i * 0.01) == [(encode(Frame(1, Kind.PONG)), remote)]
    assert len(pool._heap) + len(pool._fifo) == 1  # the slot armed at add() (3.0) was kept, not re-pushed per ping
    assert not pool.has_pending_output()
    assert pool.get_timer() == pytest.approx(0.99 + 3.0)  # still exact: the old slot is re-slotted on demand
    pool.handle_timer(3.0)  # the old slot's time: nothing is due
    assert pool.get(1).state == "Idle" and pool.next_event() is None
    pool.handle_timer(0.99 + 3.0)
    assert 1 not in pool


# --- the event queue: bounded by backpressure, never by loss -----------------------------------


def test_a_full_event_queue_refuses_inputs_until_drained_and_loses_nothing() -> None:
    pool = PairPool("alice", CFG, max_pending_events=3)
    for n in (1, 2, 3):
        pool.add(pair(n), False, 0.0)
    pool.claim(1, 1.0)  # StateChanged + Drained (the ponger has nothing outstanding)
    pool.claim(2, 1.0)
    assert pool.pending_events == 4
    before = snapshot(pool)
    ping = encode(Frame(3, Kind.PING))
    entry = pool.get(3)
    calls: list[Callable[[], object]] = [
        lambda: pool.claim(3, 1.1),
        lambda: pool.claim_any("bob", 1.1),
        lambda: pool.receive_datagram(3, ping, entry.remote.addr, 1.1),
        lambda: pool.receive_and_reply(3, ping, entry.remote.addr, 1.1),
        lambda: pool.handle_timer(1.1),
    ]
    for call in calls:
        with pytest.raises(EventBacklog):
            call()
    assert snapshot(pool) == before and entry.state == "Idle" and entry.stats.received == 0
    events = drain_events(pool)
    assert [(type(e).__name__, e.nonce) for e in events] == [
        ("StateChanged", 1), ("Drained", 1), ("StateChanged", 2), ("Drained", 2)]
    assert pool.receive_and_reply(3, ping, entry.remote.addr, 1.2)  # accepted again: the pong
    pool.remove(1, 1.3)  # removal is never refused, even past the bound
    pool.remove(2, 1.3)
    pool.remove(3, 1.3)
    assert pool.pending_events == 3
    assert [e.nonce for e in drain_events(pool)] == [1, 2, 3]


# --- bounded timer batches (a driver keeps one callback short when thousands are due) -----------


def test_handle_timer_runs_at_most_max_entries_earliest_first_and_leaves_the_rest_due() -> None:
    cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=3.0, lock_timeout=2.0)
    pool = PairPool("alice", cfg)
    for n in range(1, 11):
        pool.add(pair(n), False, n * 0.01)  # no-inbound deadlines 3.01 .. 3.10, in nonce order
    pool.add(pair(99), False, 5.0)  # not due at 4.0
    expired: list[int] = []

    def drain() -> None:
        while (ev := pool.next_event()) is not None:
            if isinstance(ev, StateChanged) and ev.target == "Expired":
                expired.append(ev.nonce)

    pool.handle_timer(4.0, max_entries=4)
    drain()
    assert expired == [1, 2, 3, 4]  # the four earliest deadlines, in deadline order
    timer = pool.get_timer()
    assert timer is not None and timer <= 4.0  # the rest are still due: the driver calls again at once
    pool.handle_timer(4.0, max_entries=4)
    pool.handle_timer(4.0, max_entries=4)
    drain()
    assert expired == list(range(1, 11))
    assert 99 in pool and pool.get(99).state == "Idle"  # never touched: not due
    assert pool.get_timer() == pytest.approx(8.0)


@given(st.lists(st.tuples(st.integers(1, 8), st.floats(0.0, 3.0), st.booleans()), min_size=1, max_size=40),
       st.integers(1, 4))
def test_timer_slots_out_of_order_and_batched_stay_exact(ops: list[tuple[int, float, bool]], batch: int) -> None:
    """Deadlines pushed out of order (heap) and in order (FIFO), some moved later, some earlier:
    ``get_timer`` is always the earliest entry deadline, and batched ``handle_timer`` calls repeated
    until nothing is due run exactly the entries an unbatched call would."""
    cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=3.0, lock_timeout=1.5)
    a, b = PairPool("alice", cfg), PairPool("alice", cfg)
    now = 0.0
    for n, dt, claim in ops:
        now += dt
        for p in (a, b):
            if n not in p:
                p.add(pair(n), n % 2 == 0, now)
            elif claim and p.get(n).state == "Idle":
                p.claim(n, now)
        a.handle_timer(now)
        while (t := b.get_timer()) is not None and t <= now + 0.001:
            b.handle_timer(now, max_entries=batch)
        for p in (a, b):
            timers = [t for e in p.entries() if (t := e.get_timer()) is not None]
            assert p.get_timer() == (min(timers) if timers else None)
            p.datagrams_to_send(now)
        assert {e.nonce: e.state for e in a.entries()} == {e.nonce: e.state for e in b.entries()}


def test_drain_events_hands_out_what_next_event_would_in_one_call() -> None:
    """The batch drain expands take_any's claim markers exactly as next_event does, and empties the queue."""
    batched, single = PairPool("alice", CFG), PairPool("alice", CFG)
    for p in (batched, single):
        for n in (1, 2, 3):
            p.add(pair(n), False, 0.0)
        p.claim_any("bob", 1.5)  # markers
        third = p.get(3)
        with p.lock:
            third.begin_lock(2.0)  # a general claim's typed events in between
        p.claim_any("bob", 2.5)  # markers again
    want = drain_events(single)
    got = batched.drain_events()
    assert got == want and [type(e) for e in got] == [type(e) for e in want]
    assert len(got) == 6 and batched.pending_events == 0 and batched.drain_events() == []
    assert batched.next_event() is None


def test_drain_events_after_next_event_took_a_claims_first_half() -> None:
    """A Drained marker left at the head (its StateChanged taken by next_event) still gets its claim's payload."""
    pool = PairPool("alice", CFG)
    pool.add(pair(1), False, 0.0)
    drain_events(pool)
    pool.claim_any("bob", 1.5)
    assert pool.next_event() == StateChanged(1, "Idle", "InLocking", "begin_lock", None, 1.5)
    assert pool.drain_events() == [Drained(1, 1.5)]


def test_scheduler_stays_bounded_under_claim_abort_churn() -> None:
    # A claim's lock slot is earlier than the Idle deadline it replaces, so each claim pushes one; its abort
    # moves the deadline later, which pushes nothing. With no timer read in between, only the stale-slot
    # check bounds the containers, and claims do not count towards it: becoming Idle does.
    pool = PairPool("alice", PairConfig(ping_interval=2.0, no_inbound_timeout=6.0, lock_timeout=0.5))
    n = 10
    for i in range(1, n + 1):
        pool.add(pair(i), False, 0.0)
    now = 0.0
    for _ in range(5000):
        now += 1e-6
        entry = pool.claim_any("bob", now)
        with pool.lock:
            entry.abort_lock(now)
        pool.drain_events()
    assert len(pool._heap) + len(pool._fifo) + len(pool._fifo2) <= 3 * n + 1024 + 2 * 256
    assert pool.get_timer() == min(t for e in pool.entries() if (t := e.get_timer()) is not None)


@pytest.mark.parametrize("first", ["claim", "claim_any"])
def test_claims_whose_clocks_cross_keep_the_timer_exact(first: str) -> None:
    # Two threads read the clock, then race for the lock: the later reading may claim first. Its lock slot
    # goes to the claims' FIFO; the earlier reading's slot must not be appended behind it.
    pool = PairPool("alice", PairConfig(ping_interval=2.0, no_inbound_timeout=6.0, lock_timeout=2.0))
    for i in (1, 2, 3):
        pool.add(pair(i), False, 0.0)
    late = pool.claim(3, 1.01) if first == "claim" else pool.claim_any("bob", 1.01)  # general push / own append
    early = pool.claim_any("bob", 1.0)
    assert pool.get_timer() == 3.0
    pool.handle_timer(3.0)
    assert (early.state, late.state) == ("Idle", "InLocking")  # the lock timeout of the earlier one only
    assert pool.get_timer() == 3.01
