"""The sans-IO Node: one dispatch loop (no re-entrance), one timer, a bounded queue, application data from the core.

Two nodes wired by hand (no simulator): the test itself carries each
datagram and signal, so it decides exactly which one arrives when.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from natpool import Node
from natpool.config import PairConfig
from natpool.core.entry import Drained, PairEntry, StateChanged
from natpool.core.lease import Lease
from natpool.core.node import (
    ApplicationData,
    CloseChannel,
    LeaseReady,
    NodeEvent,
    OpenChannel,
    SessionEnded,
    SessionStarted,
)
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, EventBacklog, HandoverTimeout
from natpool.wire.frame import ping_bytes, pong_bytes
from natpool.wire.signal import SignalType
from natpool.wire.signal import decode as decode_signal

NONCE = 0xC0FFEE
CFG = PairConfig(ping_interval=5.0, no_inbound_timeout=20.0, ping_lifespan=2.0, lock_timeout=1.0)
A_ADDR = ("10.0.0.1", 4000)
B_ADDR = ("10.0.0.2", 5000)
PAIR = EndpointPair(Endpoint("alice", *A_ADDR), Endpoint("bob", *B_ADDR), NONCE)


def events(node: Node) -> Iterator[NodeEvent]:
    while (ev := node.next_event()) is not None:
        yield ev


class Wire:
    """Alice (the pinger) and Bob, with the channel ids of each side of one take."""

    def __init__(self, config: PairConfig = CFG, max_pending_events: int = 100_000) -> None:
        self.a = Node("alice", config, max_pending_events=max_pending_events)
        self.b = Node("bob", config)
        self.a.add(PAIR, True, 0.0)
        self.b.add(PAIR, False, 0.0)
        self.a_to_b: dict[int, int] = {}  # alice's channel id -> bob's
        self.b_to_a: dict[int, int] = {}
        self.seen: dict[str, list[NodeEvent]] = {"alice": [], "bob": []}

    def drain(self) -> None:
        for name, node in (("alice", self.a), ("bob", self.b)):
            for ev in events(node):
                self.seen[name].append(ev)
                if isinstance(ev, OpenChannel):  # the driver opens the channel: the peer gets an id for it
                    far = self.b.new_channel_id()
                    self.a_to_b[ev.channel] = far
                    self.b_to_a[far] = ev.channel

    def datagrams(self, now: float) -> int:
        """Carry every queued keepalive frame once, both ways; how many."""
        out_a, out_b = self.a.datagrams_to_send(now), self.b.datagrams_to_send(now)
        for nonce, data, _ in out_a:
            assert self.b.receive_datagram(nonce, data, A_ADDR, now) is None
        for nonce, data, _ in out_b:
            assert self.a.receive_datagram(nonce, data, B_ADDR, now) is None
        return len(out_a) + len(out_b)

    def signals(self, now: float) -> list[str]:
        """Carry every queued signal once, both ways; the types carried, in order."""
        self.drain()
        carried = []
        for channel, data in self.a.signals_to_send():
            carried.append(decode_signal(data).type.name)
            self.b.receive_signal(self.a_to_b[channel], data, now)
        for channel, data in self.b.signals_to_send():
            carried.append(decode_signal(data).type.name)
            self.a.receive_signal(self.b_to_a[channel], data, now)
        self.drain()
        return carried


def test_the_pong_that_ends_the_drain_locks_the_entry_after_receive_datagram_returned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No re-entrance: the session's finish_lock runs from the dispatch loop, not inside the entry's method."""
    w = Wire()
    (ping,) = w.a.datagrams_to_send(0.0)  # alice's ping is in flight: her claim must drain it
    assert ping[1] == ping_bytes(NONCE)
    w.a.start_take(NONCE, now=0.1)
    assert w.signals(0.1) == ["LOCK", "LOCKED"]  # bob (the ponger) answers at once
    assert w.a.get(NONCE).state == "InLocking"  # LOCKED is in, but the ping is still outstanding

    depth = 0
    locked_inside: list[int] = []
    receive, finish = PairEntry.receive_datagram, PairEntry.finish_lock

    def receive_datagram(self: PairEntry, data: bytes, addr: tuple[str, int], now: float) -> None:
        nonlocal depth
        depth += 1
        try:
            receive(self, data, addr, now)
        finally:
            depth -= 1

    def finish_lock(self: PairEntry, now: float) -> bool:
        locked_inside.append(depth)
        return finish(self, now)

    monkeypatch.setattr(PairEntry, "receive_datagram", receive_datagram)
    monkeypatch.setattr(PairEntry, "finish_lock", finish_lock)
    list(events(w.a))  # what came before the pong
    assert w.a.receive_datagram(NONCE, pong_bytes(NONCE), B_ADDR, 0.2) is None
    # Locked within the same node call, but from the dispatch loop: the entry's method had returned.
    assert locked_inside == [0]
    assert w.a.get(NONCE).state == "Locked"
    # The events in the order they happened: the drain, then the lock it allowed.
    got = [ev for ev in events(w.a) if isinstance(ev, (Drained, StateChanged))]
    assert got == [Drained(NONCE, 0.2), StateChanged(NONCE, "InLocking", "Locked", "finish_lock", None, 0.2)]
    assert [decode_signal(d).type for _, d in w.a.signals_to_send()] == [SignalType.TAKE]


