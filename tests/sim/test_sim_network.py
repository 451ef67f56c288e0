"""The simulator's clock, scheduler, network and signalling behave exactly as documented."""

from __future__ import annotations

import random
from collections import deque
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.sim import NetConfig, Network, Scheduler, SimSignalling, SimulationError, VirtualClock

Addr = tuple[str, int]
A: Addr = ("10.0.0.1", 1000)
B: Addr = ("10.0.0.2", 2000)


def make_net(config: NetConfig, seed: int = 1) -> tuple[Scheduler, Network, list[tuple[float, bytes, Addr]]]:
    sched = Scheduler(VirtualClock())
    net = Network(sched, random.Random(seed), config)
    got: list[tuple[float, bytes, Addr]] = []
    net.bind(B, lambda data, src, dst: got.append((sched.clock.now(), data, src)))
    return sched, net, got


# --- clock and scheduler -------------------------------------------------------


def test_clock_never_goes_backwards() -> None:
    clock = VirtualClock(5.0)
    assert clock.advance(1.5) == 6.5
    with pytest.raises(SimulationError):
        clock.advance(-1)
    with pytest.raises(SimulationError):
        clock.advance_to(1.0)


def test_scheduler_orders_by_time_then_insertion() -> None:
    sched = Scheduler(VirtualClock())
    fired: list[str] = []
    sched.call_at(2.0, lambda: fired.append("late"))
    sched.call_at(1.0, lambda: fired.append("first"))
    sched.call_at(1.0, lambda: fired.append("second"))
    cancelled = sched.call_at(1.5, lambda: fired.append("cancelled"))
    cancelled.cancel()
    assert sched.run_until(1.9) is False
    assert fired == ["first", "second"]
    assert sched.clock.now() == 1.9
    sched.run_until(10.0)
    assert fired == ["first", "second", "late"]
    assert sched.clock.now() == 10.0
    assert sched.next_time() is None


def test_scheduler_stop_predicate_halts_at_event_time() -> None:
    sched = Scheduler(VirtualClock())
    hits: list[float] = []
    for t in (1.0, 2.0, 3.0):
        sched.call_at(t, lambda: hits.append(sched.clock.now()))
    assert sched.run_until(100.0, stop=lambda: len(hits) == 2) is True
    assert sched.clock.now() == 2.0
    assert sched.pending() == 1


def test_scheduler_reports_a_livelock() -> None:
    sched = Scheduler(VirtualClock(), max_same_time=50)

    def rearm() -> None:
        sched.call_at(sched.clock.now(), rearm)

    sched.call_at(1.0, rearm)
    with pytest.raises(SimulationError, match="without time advancing"):
        sched.run_until(2.0)


# --- network: exact behaviour ----------------------------------------------------


def test_fixed_delay_delivers_in_order_after_delay() -> None:
    sched, net, got = make_net(NetConfig(delay_min=0.05, delay_max=0.05))
    for i in range(3):
        net.send(A, B, bytes([i]))
    sched.run_until(0.049)
    assert got == []
    sched.run_until(1.0)
    assert got == [(0.05, b"\x00", A), (0.05, b"\x01", A), (0.05, b"\x02", A)]
    assert net.stats.sent == net.stats.delivered == 3


def test_unbound_destination_is_counted_as_unowned() -> None:
    sched, net, got = make_net(NetConfig())
    net.send(B, A, b"x")  # nobody bound A
    sched.run_until(1.0)
    assert net.stats.unowned == 1 and net.stats.delivered == 0 and got == []


def test_partition_drops_at_send_and_in_flight_and_heal_restores() -> None:
    sched, net, got = make_net(NetConfig(delay_min=1.0, delay_max=1.0))
    net.send(A, B, b"in-flight")
    sched.run_until(0.5)
    net.partition("10.0.0.1", "10.0.0.2")
    assert net.is_partitioned(B[0], A[0])  # symmetric
    net.send(A, B, b"at-send")
    sched.run_until(3.0)
    assert got == []
    assert net.stats.partitioned == 2
    net.heal()
    net.send(A, B, b"after")
    sched.run_until(5.0)
    assert [d for _, d, _ in got] == [b"after"]


