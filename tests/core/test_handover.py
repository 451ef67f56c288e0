"""Handover sessions (spec/handover.md) over two real sans-IO pools, in virtual time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason, StateChanged
from natpool.core.handover import InitiatorSession
from natpool.errors import (
    ChannelBroken,
    HandoverError,
    PairBusy,
)
from natpool.wire.signal import SignalType, decode
from tests.support.handover_net import A, B, Link, Net, assert_no_leak, assert_silent_after_lock, leases, types

NONCE = 0xC0FFEE
CFG = PairConfig(ping_interval=5.0, no_inbound_timeout=20.0, ping_lifespan=2.0, lock_timeout=1.0)


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_happy_path(initiator: str) -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    net.run_until(10.001)  # a ping left A at t=10 and is in flight: the pinger must drain it
    t0 = net.now
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert types(link) == ["LOCK", "LOCKED", "TAKE", "TAKEN"]
    got = leases(link)
    assert sorted(le.role for le in got) == ["initiator", "responder"]
    assert all(le.nonce == NONCE for le in got)
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"
    assert_silent_after_lock(net, NONCE)
    assert_no_leak(net, NONCE)
    # Virtual-time latency: two signalling round trips (+ one UDP RTT when the pinger answers LOCK),
    # nowhere near ping_lifespan.
    sig_rtt, udp_rtt = 2 * net.sig_delay, 2 * net.udp_delay
    end = max(s.ended_at or 0.0 for _, _, s in net.sessions())
    assert end - t0 <= 2 * sig_rtt + udp_rtt + 1e-9
    assert end - t0 < CFG.ping_lifespan


def test_lease_release_expires_both_sides_entries_for_good() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE)
    net.run_sessions()
    for lease in leases(link):
        lease.release(net.now)
        lease.release(net.now)  # idempotent
        assert lease.released
    assert net.state(A, NONCE) == net.state(B, NONCE) == "Expired"


def test_claim_losers_fail_at_once_and_send_nothing() -> None:
    """50 concurrent takers of one pair on one node: one session, 49 PairBusy, no signal from the losers."""
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    links: list[Link] = []
    busy = 0
    for _ in range(50):
        try:
            links.append(net.take(A, NONCE))
        except PairBusy:
            busy += 1
    assert (len(links), busy) == (1, 49)
    net.run_sessions()
    assert len(leases(links[0])) == 2
    assert types(links[0]) == ["LOCK", "LOCKED", "TAKE", "TAKEN"]


def test_fifty_threads_racing_start_take_get_one_session() -> None:
    """The claim CAS holds across threads too: one InitiatorSession, 49 PairBusy, one LOCK queued."""
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    pool = net.pools[A]
    barrier = threading.Barrier(50)

    def attempt() -> InitiatorSession | PairBusy:
        barrier.wait()
        try:
            return pool.start_take(NONCE, None, net.now)
        except PairBusy as exc:
            return exc

    with ThreadPoolExecutor(max_workers=50) as ex:
        results = list(ex.map(lambda _i: attempt(), range(50)))
    sessions = [r for r in results if isinstance(r, InitiatorSession)]
    assert len(sessions) == 1 and sum(isinstance(r, PairBusy) for r in results) == 49
    assert [decode(d).type for d in sessions[0].signals_to_send()] == [SignalType.LOCK]
    assert pool.handovers.sessions() == sessions


def test_take_any_picks_an_idle_pair_and_reports_busy_when_none() -> None:
    net = Net(CFG)
    net.add_pair(1, pinger=A)
    net.add_pair(2, pinger=B)
    first = net.take(A, peer=B)
    second = net.take(A, peer=B)
    with pytest.raises(PairBusy):
        net.take(A, peer=B)
    net.run_sessions()
    assert len(leases(first)) == len(leases(second)) == 2
    assert {first.initiator.nonce, second.initiator.nonce} == {1, 2}


def test_unknown_pair_is_aborted_and_the_initiator_expires_its_entry() -> None:
    """Rule 6: LOCK for an unknown nonce gets ABORT(unknown); the initiator's entry expires (PEER_GONE)."""
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    net.pools[B].remove(NONCE, net.now)
    link = net.take(A, NONCE)
    net.run_sessions()
    assert types(link) == ["LOCK", "ABORT"]
    assert net.state(A, NONCE) == "Expired"
    assert isinstance(link.initiator.outcome, HandoverError)
    assert_no_leak(net, NONCE)


def test_busy_peer_refuses_and_the_entry_returns_to_idle() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    net.pools[B].claim(NONCE, net.now)  # B's side is claimed by someone else (no session)
    link = net.take(A, NONCE)
    net.run_sessions()
    assert types(link) == ["LOCK", "BUSY"]
    assert isinstance(link.initiator.outcome, PairBusy)
    assert net.state(A, NONCE) == "Idle"
    assert not net.pools[A].handovers.sessions()


def test_channel_closed_before_anything_returns_the_entry() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE, drop_in_flight=lambda sender, data: True)
    net.run_sessions()
    assert isinstance(link.initiator.outcome, ChannelBroken)
    assert net.state(A, NONCE) == net.state(B, NONCE) == "Idle"


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_drain_costs_at_most_one_udp_round_trip_when_udp_is_slower_than_signalling(initiator: str) -> None:
    """UDP one-way 30 ms, signalling 20 ms, a ping in flight when the pinger locks: ≤ 2 sig RTT + 1 UDP RTT."""
    net = Net(CFG, udp_delay=0.03, sig_delay=0.02)
    net.add_pair(NONCE, pinger=A)
    # Pinger initiator: take 1 ms after the t=10 ping. Ponger initiator: LOCK reaches the pinger 5 ms after it.
    net.run_until(10.001 if initiator == A else 9.985)
    t0 = net.now
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert len(leases(link)) == 2
    assert_silent_after_lock(net, NONCE)
    end = max(s.ended_at or 0.0 for _, _, s in net.sessions())
    sig_rtt, udp_rtt = 2 * net.sig_delay, 2 * net.udp_delay
    assert end - t0 > 2 * sig_rtt  # the drain really was on the critical path
    assert end - t0 <= 2 * sig_rtt + udp_rtt + 1e-9


def test_abort_unknown_expires_with_peer_gone() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=B)
    net.pools[B].remove(NONCE, net.now)
    net.take(A, NONCE)
    net.run_sessions()
    expired = [e for e in net.events(A) if isinstance(e, StateChanged) and e.target == "Expired"]
    assert [e.reason for e in expired] == [ExpiryReason.PEER_GONE]