def test_a_whole_take_through_two_nodes_ends_with_leases_and_closes() -> None:
    w = Wire(PairConfig(ping_interval=5.0, no_inbound_timeout=20.0, ping_lifespan=2.0, lock_timeout=1.0,
                        settle_time=0.0))
    channel = w.a.start_take(NONCE, now=0.1)
    carried: list[str] = []
    frames = 0
    for step in range(6):  # 10 ms per hop, both ways
        now = 0.1 + 0.01 * step
        carried += w.signals(now)
        frames += w.datagrams(now)
    assert carried == ["LOCK", "LOCKED", "TAKE", "TAKEN"]
    assert frames == 0  # alice's unsent ping was dropped by her claim: nothing to drain
    kinds = [type(ev).__name__ for ev in w.seen["alice"] if not isinstance(ev, (Drained, StateChanged))]
    assert kinds == ["OpenChannel", "SessionStarted", "LeaseReady", "SessionEnded", "CloseChannel"]
    (ready,) = [ev for ev in w.seen["alice"] if isinstance(ev, LeaseReady)]
    assert ready.channel == channel and isinstance(ready.lease, Lease) and ready.lease.role == "initiator"
    assert [ev.outcome.role for ev in w.seen["bob"] if isinstance(ev, SessionEnded)  # type: ignore[union-attr]
            ] == ["responder"]
    assert w.a.get(NONCE).state == w.b.get(NONCE).state == "InUse"
    assert w.a.sessions() == {} and w.b.sessions() == {}


def test_drain_events_is_next_event_batched() -> None:
    """Node.drain_events: the same events in the same order as next_event, the queue empty afterwards."""
    batched, single = Wire(), Wire()
    for w in (batched, single):
        w.a.start_take(NONCE, now=0.1)
    want = list(events(single.a))
    got = batched.a.drain_events()

    def same(ev: NodeEvent) -> object:  # the two nodes' sessions are distinct objects: compare what they are
        return (ev.channel, ev.session.nonce, ev.session.state) if isinstance(ev, SessionStarted) else ev

    assert [same(e) for e in got] == [same(e) for e in want] and [type(e) for e in got] == [type(e) for e in want]
    assert [type(e).__name__ for e in got if not isinstance(e, (StateChanged, Drained))] == [
        "OpenChannel", "SessionStarted"]
    assert batched.a.pending_events == 0 and batched.a.drain_events() == []


def test_an_invalid_session_id_is_refused_before_the_claim() -> None:
    """start_take(sid=...) with a bad id raises ValueError and changes nothing (the signals are built unchecked)."""
    w = Wire()
    list(events(w.a))
    for bad in (b"short", bytes(16)):
        with pytest.raises(ValueError, match="session id"):
            w.a.start_take(NONCE, now=0.1, sid=bad)
        assert w.a.get(NONCE).state == "Idle" and w.a.sessions() == {} and w.a.pending_events == 0
    channel = w.a.start_take(NONCE, now=0.1, sid=b"\x01" * 16)
    ((_, lock),) = w.a.signals_to_send()
    assert decode_signal(lock).sid == b"\x01" * 16 and w.a.session(channel) is not None


def test_one_timer_covers_entries_and_sessions() -> None:
    w = Wire()
    w.a.datagrams_to_send(0.0)
    channel = w.a.start_take(NONCE, now=0.1)
    w.drain()
    session = w.a.session(channel)
    assert session is not None
    # The LOCK is never answered: the earliest deadline is the take's (lock_timeout), before the entry's.
    deadlines = [t for t in (w.a.pool.get_timer(), session.get_timer()) if t is not None]
    assert w.a.get_timer() == min(deadlines)
    w.a.handle_timer(0.1 + CFG.lock_timeout)
    (ended,) = [ev for ev in events(w.a) if isinstance(ev, SessionEnded)]
    assert isinstance(ended.outcome, HandoverTimeout)
    assert w.a.session(channel) is None and w.a.get(NONCE).state == "Idle"


