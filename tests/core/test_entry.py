"""PairEntry: keepalive, drain, silence, timers and drops, driven with explicit ``now`` values."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from statemachine.exceptions import TransitionNotAllowed

from natpool.config import PairConfig
from natpool.core.entry import Drained, ExpiryReason, PairEntry, StateChanged
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, InvalidState
from natpool.machines import EntryMachine
from natpool.machines.tables import ENTRY
from natpool.wire.frame import Frame, Kind, decode, encode

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
NONCE = 0x1234
PAIR = EndpointPair(ALICE, BOB, NONCE)
# Long lock timeout so that it never interferes unless a test is about it.
CFG = PairConfig(lock_timeout=PairConfig().no_inbound_timeout - PairConfig().ping_interval)
PING = encode(Frame(NONCE, Kind.PING))
PONG = encode(Frame(NONCE, Kind.PONG))


def make(
    is_pinger: bool = True, cfg: PairConfig = CFG, now: float = 0.0, listeners: tuple[object, ...] = ()
) -> PairEntry:
    """Alice's side when pinger, Bob's side when ponger (so they can be wired together)."""
    return PairEntry(PAIR, "alice" if is_pinger else "bob", is_pinger, cfg, now, listeners)


def state(entry: PairEntry) -> str:
    """The state, read afresh (keeps mypy from narrowing ``entry.state`` across calls)."""
    return entry.state


def events(entry: PairEntry) -> list[StateChanged | Drained]:
    out: list[StateChanged | Drained] = []
    while (ev := entry.next_event()) is not None:
        out.append(ev)
    return out


Drop = Callable[[PairEntry, bytes], bool]


class Wire:
    """Two entries back to back with a fixed one-way delay and an optional loss rule."""

    def __init__(self, a: PairEntry, b: PairEntry, delay: float = 0.01, drop: Drop | None = None) -> None:
        self.a, self.b = a, b
        self.delay = delay
        self.drop = drop
        self.now = 0.0
        self.sent: list[tuple[float, str, str, bytes]] = []  # (time, sender, sender state, data)
        self._inflight: list[tuple[float, int, PairEntry, bytes, tuple[str, int]]] = []
        self._seq = itertools.count()

    def _flush(self) -> None:
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            for data, addr in src.datagrams_to_send(self.now):
                assert addr == dst.local.addr
                self.sent.append((self.now, src.local.identity, src.state, data))
                if self.drop is None or not self.drop(src, data):
                    heapq.heappush(self._inflight, (self.now + self.delay, next(self._seq), dst, data, src.local.addr))

    def run(self, until: float) -> None:
        for _ in range(100_000):
            self._flush()
            times = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
            if self._inflight:
                times.append(self._inflight[0][0])
            if not times or min(times) > until:
                break
            self.now = max(self.now, min(times))
            while self._inflight and self._inflight[0][0] <= self.now:
                _, _, dst, data, addr = heapq.heappop(self._inflight)
                dst.receive_datagram(data, addr, self.now)
            for e in (self.a, self.b):
                t = e.get_timer()
                if t is not None and t <= self.now:
                    e.handle_timer(self.now)
        else:  # pragma: no cover
            raise AssertionError("wire did not settle: a timer is not advancing")
        self.now = until
        self._flush()


def drop_kind(kind: Kind) -> Drop:
    return lambda _src, data: decode(data).kind is kind


# --- keepalive ---------------------------------------------------------------------


def test_first_ping_is_sent_at_creation() -> None:
    a = make(now=3.0)
    assert a.outstanding == 1
    assert a.datagrams_to_send(3.0) == [(PING, BOB.addr)]
    assert a.datagrams_to_send(3.0) == []
    assert a.get_timer() == pytest.approx(3.0 + min(CFG.ping_interval, CFG.ping_lifespan))  # next ping or lifespan


def test_ponger_sends_nothing_unprompted() -> None:
    b = make(is_pinger=False)
    assert b.datagrams_to_send(0.0) == []
    assert b.outstanding == 0
    assert b.get_timer() == CFG.no_inbound_timeout


def test_keepalive_keeps_both_idle_and_refreshes_last_seen() -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b, delay=0.01)
    wire.run(300.05)
    assert a.state == b.state == "Idle"
    assert a.last_seen == pytest.approx(300.02)
    assert b.last_seen == pytest.approx(300.01)
    assert a.srtt == pytest.approx(0.02)
    pings = [d for _, who, _, d in wire.sent if who == "alice"]
    pongs = [d for _, who, _, d in wire.sent if who == "bob"]
    n = int(300.0 / CFG.ping_interval) + 1  # t = 0, 1 interval, ..., 300
    assert len(pings) == len(pongs) == n
    assert set(pings) == {PING} and set(pongs) == {PONG}
    assert a.stats.sent == b.stats.received == n
    assert a.outstanding == 0
    assert events(a) == events(b) == []


def test_pings_follow_the_interval() -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b, delay=0.01)
    wire.run(4 * CFG.ping_interval)
    times = [t for t, who, _, _ in wire.sent if who == "alice"]
    assert times == pytest.approx([k * CFG.ping_interval for k in range(5)])


def test_no_pong_pinger_expires_no_inbound() -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b, drop=drop_kind(Kind.PONG))
    wire.run(CFG.no_inbound_timeout - 0.5)
    assert a.state == "Idle"
    assert a.last_seen == 0.0
    assert a.stats.ping_timeouts >= 3
    wire.run(CFG.no_inbound_timeout + 1.0)
    assert state(a) == "Expired"
    assert events(a) == [StateChanged(NONCE, "Idle", "Expired", "expire", ExpiryReason.NO_INBOUND,
                                      CFG.no_inbound_timeout)]
    assert b.state == "Idle"  # b still hears pings (until a went silent)
    assert a.get_timer() is None


def test_lost_pings_expire_the_ponger() -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b, drop=drop_kind(Kind.PING))
    wire.run(CFG.no_inbound_timeout + 1.0)
    assert b.state == "Expired"
    ev = events(b)
    assert isinstance(ev[-1], StateChanged) and ev[-1].reason is ExpiryReason.NO_INBOUND


@pytest.mark.parametrize("locked_side", ["pinger", "ponger"])
def test_locking_one_side_makes_the_silent_remote_expire(locked_side: str) -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b, delay=0.01)
    wire.run(12.0)
    side, other = (a, b) if locked_side == "pinger" else (b, a)
    assert side.begin_lock(12.0)
    wire.run(12.5)
    assert side.finish_lock(12.5)
    assert side.use(12.5)  # InUse: silent for good (a Locked entry would expire at lock_timeout first)
    wire.run(60.0)
    assert side.state == "InUse"
    assert other.state == "Expired"
    last = events(other)[-1]
    assert isinstance(last, StateChanged) and last.reason is ExpiryReason.NO_INBOUND
    assert last.at == pytest.approx(other.last_seen + CFG.no_inbound_timeout)
    assert all(t < 12.5 for t, who, _, _ in wire.sent if who == side.local.identity)


# --- drain -------------------------------------------------------------------------


def test_finish_lock_waits_for_the_outstanding_pong() -> None:
    a, b = make(), make(is_pinger=False)
    ping = a.datagrams_to_send(0.0)
    b.receive_datagram(ping[0][0], ALICE.addr, 0.01)
    assert a.begin_lock(0.015)
    assert events(a) == [StateChanged(NONCE, "Idle", "InLocking", "begin_lock", None, 0.015)]
    assert not a.drained
    assert not a.finish_lock(0.015)
    assert a.state == "InLocking"
    assert a.datagrams_to_send(0.015) == []  # the InLocking pinger starts no new ping
    for data, _ in b.datagrams_to_send(0.01):
        a.receive_datagram(data, BOB.addr, 0.02)
    assert a.drained
    assert events(a) == [Drained(NONCE, 0.02)]
    assert a.finish_lock(0.02)
    assert a.state == "Locked"


def test_lost_pong_times_out_within_the_drain_grace() -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b, delay=0.01)
    wire.run(CFG.ping_interval / 2)  # one exchange: srtt = 0.02
    assert a.srtt == pytest.approx(0.02)
    wire.drop = drop_kind(Kind.PONG)
    t = CFG.ping_interval
    wire.run(t)  # the second ping sent, its pong will be lost
    assert a.outstanding == 1
    assert a.begin_lock(t)
    assert not a.finish_lock(t)
    grace = max(CFG.min_drain_grace, CFG.drain_grace_rtts * 0.02)
    assert a.get_timer() == pytest.approx(t + grace)
    a.handle_timer(t + grace / 2)
    assert a.outstanding == 1
    a.handle_timer(t + grace)
    assert a.outstanding == 0
    assert events(a)[-1] == Drained(NONCE, t + grace)
    assert a.finish_lock(t + grace)


def test_drain_grace_without_srtt_is_the_ping_lifespan() -> None:
    a = make()
    a.datagrams_to_send(0.0)
    assert a.begin_lock(0.1)
    assert a.srtt is None
    assert a.get_timer() == pytest.approx(CFG.ping_lifespan)
    a.handle_timer(CFG.ping_lifespan - 0.1)
    assert not a.finish_lock(CFG.ping_lifespan - 0.1)
    a.handle_timer(CFG.ping_lifespan)
    assert a.finish_lock(CFG.ping_lifespan)


def test_unsent_ping_is_withdrawn_by_begin_lock() -> None:
    a = make()  # first ping queued, not yet handed to the driver
    assert a.begin_lock(0.0)
    assert a.outstanding == 0
    assert [type(e) for e in events(a)] == [StateChanged, Drained]
    assert a.datagrams_to_send(0.0) == []
    assert a.finish_lock(0.0)


def test_ponger_keeps_answering_while_in_locking() -> None:
    b = make(is_pinger=False)
    assert b.begin_lock(1.0)
    assert [type(e) for e in events(b)] == [StateChanged, Drained]  # the ponger is always drained
    b.receive_datagram(PING, ALICE.addr, 1.1)
    assert b.datagrams_to_send(1.1) == [(PONG, ALICE.addr)]
    assert b.finish_lock(1.2)
    b.receive_datagram(PING, ALICE.addr, 1.3)
    assert b.datagrams_to_send(1.3) == []
    assert b.stats.drops[DropReason.SILENT_STATE] == 1


def test_queued_pongs_are_discarded_when_going_silent() -> None:
    b = make(is_pinger=False)
    assert b.begin_lock(1.0)
    b.receive_datagram(PING, ALICE.addr, 1.1)
    assert b.has_output
    assert b.finish_lock(1.1)
    assert not b.has_output
    assert b.datagrams_to_send(1.1) == []


def test_abort_lock_resumes_pinging() -> None:
    a, b = make(), make(is_pinger=False)
    wire = Wire(a, b)
    wire.run(CFG.ping_interval / 2)
    assert a.begin_lock(CFG.ping_interval / 2)
    wire.run(12.0)  # InLocking: no new pings
    assert [t for t, who, _, _ in wire.sent if who == "alice"] == [0.0]
    a.abort_lock(12.0)
    assert a.state == "Idle"
    assert a.get_timer() == CFG.ping_interval  # the missed ping is due at once
    a.handle_timer(12.0)
    assert a.datagrams_to_send(12.0) == [(PING, BOB.addr)]


def test_abort_after_the_no_inbound_deadline_expires() -> None:
    # lock_timeout < no_inbound_timeout (enforced by PairConfig) leaves this window only for a claim
    # made late in the no-inbound window: here lock_timeout is just below it.
    cfg = PairConfig(lock_timeout=CFG.no_inbound_timeout - 0.1)
    a, b = make(cfg=cfg), make(is_pinger=False, cfg=cfg)
    wire = Wire(a, b)
    start = cfg.ping_interval / 2  # the first exchange is over, the second ping not sent yet
    wire.run(start)
    assert a.begin_lock(start)
    past = a.last_seen + cfg.no_inbound_timeout + 0.1  # past a's deadline, before its lock timeout
    assert past < start + cfg.lock_timeout
    wire.run(past)  # InLocking has no no-inbound expiry, but the silent ponger does
    assert a.state == "InLocking"
    assert b.state == "Expired"
    a.abort_lock(past)
    a.handle_timer(past)
    assert state(a) == "Expired"
    assert a.datagrams_to_send(past) == []


# --- drops -------------------------------------------------------------------------


@pytest.mark.parametrize("is_pinger", [True, False])
def test_foreign_and_malformed_datagrams_are_counted_never_answered(is_pinger: bool) -> None:
    e = make(is_pinger=is_pinger)
    e.datagrams_to_send(0.0)
    remote = e.remote.addr
    bad: list[tuple[bytes, tuple[str, int], DropReason]] = [
        (b"", ("127.0.0.1", 9), DropReason.FOREIGN_ADDRESS),
        (encode(Frame(NONCE + 1, Kind.PING)), ("10.0.0.1", remote[1]), DropReason.FOREIGN_ADDRESS),
        (PING, ("127.0.0.1", 9), DropReason.ADDRESS_MISMATCH),  # our own frame: see test_entry_address.py
        (PONG, ("10.0.0.1", remote[1]), DropReason.ADDRESS_MISMATCH),
        (b"", remote, DropReason.MALFORMED),
        (PING + b"x", remote, DropReason.MALFORMED),
        (PING[:8] + b"\x07", remote, DropReason.MALFORMED),
        (encode(Frame(NONCE + 1, Kind.PING)), remote, DropReason.WRONG_NONCE),
        (encode(Frame(NONCE + 1, Kind.PONG)), remote, DropReason.WRONG_NONCE),
    ]
    before = e.outstanding
    for data, addr, _ in bad:
        e.receive_datagram(data, addr, 1.0)
    assert e.datagrams_to_send(1.0) == []
    assert e.last_seen == 0.0
    assert e.outstanding == before
    assert e.stats.received == 0
    expected: dict[DropReason, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(e.stats.drops) == expected


def test_drops_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    e = make()
    with caplog.at_level(logging.DEBUG, logger="natpool.core.entry"):
        e.receive_datagram(b"??", BOB.addr, 1.0)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "malformed" in caplog.records[0].getMessage()


def test_ipv6_remote_is_matched_in_socket_form() -> None:
    pair = EndpointPair(Endpoint("alice", "0:0::1", 1000), Endpoint("bob", "0::0:1", 1001), NONCE)
    a = PairEntry(pair, "alice", True, CFG, 0.0)
    assert a.datagrams_to_send(0.0) == [(PING, ("::1", 1001))]
    a.receive_datagram(PONG, ("::1", 1001), 0.1)
    assert a.stats.received == 1 and a.last_seen == 0.1


def test_unexpected_frames_are_dropped() -> None:
    a, b = make(), make(is_pinger=False)
    a.receive_datagram(PING, BOB.addr, 0.5)  # the pinger does not answer pings
    b.receive_datagram(PONG, ALICE.addr, 0.5)  # the ponger never pinged
    assert a.datagrams_to_send(0.5) == [(PING, BOB.addr)]  # only its own first ping
    a.receive_datagram(PONG, BOB.addr, 0.6)
    a.receive_datagram(PONG, BOB.addr, 0.7)  # a second pong: nothing outstanding any more
    assert a.stats.drops == {DropReason.UNEXPECTED: 2}
    assert b.stats.drops == {DropReason.UNEXPECTED: 1}
    assert a.last_seen == 0.6 and b.last_seen == 0.0


def test_ping_flood_is_bounded() -> None:
    b = make(is_pinger=False)
    for i in range(100):
        b.receive_datagram(PING, ALICE.addr, 1.0 + i / 1000)
    assert len(b.datagrams_to_send(2.0)) == 8
    assert b.stats.drops[DropReason.UNEXPECTED] == 92


# --- send failures and lock safety net ------------------------------------------------


def test_consecutive_send_failures_expire() -> None:
    a = make()
    for i in range(CFG.max_send_failures - 1):
        a.datagrams_to_send(float(i))
        a.send_failed(float(i))
    assert a.state == "Idle"
    a.send_failed(10.0)
    assert state(a) == "Expired"
    assert events(a)[-1] == StateChanged(NONCE, "Idle", "Expired", "expire", ExpiryReason.SEND_FAILURES, 10.0)


def test_send_failures_reset_on_inbound_and_successful_round() -> None:
    a = make()
    for _ in range(CFG.max_send_failures - 1):
        a.send_failed(0.0)
    a.receive_datagram(PONG, BOB.addr, 0.1)  # valid inbound: the path works
    for _ in range(CFG.max_send_failures - 1):
        a.send_failed(0.2)
    a.handle_timer(5.0)
    assert a.datagrams_to_send(5.0)  # this round had failures reported before it
    a.handle_timer(10.0)
    assert a.datagrams_to_send(10.0)  # no failure reported after the previous round: reset
    for _ in range(CFG.max_send_failures - 1):
        a.send_failed(10.0)
    assert a.state == "Idle"


def test_send_failed_in_silent_state_is_ignored() -> None:
    b = make(is_pinger=False)
    assert b.begin_lock(0.0) and b.finish_lock(0.0)
    for _ in range(10):
        b.send_failed(0.1)
    assert b.state == "Locked"


def test_lock_timeout_aborts_an_in_locking_entry() -> None:
    cfg = PairConfig(lock_timeout=5.0)
    a = make(cfg=cfg)
    a.datagrams_to_send(0.0)
    assert a.begin_lock(1.0)
    a.receive_datagram(PONG, BOB.addr, 1.1)
    assert a.get_timer() == pytest.approx(6.0)
    a.handle_timer(6.0)
    assert a.state == "Idle"
    assert events(a)[-1] == StateChanged(NONCE, "InLocking", "Idle", "abort_lock", ExpiryReason.LOCK_TIMEOUT, 6.0)
    assert a.datagrams_to_send(6.0) == [(PING, BOB.addr)]  # back to keepalive at once


def test_lock_timeout_expires_a_locked_entry_but_not_in_use() -> None:
    cfg = PairConfig(lock_timeout=5.0)
    b1, b2 = make(is_pinger=False, cfg=cfg), make(is_pinger=False, cfg=cfg)
    for b in (b1, b2):
        assert b.begin_lock(1.0) and b.finish_lock(1.5)
    assert b2.use(2.0)
    for b in (b1, b2):
        b.handle_timer(6.0)
    assert b1.state == "Expired" and b2.state == "InUse"
    assert events(b1)[-1] == StateChanged(NONCE, "Locked", "Expired", "expire", ExpiryReason.LOCK_TIMEOUT, 6.0)
    assert b2.get_timer() is None


def test_settle_time_counts_from_the_settle_start_not_the_lock() -> None:
    """spec/entry.toml: ``now >= settle_start + settle_time``; the session starts the settle."""
    cfg = PairConfig(lock_timeout=10.0, settle_time=1.0)
    b = make(is_pinger=False, cfg=cfg)
    assert not b.start_settle(0.0)  # only a Locked entry settles
    assert b.begin_lock(0.0) and b.finish_lock(0.5)
    assert not b.use(1.6)  # a second past the lock, but the settle has not started
    assert b.start_settle(0.8)
    assert b.get_timer() == pytest.approx(10.0)  # only the lock deadline: the settle wait is the session's timer
    assert not b.use(1.7)
    assert b.state == "Locked"
    assert b.use(1.8)
    assert state(b) == "InUse"


def test_get_timer_is_the_earliest_deadline() -> None:
    a = make(cfg=PairConfig(ping_interval=1.0, ping_lifespan=3.0, no_inbound_timeout=2.5, lock_timeout=1.2))
    a.datagrams_to_send(0.0)
    assert a.get_timer() == 1.0  # next ping (< lifespan 3, no-inbound 2.5)
    a.handle_timer(1.0)
    a.datagrams_to_send(1.0)
    assert a.get_timer() == 2.0  # next ping again
    a.handle_timer(2.0)
    a.datagrams_to_send(2.0)
    assert a.get_timer() == 2.5  # no-inbound now first
    assert a.begin_lock(2.1)
    assert a.get_timer() == pytest.approx(3.0)  # oldest ping (t=0) + lifespan; lock at 3.3
    a.handle_timer(3.0)
    assert a.get_timer() == pytest.approx(3.3)


# --- the generated machine ----------------------------------------------------------


class Recorder:
    """A python-statemachine listener, as trace validation uses them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def after_transition(self, event: object, source: object, target: object) -> None:
        self.seen.append((str(event), getattr(source, "value", ""), getattr(target, "value", "")))


