"""The simulator's scripted-fault knobs behave as documented.

``Network.fate`` and ``in_transit``; a channel's ``intercept`` and
``on_deliver`` (set from ``SimSignalling.on_open``), ``SimSignalling.log``,
``inject`` and ``quiet``; ``SimNode.serve`` (also ``anonymous``) and ``cancel``; ``Simulation.checks``.
"""

from __future__ import annotations

import random

import pytest

from natpool.errors import DropReason, HandoverError, SignalProtocolError
from natpool.sim import (
    Channel,
    ChannelEnd,
    InFlight,
    NetConfig,
    Network,
    Scheduler,
    SentSignal,
    SimSignalling,
    Simulation,
    VirtualClock,
    frame_kind,
)
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.signal import AbortReason, Signal, SignalType
from natpool.wire.signal import decode as decode_signal
from natpool.wire.signal import encode as encode_signal

Addr = tuple[str, int]
A: Addr = ("10.0.0.1", 1000)
B: Addr = ("10.0.0.2", 2000)


# --- network -----------------------------------------------------------------------


def test_fate_decides_the_copies_of_each_datagram_and_in_transit_counts_them() -> None:
    sched = Scheduler(VirtualClock())
    # Random loss 1.0 would lose everything: the fate hook replaces the random fate.
    net = Network(sched, random.Random(1), NetConfig(loss=1.0, delay_min=0.01, delay_max=0.01))
    got: list[bytes] = []
    net.bind(B, lambda data, src, dst: got.append(data))
    seen: list[InFlight] = []

    def fate(dg: InFlight) -> int:
        seen.append(dg)
        return {b"drop": 0, b"one": 1, b"two": 2}[dg.data]

    net.fate = fate
    ids = [net.send(A, B, data) for data in (b"drop", b"one", b"two")]
    assert [(dg.id, dg.src, dg.dst, dg.sent_at) for dg in seen] == [(i, A, B, 0.0) for i in ids]
    assert net.in_transit == 3  # one + two copies
    sched.run_until(1.0)
    assert got == [b"one", b"two", b"two"] and net.in_transit == 0
    assert (net.stats.dropped_by_fate, net.stats.duplicated, net.stats.delivered, net.stats.lost) == (1, 1, 3, 0)
    net.fate = None
    net.send(A, B, b"one")  # back to the link's random fate: loss 1.0
    assert net.in_transit == 0 and net.stats.lost == 1


def test_fate_is_not_asked_on_manual_links_or_across_partitions() -> None:
    sched = Scheduler(VirtualClock())
    net = Network(sched, random.Random(1), NetConfig(manual=True))
    asked: list[InFlight] = []

    def fate(dg: InFlight) -> int:
        asked.append(dg)
        return 1

    net.fate = fate
    net.send(A, B, b"x")
    net.set_link(A[0], B[0], NetConfig())
    net.partition(A[0], B[0])
    net.send(A, B, b"y")
    assert asked == [] and len(net.in_flight) == 1 and net.in_transit == 0


def test_in_transit_returns_to_zero_when_a_copy_dies_in_a_partition() -> None:
    sched = Scheduler(VirtualClock())
    net = Network(sched, random.Random(1), NetConfig(delay_min=0.1, delay_max=0.1))
    net.send(A, B, b"x")
    net.partition(A[0], B[0])
    assert net.in_transit == 1
    sched.run_until(1.0)
    assert net.in_transit == 0 and net.stats.partitioned == 1


# --- signalling --------------------------------------------------------------------


def _sig(manual: bool = False) -> tuple[Scheduler, SimSignalling]:
    sched = Scheduler(VirtualClock())
    return sched, SimSignalling(sched, delay=0.1, manual=manual)