def test_isolate_one_host_and_heal_it() -> None:
    sched, net, got = make_net(NetConfig())
    net.partition(A[0])
    net.send(A, B, b"x")
    net.heal(A[0])
    net.send(A, B, b"y")
    sched.run_until(1.0)
    assert [d for _, d, _ in got] == [b"y"]


def test_per_link_override_applies_one_way() -> None:
    sched, net, got = make_net(NetConfig())
    net.bind(A, lambda data, src, dst: got.append((sched.clock.now(), data, src)))
    net.set_link(A[0], B[0], NetConfig(loss=1.0), both_ways=False)
    net.send(A, B, b"lost")
    net.send(B, A, b"kept")
    sched.run_until(1.0)
    assert [d for _, d, _ in got] == [b"kept"]
    net.clear_link(A[0], B[0])
    net.send(A, B, b"now-kept")
    sched.run_until(2.0)
    assert [d for _, d, _ in got] == [b"kept", b"now-kept"]


def test_manual_mode_gives_the_test_every_fate() -> None:
    sched, net, got = make_net(NetConfig(manual=True, loss=1.0))  # loss is ignored in manual mode
    for i in range(3):
        net.send(A, B, bytes([i]))
    sched.run_until(10.0)
    assert got == [] and [dg.data for dg in net.in_flight] == [b"\x00", b"\x01", b"\x02"]
    net.deliver(2)  # reorder: the last one first
    net.duplicate(0)
    assert [dg.data for dg in net.in_flight] == [b"\x00", b"\x00", b"\x01"]
    assert net.in_flight[1].copy == 1 and net.in_flight[1].id == net.in_flight[0].id
    net.drop(2)
    assert net.deliver_all() == 2
    assert [d for _, d, _ in got] == [b"\x02", b"\x00", b"\x00"]
    assert net.stats.dropped_manually == 1 and net.stats.duplicated == 1
    with pytest.raises(SimulationError):
        net.deliver(0)


def test_double_bind_is_rejected() -> None:
    _, net, _ = make_net(NetConfig())
    with pytest.raises(SimulationError):
        net.bind(B, lambda data, src, dst: None)


@pytest.mark.parametrize("bad", [dict(loss=1.5), dict(duplicate=-0.1), dict(delay_min=0.2, delay_max=0.1)])
def test_netconfig_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(SimulationError):
        NetConfig(**bad)  # type: ignore[arg-type]


# --- network: statistics for a fixed seed ------------------------------------------


def test_loss_and_duplication_rates_match_config() -> None:
    n = 20_000
    sched, net, got = make_net(NetConfig(loss=0.2, duplicate=0.1), seed=7)
    for _ in range(n):
        net.send(A, B, b"x")
    sched.run_until(1.0)
    assert abs(net.stats.lost / n - 0.2) < 0.015
    survivors = n - net.stats.lost
    assert abs(net.stats.duplicated / survivors - 0.1) < 0.015
    assert len(got) == survivors + net.stats.duplicated == net.stats.delivered


def test_delay_range_bounds_latency_and_reorders() -> None:
    sched, net, got = make_net(NetConfig(delay_min=0.01, delay_max=0.1), seed=3)

    def send(i: int) -> None:
        net.send(A, B, i.to_bytes(2, "big"))

    for i in range(200):
        sched.call_at(i * 0.001, partial(send, i))
    sched.run_until(5.0)
    order = [int.from_bytes(d, "big") for _, d, _ in got]
    assert sorted(order) == list(range(200))
    assert order != list(range(200))  # reordered
    for t, d, _ in got:
        sent = int.from_bytes(d, "big") * 0.001
        assert 0.01 - 1e-9 <= t - sent <= 0.1 + 1e-9