def test_the_queue_is_bounded_by_backpressure_and_drains_in_order() -> None:
    w = Wire(max_pending_events=3)
    w.a.start_take(NONCE, now=0.1)  # claim (2 events) + OpenChannel + SessionStarted: 4 > 3
    with pytest.raises(EventBacklog):
        w.a.handle_timer(0.2)
    with pytest.raises(EventBacklog):
        w.a.receive_datagram(NONCE, pong_bytes(NONCE), B_ADDR, 0.2)
    got = list(events(w.a))
    assert [type(ev) for ev in got] == [StateChanged, Drained, OpenChannel, SessionStarted]
    assert w.a.pending_events == 0
    w.a.handle_timer(0.2)  # accepted again once drained


def test_application_data_on_a_silent_entry_is_classified_by_the_core() -> None:
    w = Wire()
    w.a.datagrams_to_send(0.0)
    assert w.a.receive_datagram(NONCE, b"hello", B_ADDR, 0.05) is None  # Idle: not a frame, dropped
    assert w.a.drops[DropReason.MALFORMED] == 1
    w.a.start_take(NONCE, now=0.1)
    w.signals(0.1)
    w.signals(0.1)
    w.a.receive_datagram(NONCE, pong_bytes(NONCE), B_ADDR, 0.2)
    assert w.a.get(NONCE).state == "Locked"
    got = w.a.receive_datagram(NONCE, b"hello", B_ADDR, 0.3)
    assert got == ApplicationData(NONCE, b"hello", B_ADDR)
    # This pair's own keepalive frame, late, is not the application's: dropped by the entry as before.
    assert w.a.receive_datagram(NONCE, pong_bytes(NONCE), B_ADDR, 0.3) is None
    assert w.a.get(NONCE).stats.drops[DropReason.SILENT_STATE] == 1
    assert w.a.receive_and_reply(NONCE, b"more", B_ADDR, 0.3) == ApplicationData(NONCE, b"more", B_ADDR)
    # Not by size: a frame-sized payload that is not this pair's keepalive is the application's too.
    other = pong_bytes(NONCE + 1)
    assert len(other) == len(pong_bytes(NONCE))
    assert w.a.receive_datagram(NONCE, other, B_ADDR, 0.3) == ApplicationData(NONCE, other, B_ADDR)


def test_a_session_the_peer_closed_gets_no_close_request() -> None:
    w = Wire()
    channel = w.a.start_take(NONCE, now=0.1)
    w.drain()
    w.a.channel_closed(channel, 0.2)
    kinds = [type(ev) for ev in events(w.a)]
    assert SessionEnded in kinds and CloseChannel not in kinds
    assert SessionStarted not in kinds  # already drained above


def test_a_late_signal_on_an_ended_channel_opens_nothing() -> None:
    """Only a channel from new_channel_id() opens a responder; a message after a session's end is dropped."""
    w = Wire()
    channel = w.a.start_take(NONCE, now=0.1)
    w.drain()
    (_, lock), = w.a.signals_to_send()
    w.a.channel_closed(channel, 0.2)  # the take fails: the channel is over
    w.a.receive_signal(channel, lock, 0.3)
    assert w.a.sessions() == {} and w.a.drops[DropReason.UNEXPECTED] == 1
    w.a.receive_signal(12345, lock, 0.3)  # a channel id the node never gave out
    assert w.a.sessions() == {} and w.a.drops[DropReason.UNEXPECTED] == 2


@pytest.mark.parametrize("key", [None, bytes(range(32))])
def test_receive_and_reply_keeps_each_entrys_slot_at_its_real_deadline(key: bytes | None) -> None:
    """The driver's per-datagram path re-arms without PairPool._rearm (an Idle ponger without get_timer).

    Whatever it skips, the slot it leaves must be the deadline the entry
    itself reports, on both sides and through pings, pongs and timers.
    """
    a, b = Node("alice", CFG), Node("bob", CFG)
    ea = a.add(PAIR, True, 0.0, key=key)
    eb = b.add(PAIR, False, 0.0, key=key)
    now = 0.0
    for _ in range(6):
        for _nonce, ping, _addr in a.datagrams_to_send(now):
            replies = b.receive_and_reply(NONCE, ping, A_ADDR, now + 0.01)
            assert isinstance(replies, list)
            assert eb._armed == eb.get_timer()
            for pong, _to in replies:
                a.receive_and_reply(NONCE, pong, B_ADDR, now + 0.02)
                assert ea._armed == ea.get_timer()
        timer = a.get_timer()
        assert timer is not None
        now = timer
        a.handle_timer(now)
    assert eb.stats.received == ea.stats.received == 6