def test_log_records_every_send_as_sent_and_whether_it_was_accepted() -> None:
    sched, sig = _sig()
    a, b = sig.open("alice", "bob")
    a.send(b"1")
    sched.run_until(0.05)
    b.send(b"2")
    a.close()
    a.send(b"late")
    assert sig.log == [SentSignal(0.0, 1, "alice", b"1", True), SentSignal(0.05, 1, "bob", b"2", True),
                       SentSignal(0.05, 1, "alice", b"late", False)]
    c, _ = sig.open("carol", "bob")
    c.send(b"3")
    assert [r.data for r in sig.sent_on(sig.channels[0])] == [b"1", b"2", b"late"]
    assert [r.data for r in sig.sent_on(2)] == [b"3"]


def test_intercept_rewrites_replays_and_swallows_after_logging() -> None:
    sched, sig = _sig()

    def install(ch: Channel) -> None:
        ch.intercept = lambda end, data: {b"dup": [data, data], b"eat": [], b"x": [b"y"]}[data]

    sig.on_open = install
    a, b = sig.open("alice", "bob")
    for data in (b"dup", b"eat", b"x"):
        assert a.send(data)
    assert sig.in_transit == 3
    sched.run_until(1.0)
    assert b.recv_all() == [b"dup", b"dup", b"y"]
    assert [r.data for r in sig.log] == [b"dup", b"eat", b"x"]  # logged as the sender sent them
    assert sig.stats.lost == 1 and sig.quiet()


def test_intercept_can_break_the_channel_instead_of_carrying_the_message() -> None:
    sched, sig = _sig()
    a, b = sig.open("alice", "bob")
    ch = sig.channels[0]

    def cut(end: ChannelEnd, data: bytes) -> list[bytes]:
        ch.break_()
        return [data]  # too late: nothing travels on a broken channel

    ch.intercept = cut
    a.send(b"1")
    assert not sig.quiet()  # both ends' notices of the break are on their way
    sched.run_until(0.0)
    assert ch.broken and a.closed_by_peer and b.closed_by_peer and b.received == []
    assert sig.quiet()


def test_on_deliver_runs_after_the_receiver_handled_the_message() -> None:
    sched, sig = _sig()
    a, b = sig.open("alice", "bob")
    ch = sig.channels[0]

    def reply(data: bytes) -> None:
        b.send(b"reply to " + data)

    b.on_receive = reply
    seen: list[tuple[str, bytes, int]] = []

    def after(to: ChannelEnd, data: bytes) -> None:
        seen.append((to.owner, data, len(sig.log)))
        ch.break_()

    ch.on_deliver = after
    a.send(b"1")
    sched.run_until(1.0)
    assert seen == [("bob", b"1", 2)]  # the reply was already sent when the hook ran...
    assert a.received == [] and a.closed_by_peer  # ...and the break lost it


def test_inject_forges_behind_queued_messages_even_after_the_peer_closed() -> None:
    _sched, sig = _sig(manual=True)
    a, b = sig.open("alice", "bob")
    a.send(b"real")
    a.close()
    assert sig.inject(b, b"forged")
    assert [p.data for p in sig.in_flight] == [b"real", None, b"forged"]
    sig.deliver_all()
    assert b.received == [b"real"]  # b saw the close first: the forgery reaches a closed end
    assert sig.log[-1] == SentSignal(0.0, 1, "alice", b"forged", True, injected=True)
    assert not sig.inject(b, b"again")  # towards a closed end: refused (and logged as such)
    assert sig.log[-1].accepted is False

    c, d = sig.open("carol", "dave")
    c.close()  # carol's end closed, dave still open: a forgery as from carol reaches dave
    assert sig.inject(d, b"ghost")
    sig.deliver_all()
    assert d.received == [] and d.closed_by_peer  # FIFO: the close came first, dave closed

    e, f = sig.open("erin", "frank")
    assert sig.inject(f, b"hello") and sig.inject(e, b"back")
    sig.deliver_all()
    assert f.received == [b"hello"] and e.received == [b"back"]
    sig.channels[-1].break_()
    assert not sig.inject(f, b"late")