def test_binding_a_machine_with_start_value_fires_nothing() -> None:
    rec = Recorder()
    e = make(is_pinger=False)
    assert e.begin_lock(0.0)
    machine = EntryMachine(model=e, start_value=e.state, listeners=[rec])
    assert rec.seen == []
    assert machine.current() == e.state == "InLocking"


def test_every_transition_goes_through_the_generated_machine() -> None:
    rec = Recorder()
    e = make(is_pinger=False, listeners=(rec,))
    assert e.begin_lock(1.0)
    e.abort_lock(1.1)
    assert e.begin_lock(1.2)
    assert e.finish_lock(1.3)
    assert e.use(1.4)
    e.expire(ExpiryReason.CLOSED, 1.5)
    e.expire(ExpiryReason.CLOSED, 1.6)  # idempotent: no transition
    changes = [ev for ev in events(e) if isinstance(ev, StateChanged)]
    assert [(c.event, c.source, c.target) for c in changes] == rec.seen
    assert rec.seen == [
        ("begin_lock", "Idle", "InLocking"),
        ("abort_lock", "InLocking", "Idle"),
        ("begin_lock", "Idle", "InLocking"),
        ("finish_lock", "InLocking", "Locked"),
        ("use", "Locked", "InUse"),
        ("expire", "InUse", "Expired"),
    ]