@given(seed=st.integers(0, 2**32), loss=st.floats(0, 1), dup=st.floats(0, 1))
def test_same_seed_same_fates(seed: int, loss: float, dup: float) -> None:
    def run() -> list[tuple[float, bytes, Addr]]:
        sched, net, got = make_net(NetConfig(loss=loss, duplicate=dup, delay_min=0.0, delay_max=0.5), seed=seed)
        for i in range(30):
            net.send(A, B, bytes([i]))
        sched.run_until(1.0)
        return got

    assert run() == run()


# --- signalling ---------------------------------------------------------------------


def test_signalling_is_fifo_with_delay_and_graceful_close() -> None:
    sched = Scheduler(VirtualClock())
    sig = SimSignalling(sched, delay=0.1)
    a, b = sig.open("alice", "bob")
    assert (a.owner, b.owner) == ("alice", "bob")
    a.send(b"1")
    sched.run_until(0.05)
    sig.channels[0].delay = 0.01  # a faster later message still may not overtake
    a.send(b"2")
    a.close()
    sched.run_until(0.099)
    assert list(b.inbox) == []
    sched.run_until(1.0)
    assert b.recv_all() == [b"1", b"2"]
    assert b.closed_by_peer and b.closed and not a.closed_by_peer
    assert b.send(b"late") is False
    assert sig.stats.lost == 1 and sig.stats.delivered == 2


def test_signalling_break_loses_in_flight_and_both_ends_observe() -> None:
    sched = Scheduler(VirtualClock())
    sig = SimSignalling(sched, delay=0.1)
    a, b = sig.open("alice", "bob")
    closes: list[str] = []
    a.on_closed = lambda: closes.append("a")
    b.on_closed = lambda: closes.append("b")
    received: list[bytes] = []
    b.on_receive = received.append
    a.send(b"lost")
    sched.run_until(0.05)
    sig.channels[0].break_()
    assert a.send(b"after") is False
    sched.run_until(1.0)
    assert received == [] and closes == ["a", "b"]
    assert sig.stats.lost == 2


def test_break_all_touching_one_node() -> None:
    sched = Scheduler(VirtualClock())
    sig = SimSignalling(sched)
    sig.open("a", "b")
    sig.open("c", "a")
    sig.open("b", "c")
    assert sig.break_all("a") == 2
    assert [ch.broken for ch in sig.channels] == [True, True, False]


def test_manual_signalling_enforces_fifo_per_direction() -> None:
    sched = Scheduler(VirtualClock())
    sig = SimSignalling(sched, manual=True)
    a, b = sig.open("alice", "bob")
    c, d = sig.open("carol", "dave")
    a.send(b"a1")
    a.send(b"a2")
    b.send(b"b1")
    c.send(b"c1")
    sched.run_until(10.0)
    assert b.inbox == a.inbox == d.inbox == deque()  # nothing moves on its own
    assert sig.deliverable() == [0, 2, 3]  # a2 waits behind a1
    with pytest.raises(SimulationError, match="FIFO"):
        sig.deliver(1)
    sig.deliver(3)
    sig.deliver(2)
    assert d.recv_all() == [b"c1"] and a.recv_all() == [b"b1"]
    a.close()
    sig.deliver_all()
    assert b.recv_all() == [b"a1", b"a2"] and b.closed_by_peer


def test_manual_signalling_break_drops_that_channel_and_queues_both_notices() -> None:
    sched = Scheduler(VirtualClock())
    sig = SimSignalling(sched, manual=True)
    a, b = sig.open("alice", "bob")
    c, d = sig.open("carol", "dave")
    a.send(b"lost")
    c.send(b"kept")
    sig.channels[0].break_()
    assert [(p.to.owner, p.data) for p in sig.in_flight] == [("dave", b"kept"), ("alice", None), ("bob", None)]
    sig.deliver_all()
    assert a.closed_by_peer and b.closed_by_peer and b.received == [] and d.received == [b"kept"]
    assert sig.stats.lost == 1 and not c.closed
