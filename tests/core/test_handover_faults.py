"""Handover under faults: simultaneous takes, broken channels, loss/duplication, bad signals, timeouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from natpool.config import PairConfig
from natpool.core.lease import Lease
from natpool.errors import (
    ChannelBroken,
    DropReason,
    HandoverError,
    HandoverTimeout,
    PairBusy,
    PeerRefused,
    SignalProtocolError,
)
from natpool.sim import InFlight, frame_kind
from natpool.wire.signal import AbortReason, Signal, SignalType, decode, encode
from tests.support.handover_sim import (
    A,
    B,
    Duo,
    Faults,
    assert_no_leak,
    assert_symmetry,
    channel,
    duo,
    leases,
    sessions,
)

NONCE = 0xBEEF
CFG = PairConfig(ping_interval=5.0, no_inbound_timeout=20.0, ping_lifespan=2.0, lock_timeout=1.0)


def _is(stype: SignalType) -> Callable[[str, bytes], bool]:
    def match(_sender: str, data: bytes) -> bool:
        try:
            return decode(data).type is stype
        except Exception:
            return False

    return match


def _final_rule(net: Duo, nonce: int) -> None:
    """Rule 4 as observed: a side that locked never ends Idle; a side that never locked never ends InUse."""
    for node in (A, B):
        state = net.state(node, nonce)
        if net.locked_at(node, nonce) is not None:
            assert state in ("InUse", "Expired"), (node, state)
        else:
            assert state in ("Idle", "Expired"), (node, state)


# --- simultaneous takes (rule 5: the pinger's session wins) -------------------------


@pytest.mark.parametrize("pinger", [A, B])
@pytest.mark.parametrize("skew", [0.0, 0.005, -0.005, 0.019, -0.019])
def test_simultaneous_takes_pinger_session_wins(pinger: str, skew: float) -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=pinger)
    ponger = B if pinger == A else A
    net.run_until(1.0)
    first, second = (pinger, ponger) if skew >= 0 else (ponger, pinger)
    link1 = net.take(first, NONCE)
    net.run_until(net.now + abs(skew))
    link2 = net.take(second, NONCE)  # both LOCKs are in flight at once (|skew| < signalling delay)
    net.run_sessions()
    by_node = {link1.node.identity: link1, link2.node.identity: link2}
    winner, loser = by_node[pinger], by_node[ponger]
    assert sorted(le.role for le in leases(winner)) == ["initiator", "responder"]
    assert loser.end is not None  # the loser's LOCK was sent: it lost the tie-break, not the local claim
    assert isinstance(loser.outcome, PairBusy)
    assert leases(loser) == []
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"
    assert_no_leak(net, NONCE)


def test_take_after_the_peers_lock_arrived_is_busy_locally() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    net.take(A, NONCE)
    net.run_until(net.now + net.sig_delay)  # LOCK delivered: B's entry belongs to the responder
    late = net.take(B, NONCE)
    assert late.done and isinstance(late.outcome, PairBusy) and late.end is None
    net.run_sessions()
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"


# --- the channel breaks after each message -------------------------------------------


@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
@pytest.mark.parametrize("stype", [SignalType.LOCK, SignalType.LOCKED, SignalType.TAKE, SignalType.TAKEN])
@pytest.mark.parametrize("mode", ["delivered", "lost"])
def test_channel_broken_after_each_message(pinger: str, stype: SignalType, mode: str) -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=pinger)
    net.run_until(10.001)
    match = _is(stype)
    faults = Faults(break_after=match) if mode == "delivered" else Faults(drop_in_flight=match)
    link = net.take(A, NONCE, faults=faults)
    net.run_sessions()
    assert channel(link).broken
    init, resp = link.session, link.responder
    assert init is not None and init.done and (resp is None or resp.done)
    # Which side still gets its lease depends only on whether it saw the other's point of no return.
    got_taken = mode == "delivered" and stype is SignalType.TAKEN
    got_take = (mode == "delivered" and stype is SignalType.TAKE) or stype is SignalType.TAKEN
    assert isinstance(init.outcome, Lease) == got_taken
    assert isinstance(init.outcome, Lease) or isinstance(init.outcome, ChannelBroken)
    if resp is not None:
        assert isinstance(resp.outcome, Lease) == got_take
    _final_rule(net, NONCE)
    assert_symmetry(net, NONCE)
    assert_no_leak(net, NONCE)
    if stype in (SignalType.LOCK, SignalType.LOCKED):
        # Before TAKE nobody may be InUse.
        assert net.state(A, NONCE) in ("Idle", "Expired") and net.state(B, NONCE) in ("Idle", "Expired")
    if stype is SignalType.LOCK or (stype is SignalType.LOCKED and mode == "lost"):
        assert net.state(A, NONCE) == "Idle"  # the initiator never went silent: back to the pool


def test_peer_closing_the_channel_in_settling_does_not_stop_the_lease() -> None:
    """Past TAKEN (Settling) the spec has no failure edge: settle completes on its own timer."""
    net = duo(PairConfig(lock_timeout=1.0, settle_time=0.05))
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE, faults=Faults(break_after=_is(SignalType.TAKEN)))
    net.run_sessions()
    assert channel(link).broken
    assert len(leases(link)) == 2
    for le in leases(link):
        assert le.entry.locked_at is not None
        s = link.session if le.role == "initiator" else link.responder
        assert s is not None and s.ended_at is not None
        assert s.ended_at >= le.entry.locked_at + 0.05


# --- keepalive loss and duplication during the drain ---------------------------------


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_lost_pong_during_drain_costs_the_drain_grace_not_ping_lifespan(initiator: str) -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    net.run_until(9.99)  # srtt is known from earlier rounds
    t0 = net.now
    lost: list[InFlight] = []

    def copies(dg: InFlight) -> int:
        if frame_kind(dg.data) == "pong" and dg.sent_at >= t0 and not lost:
            lost.append(dg)
            return 0
        return 1

    net.sim.network.fate = copies
    if initiator == A:
        net.run_until(10.001)  # ping at t=10 in flight, its pong will be lost
    t_take = net.now
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert lost, "the scenario must lose the pong of the ping in flight"
    assert len(leases(link)) == 2
    end = max(s.ended_at or 0.0 for _, s in sessions(net.sim))
    assert end - t_take < CFG.ping_lifespan / 4
    srtt = net[A].entry(NONCE).srtt
    assert srtt is not None
    grace = max(CFG.min_drain_grace, CFG.drain_grace_rtts * srtt)
    assert end - lost[0].sent_at <= grace + 2 * (2 * net.sig_delay) + 1e-9


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_duplicated_frames_during_drain(initiator: str) -> None:
    """Duplicated keepalives are counted drops, never an answer from a silent side; settle_time covers them."""
    cfg = PairConfig(lock_timeout=1.0, settle_time=0.02)
    net = duo(cfg)
    net.add_pair(NONCE, pinger=A)
    net.sim.network.fate = lambda _dg: 2
    net.run_until(10.001)
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert len(leases(link)) == 2
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"
    for node in (A, B):
        locked = net.locked_at(node, NONCE)
        assert locked is not None
        assert not [s for s in net.sim.sent_by(node) if s.time >= locked]
    assert net.sim.silence_violations() == []
    assert sum(net[A].pool.drops.values()) + sum(net[B].pool.drops.values()) > 0


# --- bad signals: replayed, forged, malformed, out of order, unexpected ------------------


def _reencode(data: bytes, **changes: object) -> bytes:
    sig = decode(data)
    fields: dict[str, object] = {"type": sig.type, "nonce": sig.nonce, "sid": sig.sid, "seq": sig.seq,
                                 "reason": sig.reason}
    fields.update(changes)
    return encode(Signal(**fields))  # type: ignore[arg-type]


TAMPERS: dict[str, tuple[DropReason, object]] = {
    "replayed": (DropReason.REPLAY, lambda d: [d, d]),
    "wrong-nonce": (DropReason.WRONG_NONCE, lambda d: [_reencode(d, nonce=decode(d).nonce + 1)]),
    "wrong-session": (DropReason.UNEXPECTED, lambda d: [_reencode(d, sid=b"\xee" * 16)]),
    "malformed": (DropReason.MALFORMED, lambda d: [d[:-1]]),
    "oversized": (DropReason.OVERSIZED, lambda d: [d + b"\x00" * 100]),
    "out-of-order": (DropReason.UNEXPECTED, lambda d: [_reencode(d, seq=decode(d).seq + 1)]),
    "wrong-type": (DropReason.UNEXPECTED,
                   lambda d: [_reencode(d, type=SignalType.TAKEN if decode(d).type is not SignalType.TAKEN
                                        else SignalType.LOCKED)]),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
@pytest.mark.parametrize("stype", [SignalType.LOCK, SignalType.LOCKED, SignalType.TAKE, SignalType.TAKEN])
@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_bad_signal_ends_the_session_cleanly(tamper: str, stype: SignalType, pinger: str) -> None:
    reason, fn = TAMPERS[tamper]
    if tamper == "replayed" and stype is SignalType.LOCK:
        reason = DropReason.REPLAY  # the responder's second message is the replayed LOCK #1

    def tampering(_sender: str, data: bytes) -> list[bytes]:
        if decode(data).type is stype:
            out: list[bytes] = fn(data)  # type: ignore[operator]
            return out
        return [data]

    late_replay = tamper == "replayed" and stype in (SignalType.TAKE, SignalType.TAKEN)
    # A replay of the last message reaches its receiver only while the receiver's session lives:
    # once it ended, its end of the channel is closed and the copy is lost with it. Settling keeps
    # the session (and its end) open long enough for the copy to arrive and be counted.
    net = duo(replace(CFG, settle_time=0.05) if late_replay else CFG)
    net.add_pair(NONCE, pinger=pinger)
    net.run_until(10.001)
    link = net.take(A, NONCE, faults=Faults(tamper=tampering))
    net.run_sessions()  # no exception escapes receive_signal / accept_session
    receiver = link.responder if stype in (SignalType.LOCK, SignalType.TAKE) else link.session
    assert receiver is not None
    total_drops = net[A].pool.handovers.drops + net[B].pool.handovers.drops
    assert total_drops[reason] >= 1, (total_drops, reason)
    if late_replay:
        # The first copy completed the take; the replay reaches a settling session and is only counted.
        assert isinstance(receiver.outcome, Lease)
    elif tamper == "wrong-nonce" and stype is SignalType.LOCK:
        # A LOCK naming another pair is a LOCK for an unknown pair: ABORT(unknown), which the initiator
        # in turn rejects as bound to the wrong nonce.
        assert isinstance(receiver.outcome, HandoverError)
        assert isinstance(link.outcome, SignalProtocolError)
    else:
        assert isinstance(receiver.outcome, SignalProtocolError), receiver.outcome
    _final_rule(net, NONCE)
    assert_symmetry(net, NONCE)
    assert_no_leak(net, NONCE)


def test_first_signal_garbage_is_refused_without_reply() -> None:
    """Channels someone else opened to bob, each starting with garbage: refused, nothing sent back, closed."""
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    sig = net.sim.signalling
    ours = []
    for data in (b"", b"\x00" * 31, b"\x91" * 500):
        mallory, at_bob = sig.open("mallory", net[B])
        net[B].serve(at_bob)
        assert mallory.send(data)
        ours.append(mallory)
    net.run_sessions()
    refused = [link.session for link in net[B].links]
    assert len(refused) == 3
    assert all(s.done and isinstance(s.outcome, SignalProtocolError) for s in refused)
    assert [rec.sender for rec in sig.log] == ["mallory"] * 3  # no reply
    assert all(end.closed_by_peer and end.received == [] for end in ours)  # bob just closed
    drops = net[B].pool.handovers.drops
    assert drops[DropReason.MALFORMED] == 2
    assert drops[DropReason.OVERSIZED] == 1
    assert net.state(B, NONCE) == "Idle"


def test_session_opened_with_other_than_lock_is_refused_with_abort() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    mallory, at_bob = net.sim.signalling.open("mallory", net[B])
    net[B].serve(at_bob)
    mallory.send(encode(Signal(SignalType.TAKE, NONCE, b"\x01" * 16, 1)))
    net.run_sessions()
    [link] = net[B].links
    assert isinstance(link.session.outcome, SignalProtocolError)
    [reply] = [decode(d) for d in mallory.received]
    assert reply.type is SignalType.ABORT and reply.reason is AbortReason.PROTOCOL
    assert mallory.closed_by_peer
    assert net.state(B, NONCE) == "Idle"


# --- timeouts and peer aborts ---------------------------------------------------------------


@pytest.mark.parametrize("swallow", [SignalType.LOCK, SignalType.LOCKED, SignalType.TAKE, SignalType.TAKEN])
@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_silent_peer_times_out_per_the_failure_rule(swallow: SignalType, pinger: str) -> None:
    def swallowing(_sender: str, data: bytes) -> list[bytes]:
        return [] if decode(data).type is swallow else [data]

    net = duo(CFG)
    net.add_pair(NONCE, pinger=pinger)
    link = net.take(A, NONCE, faults=Faults(tamper=swallowing))
    net.run_sessions()
    if swallow is SignalType.TAKEN:
        assert isinstance(link.outcome, HandoverTimeout | ChannelBroken)
    else:
        assert isinstance(link.outcome, HandoverTimeout)
    if link.responder is not None and swallow is not SignalType.TAKEN:
        # A swallowed message also breaks the FIFO: a later ABORT then shows a sequence gap.
        assert isinstance(link.responder.outcome,
                          HandoverTimeout | ChannelBroken | PeerRefused | SignalProtocolError)
    _final_rule(net, NONCE)
    assert_symmetry(net, NONCE)
    assert_no_leak(net, NONCE)


def test_entry_expiring_mid_handover_ends_the_session_with_abort() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=B)
    link = net.take(A, NONCE)
    net.run_until(net.now + net.sig_delay / 2)
    net[A].remove(NONCE)  # the local entry dies while LOCK is in flight
    net.run_sessions()
    init = link.session
    assert init is not None and isinstance(init.outcome, HandoverError)
    assert [s.type for s in init.sent] == [SignalType.LOCK, SignalType.ABORT]
    assert init.sent[-1].reason is AbortReason.ENTRY_GONE
    assert net.state(B, NONCE) in ("Idle", "Expired")
    assert_no_leak(net, NONCE)


def test_cancel_aborts_and_returns_the_entry() -> None:
    net = duo(CFG)
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE)
    init = link.session
    assert init is not None
    init.cancel(net.now)
    net[A].pump()  # touched the session directly: pump, as a driver would
    net.run_sessions()
    assert [s.type for s in init.sent] == [SignalType.LOCK, SignalType.ABORT]
    assert init.sent[-1].reason is AbortReason.CANCELLED
    assert net.state(A, NONCE) == net.state(B, NONCE) == "Idle"
    assert_no_leak(net, NONCE)


def test_settle_waits_from_entering_settling_and_losing_the_entry_there_fails() -> None:
    """Rule 7: settle_time counts from Settling (TAKE / TAKEN seen); only losing the entry fails it."""
    net = duo(PairConfig(lock_timeout=1.0, settle_time=0.1))
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE)
    net.run_until(net.now + 10, lambda: link.responder is not None and link.responder.state == "Settling")
    resp = link.responder
    assert resp is not None
    entered = net.now
    init = link.session
    assert init is not None
    net.run_until(net.now + 10, lambda: init.state == "Settling")
    net[A].remove(NONCE)  # the initiator's entry dies while settling
    net.run_sessions()
    assert init.state == "Failed" and isinstance(init.outcome, HandoverError)
    assert isinstance(resp.outcome, Lease)
    assert resp.ended_at is not None and resp.ended_at >= entered + 0.1
    assert net.state(B, NONCE) == "InUse"
    assert_no_leak(net, NONCE)