def test_quiet_counts_closes_and_manual_queues() -> None:
    sched, sig = _sig()
    a, _b = sig.open("alice", "bob")
    assert sig.quiet()
    a.close()
    assert not sig.quiet()
    sched.run_until(1.0)
    assert sig.quiet()
    _, msig = _sig(manual=True)
    c, _d = msig.open("c", "d")
    c.send(b"x")
    assert not msig.quiet()
    msig.deliver_all()
    assert msig.quiet()


# --- nodes and the simulation ------------------------------------------------------------


def test_serve_answers_a_channel_the_test_opened() -> None:
    sim = Simulation(1)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    pair = sim.punch(a, b)
    mallory, at_bob = sim.signalling.open("mallory", b)
    b.serve(at_bob)
    mallory.send(b"\x00" * 3)  # not a signal
    sim.run_until(1.0)
    [link] = b.links
    assert link.end is at_bob and isinstance(link.session.outcome, SignalProtocolError)
    assert mallory.closed_by_peer and b.state(pair.nonce) == "Idle"


def test_serve_anonymous_gives_the_node_no_peer_identity() -> None:
    """Over a transport that cannot name its peer, mallory's LOCK for alice–bob's pair is not refused by identity."""
    sim = Simulation(1, signalling_manual=True)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonce = sim.punch(a, b).nonce
    lock = encode_signal(Signal(SignalType.LOCK, nonce, b"\x6d" * 16, 1))
    for anonymous in (False, True):
        mallory, at_bob = sim.signalling.open("mallory", b)
        b.serve(at_bob, anonymous=anonymous)
        mallory.send(lock)
        sim.signalling.deliver_all()
    named, unnamed = (link.session for link in b.links)
    assert named.done and b.pool.drops[DropReason.UNEXPECTED_PEER] == 1
    assert not unnamed.done and b.state(nonce) == "InLocking"


def test_cancel_gives_up_a_take_with_abort_cancelled() -> None:
    sim = Simulation(1, signalling_manual=True)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonce = sim.punch(a, b).nonce
    handle = a.take(nonce)
    a.cancel(handle)
    assert isinstance(handle.outcome, HandoverError) and a.state(nonce) == "Idle"
    assert [decode_signal(p.data).type for p in sim.signalling.in_flight if p.data is not None] == [
        SignalType.LOCK, SignalType.ABORT]
    assert decode_signal(sim.signalling.in_flight[1].data or b"").reason is AbortReason.CANCELLED
    a.cancel(handle)  # ended: a no-op
    sim.signalling.deliver_all()
    assert b.state(nonce) == "Idle" and all(link.session.done for link in b.links)


def test_checks_run_after_every_event_and_stop_the_run_where_they_fail() -> None:
    sim = Simulation(1)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    sim.punch(a, b)
    times: list[float] = []
    sim.checks.append(lambda: times.append(sim.now()))
    sim.run_until(0.5)
    assert times[0] == 0.0 and len(times) == sim.scheduler.fired + 1  # once as the run starts, then per event
    sim.step()
    assert len(times) == sim.scheduler.fired + 1

    def no_pong() -> None:
        assert not [d for d in sim.log if d.kind == "pong" and d.time > 0.5], "a pong"

    sim.checks.append(no_pong)
    with pytest.raises(AssertionError, match="a pong"):
        sim.run_for(10.0)
    pong = [d for d in sim.log if d.kind == "pong"][-1]
    assert sim.now() == pong.time  # stopped at the event that broke the check


def test_frame_kind_and_fate_compose_to_lose_one_kind() -> None:
    sim = Simulation(1)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    pair = sim.punch(a, b)
    sim.network.fate = lambda dg: 0 if frame_kind(dg.data) == "pong" else 1
    sim.run_until(30.0)
    assert {d.kind for d in sim.deliveries} == {"ping"}
    assert sim.network.stats.dropped_by_fate == len(sim.sent_by("bob", pair.nonce)) > 0
    assert frame_kind(encode(Frame(pair.nonce, Kind.PONG))) == "pong"
