"""Handover sessions (spec/handover.md) between two simulated nodes (natpool.sim), in virtual time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason
from natpool.core.handover import InitiatorSession
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import (
    ChannelBroken,
    HandoverError,
    PairBusy,
)
from natpool.sim import TakeHandle
from natpool.wire.signal import SignalType, decode
from tests.support.handover_sim import (
    A,
    B,
    Faults,
    assert_no_leak,
    assert_silent_after_lock,
    duo,
    leases,
    sessions,
    types,
)

NONCE = 0xC0FFEE
CFG = PairConfig(ping_interval=5.0, no_inbound_timeout=20.0, ping_lifespan=2.0, lock_timeout=1.0)


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_happy_path(initiator: str) -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    net.run_until(10.001)  # a ping left A at t=10 and is in flight: the pinger must drain it
    t0 = net.now
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert types(net, link) == ["LOCK", "LOCKED", "TAKE", "TAKEN"]
    got = leases(link)
    assert sorted(le.role for le in got) == ["initiator", "responder"]
    assert all(le.nonce == NONCE for le in got)
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"
    assert_silent_after_lock(net, NONCE)
    assert_no_leak(net, NONCE)
    # Virtual-time latency: two signalling round trips (+ one UDP RTT when the pinger answers LOCK),
    # nowhere near ping_lifespan.
    sig_rtt, udp_rtt = 2 * net.sig_delay, 2 * net.udp_delay
    end = max(s.ended_at or 0.0 for _, s in sessions(net.sim))
    assert end - t0 <= 2 * sig_rtt + udp_rtt + 1e-9
    assert end - t0 < CFG.ping_lifespan


def test_lease_release_expires_both_sides_entries_for_good() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE)
    net.run_sessions()
    for lease in leases(link):
        node = net[A if lease.role == "initiator" else B]
        node.release(lease)
        node.release(lease)  # idempotent
        assert lease.released
    assert net.state(A, NONCE) == net.state(B, NONCE) == "Expired"


def test_claim_losers_fail_at_once_and_send_nothing() -> None:
    """50 concurrent takers of one pair on one node: one session, 49 PairBusy, no signal from the losers."""
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    links: list[TakeHandle] = []
    busy = 0
    for _ in range(50):
        handle = net.take(A, NONCE)
        if isinstance(handle.outcome, PairBusy):
            assert handle.done and handle.end is None  # failed at once, no channel opened
            busy += 1
        else:
            links.append(handle)
    assert (len(links), busy) == (1, 49)
    assert len(net.sim.signalling.channels) == 1
    net.run_sessions()
    assert len(leases(links[0])) == 2
    assert types(net, links[0]) == ["LOCK", "LOCKED", "TAKE", "TAKEN"]
    assert len(net.sim.signalling.log) == 4  # nothing from the losers


def test_fifty_threads_racing_start_take_get_one_session() -> None:
    """The claim CAS holds across threads too: one InitiatorSession, 49 PairBusy, one LOCK queued.

    A unit test of the pool's lock, driven from threads, so no simulator: the
    sans-IO pool is what the threads share.
    """
    pool = PairPool(A, CFG)
    pair = EndpointPair(Endpoint(A, "10.0.0.1", 40000), Endpoint(B, "10.0.0.2", 40000), NONCE)
    pool.add(pair, True, 0.0)
    barrier = threading.Barrier(50)

    def attempt() -> InitiatorSession | PairBusy:
        barrier.wait()
        try:
            return pool.start_take(NONCE, None, 0.0)
        except PairBusy as exc:
            return exc

    with ThreadPoolExecutor(max_workers=50) as ex:
        results = list(ex.map(lambda _i: attempt(), range(50)))
    sessions = [r for r in results if isinstance(r, InitiatorSession)]
    assert len(sessions) == 1 and sum(isinstance(r, PairBusy) for r in results) == 49
    assert [decode(d).type for d in sessions[0].signals_to_send()] == [SignalType.LOCK]
    assert pool.handovers.sessions() == sessions


def test_take_any_picks_an_idle_pair_and_reports_busy_when_none() -> None:
    net = duo(CFG)
    net.add_pair(1, pinger=A)
    net.add_pair(2, pinger=B)
    first = net.take(A, peer=B)
    second = net.take(A, peer=B)
    third = net.take(A, peer=B)
    assert third.done and isinstance(third.outcome, PairBusy) and third.end is None
    net.run_sessions()
    assert len(leases(first)) == len(leases(second)) == 2
    assert first.session is not None and second.session is not None
    assert {first.session.nonce, second.session.nonce} == {1, 2}


def test_unknown_pair_is_aborted_and_the_initiator_expires_its_entry() -> None:
    """Rule 6: LOCK for an unknown nonce gets ABORT(unknown); the initiator's entry expires (PEER_GONE)."""
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    net[B].remove(NONCE)
    link = net.take(A, NONCE)
    net.run_sessions()
    assert types(net, link) == ["LOCK", "ABORT"]
    assert net.state(A, NONCE) == "Expired"
    assert isinstance(link.outcome, HandoverError)
    assert_no_leak(net, NONCE)


def test_busy_peer_refuses_and_the_entry_returns_to_idle() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    net[B].claim(NONCE)  # B's side is claimed by someone else (no session)
    link = net.take(A, NONCE)
    net.run_sessions()
    assert types(net, link) == ["LOCK", "BUSY"]
    assert isinstance(link.outcome, PairBusy)
    assert net.state(A, NONCE) == "Idle"
    assert not net[A].pool.handovers.sessions()


def test_channel_closed_before_anything_returns_the_entry() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE, faults=Faults(drop_in_flight=lambda sender, data: True))
    net.run_sessions()
    assert isinstance(link.outcome, ChannelBroken)
    assert link.responder is None  # the LOCK never arrived
    assert net.state(A, NONCE) == net.state(B, NONCE) == "Idle"


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_drain_costs_at_most_one_udp_round_trip_when_udp_is_slower_than_signalling(initiator: str) -> None:
    """UDP one-way 30 ms, signalling 20 ms, a ping in flight when the pinger locks: ≤ 2 sig RTT + 1 UDP RTT."""
    net = duo(CFG, udp_delay=0.03, sig_delay=0.02)
    net.add_pair(NONCE, pinger=A)
    # Pinger initiator: take 1 ms after the t=10 ping. Ponger initiator: LOCK reaches the pinger 5 ms after it.
    net.run_until(10.001 if initiator == A else 9.985)
    t0 = net.now
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert len(leases(link)) == 2
    assert_silent_after_lock(net, NONCE)
    end = max(s.ended_at or 0.0 for _, s in sessions(net.sim))
    sig_rtt, udp_rtt = 2 * net.sig_delay, 2 * net.udp_delay
    assert end - t0 > 2 * sig_rtt  # the drain really was on the critical path
    assert end - t0 <= 2 * sig_rtt + udp_rtt + 1e-9


def test_abort_unknown_expires_with_peer_gone() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=B)
    net[B].remove(NONCE)
    net.take(A, NONCE)
    net.run_sessions()
    expired = [e for e in net[A].transitions() if e.target == "Expired"]
    assert [e.reason for e in expired] == [ExpiryReason.PEER_GONE]
    assert net[A].expiries() == {NONCE: ExpiryReason.PEER_GONE}