def test_forbidden_transitions_are_refused() -> None:
    e = make()
    assert not e.finish_lock(0.0)
    assert not e.use(0.0)
    with pytest.raises(InvalidState) as info:
        e.abort_lock(0.0)
    assert isinstance(info.value.__cause__, TransitionNotAllowed)
    assert e.begin_lock(0.0)
    assert not e.begin_lock(0.0)  # the CAS: a second claim loses
    e.expire(ExpiryReason.CLOSED, 0.1)
    for op in (e.begin_lock, e.finish_lock, e.use):
        assert not op(0.2)
    with pytest.raises(InvalidState):
        e.abort_lock(0.2)
    assert e.state == "Expired"


# --- strict silence, property style ---------------------------------------------------

OPS = st.sampled_from(
    ["ping", "pong", "junk", "foreign", "timer", "begin_lock", "finish_lock", "abort_lock", "use", "expire",
     "send_failed", "send"]
)


@given(is_pinger=st.booleans(), ops=st.lists(st.tuples(OPS, st.floats(0.0, 3.0)), max_size=40),
       settle=st.sampled_from([0.0, 0.5]))
def test_silent_states_send_nothing_and_transitions_follow_the_spec(
    is_pinger: bool, ops: list[tuple[str, float]], settle: float
) -> None:
    cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=4.0, ping_lifespan=1.5, lock_timeout=3.0,
                     settle_time=settle)
    rec = Recorder()
    e = make(is_pinger=is_pinger, cfg=cfg, listeners=(rec,))
    remote = e.remote.addr
    now = 0.0
    sent_silent: list[tuple[str, list[tuple[bytes, tuple[str, int]]]]] = []
    for op, dt in ops:
        now += dt
        before = e.state
        if op == "ping":
            e.receive_datagram(PING, remote, now)
        elif op == "pong":
            e.receive_datagram(PONG, remote, now)
        elif op == "junk":
            e.receive_datagram(b"\x01\x02", remote, now)
        elif op == "foreign":
            e.receive_datagram(PING, ("192.0.2.1", 1), now)
        elif op == "timer":
            e.handle_timer(now)
        elif op == "abort_lock":
            if e.state == "InLocking":
                e.abort_lock(now)
            else:
                with pytest.raises(InvalidState):
                    e.abort_lock(now)
        elif op == "expire":
            e.expire(ExpiryReason.CLOSED, now)
        elif op == "send_failed":
            e.send_failed(now)
        elif op == "send":
            pass
        else:
            getattr(e, op)(now)
        out = e.datagrams_to_send(now)
        if e.state in ENTRY.sets["silent"]:
            assert not e.has_output
            if out:
                sent_silent.append((e.state, out))
        if before == "Expired":
            assert e.state == "Expired"
        if e.state in ("InUse", "Expired"):
            assert e.get_timer() is None
    assert sent_silent == []
    changes = [ev for ev in events(e) if isinstance(ev, StateChanged)]
    assert [(c.event, c.source, c.target) for c in changes] == rec.seen
    for c in changes:
        assert ENTRY.step(c.source, c.event) == c.target


ODD_ADDRS: list[object] = [(), ("127.0.0.1",), None, 5, "127.0.0.1", (40002, "127.0.0.1"), (b"127.0.0.1", 40002)]


@pytest.mark.parametrize("addr", ODD_ADDRS, ids=repr)
@pytest.mark.parametrize("data", [PING, PONG, b"", b"x" * 100])
def test_malformed_source_address_is_a_counted_drop(addr: object, data: bytes) -> None:
    """A driver may hand over any address object; the entry drops it as foreign instead of raising."""
    e = make(is_pinger=False)
    e.receive_datagram(data, addr, 1.0)  # type: ignore[arg-type]
    assert e.stats.drops == {DropReason.FOREIGN_ADDRESS: 1}
    assert e.stats.received == 0
    assert e.datagrams_to_send(1.0) == []


@pytest.mark.parametrize("addr", [(BOB.host, BOB.port, 0, 0), ("127.0.0.1", BOB.port, 7, 3)], ids=repr)
def test_ipv6_style_four_tuple_matches_on_host_and_port(addr: tuple[str, int, int, int]) -> None:
    a = make(is_pinger=True)
    a.datagrams_to_send(0.0)
    a.receive_datagram(PONG, addr, 0.1)  # type: ignore[arg-type]
    assert a.stats.received == 1
    assert a.outstanding == 0


def test_events_are_immutable_values() -> None:
    """StateChanged / Drained are named tuples (cheap to build on the hot path) but still values."""
    from natpool.core.entry import Drained, StateChanged

    a = StateChanged(1, "Idle", "InLocking", "begin_lock", None, 2.0)
    assert a == StateChanged(nonce=1, source="Idle", target="InLocking", event="begin_lock", reason=None, at=2.0)
    assert hash(a) == hash(StateChanged(1, "Idle", "InLocking", "begin_lock", None, 2.0))
    assert (a.nonce, a.source, a.target, a.event, a.reason, a.at) == (1, "Idle", "InLocking", "begin_lock", None, 2.0)
    with pytest.raises(AttributeError):
        a.target = "Locked"  # type: ignore[misc]
    d = Drained(1, 2.0)
    assert d.nonce == 1 and d.at == 2.0 and type(d) is Drained and not isinstance(d, StateChanged)
    assert repr(d) == "Drained(nonce=1, at=2.0)"
