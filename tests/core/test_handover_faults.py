"""Handover under faults: simultaneous takes, broken channels, loss/duplication, bad signals, timeouts."""

from __future__ import annotations

from collections.abc import Callable

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
from natpool.wire.frame import Kind
from natpool.wire.signal import AbortReason, Signal, SignalType, decode, encode
from tests.support.handover_net import A, B, Link, Net, Sent, assert_no_leak, assert_symmetry, leases

NONCE = 0xBEEF
CFG = PairConfig(ping_interval=5.0, no_inbound_timeout=20.0, ping_lifespan=2.0, lock_timeout=1.0)


def _is(stype: SignalType) -> Callable[[str, bytes], bool]:
    def match(_sender: str, data: bytes) -> bool:
        try:
            return decode(data).type is stype
        except Exception:
            return False

    return match


def _final_rule(net: Net, nonce: int) -> None:
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
    net = Net(CFG)
    net.add_pair(NONCE, pinger=pinger)
    ponger = B if pinger == A else A
    net.run_until(1.0)
    first, second = (pinger, ponger) if skew >= 0 else (ponger, pinger)
    link1 = net.take(first, NONCE)
    net.run_until(net.now + abs(skew))
    link2 = net.take(second, NONCE)  # both LOCKs are in flight at once (|skew| < signalling delay)
    net.run_sessions()
    by_node = {link1.a: link1, link2.a: link2}
    winner, loser = by_node[pinger], by_node[ponger]
    assert sorted(le.role for le in leases(winner)) == ["initiator", "responder"]
    assert isinstance(loser.initiator.outcome, PairBusy)
    assert leases(loser) == []
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"
    assert_no_leak(net, NONCE)


def test_take_after_the_peers_lock_arrived_is_busy_locally() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    net.take(A, NONCE)
    net.run_until(net.now + net.sig_delay)  # LOCK delivered: B's entry belongs to the responder
    with pytest.raises(PairBusy):
        net.take(B, NONCE)
    net.run_sessions()
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"


# --- the channel breaks after each message -------------------------------------------


@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
@pytest.mark.parametrize("stype", [SignalType.LOCK, SignalType.LOCKED, SignalType.TAKE, SignalType.TAKEN])
@pytest.mark.parametrize("mode", ["delivered", "lost"])
def test_channel_broken_after_each_message(pinger: str, stype: SignalType, mode: str) -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=pinger)
    net.run_until(10.001)
    match = _is(stype)
    link = (net.take(A, NONCE, break_after=match) if mode == "delivered"
            else net.take(A, NONCE, drop_in_flight=match))
    net.run_sessions()
    assert link.broken
    init, resp = link.initiator, link.responder
    assert init.done and (resp is None or resp.done)
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
    net = Net(PairConfig(lock_timeout=1.0, settle_time=0.05))
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE, break_after=_is(SignalType.TAKEN))
    net.run_sessions()
    assert len(leases(link)) == 2
    for le in leases(link):
        assert le.entry.locked_at is not None
        s = link.session(A if le.role == "initiator" else B)
        assert s is not None and s.ended_at is not None
        assert s.ended_at >= le.entry.locked_at + 0.05


# --- keepalive loss and duplication during the drain ---------------------------------


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_lost_pong_during_drain_costs_the_drain_grace_not_ping_lifespan(initiator: str) -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    net.run_until(9.99)  # srtt is known from earlier rounds
    t0 = net.now
    lost: list[Sent] = []

    def copies(sent: Sent) -> int:
        if sent.kind is Kind.PONG and sent.at >= t0 and not lost:
            lost.append(sent)
            return 0
        return 1

    net.udp_copies = copies
    if initiator == A:
        net.run_until(10.001)  # ping at t=10 in flight, its pong will be lost
    t_take = net.now
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert lost, "the scenario must lose the pong of the ping in flight"
    assert len(leases(link)) == 2
    end = max(s.ended_at or 0.0 for _, _, s in net.sessions())
    assert end - t_take < CFG.ping_lifespan / 4
    srtt = net.pools[A].get(NONCE).srtt
    assert srtt is not None
    grace = max(CFG.min_drain_grace, CFG.drain_grace_rtts * srtt)
    assert end - lost[0].at <= grace + 2 * (2 * net.sig_delay) + 1e-9


@pytest.mark.parametrize("initiator", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_duplicated_frames_during_drain(initiator: str) -> None:
    """Duplicated keepalives are counted drops, never an answer from a silent side; settle_time covers them."""
    cfg = PairConfig(lock_timeout=1.0, settle_time=0.02)
    net = Net(cfg)
    net.add_pair(NONCE, pinger=A)
    net.udp_copies = lambda _s: 2
    net.run_until(10.001)
    link = net.take(initiator, NONCE)
    net.run_sessions()
    assert len(leases(link)) == 2
    assert net.state(A, NONCE) == net.state(B, NONCE) == "InUse"
    for node in (A, B):
        locked = net.locked_at(node, NONCE)
        assert locked is not None
        assert not [s for s in net.log if s.sender == node and s.at >= locked]
    assert sum(net.pools[A].drops.values()) + sum(net.pools[B].drops.values()) > 0


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

    net = Net(CFG)
    net.add_pair(NONCE, pinger=pinger)
    net.run_until(10.001)
    link = net.take(A, NONCE, tamper=tampering)
    net.run_sessions()  # no exception escapes receive_signal / accept_session
    receiver = link.responder if stype in (SignalType.LOCK, SignalType.TAKE) else link.initiator
    assert receiver is not None
    total_drops = net.pools[A].handovers.drops + net.pools[B].handovers.drops
    assert total_drops[reason] >= 1, (total_drops, reason)
    if tamper == "replayed" and stype in (SignalType.TAKE, SignalType.TAKEN):
        # The first copy completed the take; the replay reaches an ended session and is only counted.
        assert isinstance(receiver.outcome, Lease)
    elif tamper == "wrong-nonce" and stype is SignalType.LOCK:
        # A LOCK naming another pair is a LOCK for an unknown pair: ABORT(unknown), which the initiator
        # in turn rejects as bound to the wrong nonce.
        assert isinstance(receiver.outcome, HandoverError)
        assert isinstance(link.initiator.outcome, SignalProtocolError)
    else:
        assert isinstance(receiver.outcome, SignalProtocolError), receiver.outcome
    _final_rule(net, NONCE)
    assert_symmetry(net, NONCE)
    assert_no_leak(net, NONCE)


def test_first_signal_garbage_is_refused_without_reply() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    pool = net.pools[B]
    for data in (b"", b"\x00" * 31, b"\x91" * 500):
        session = pool.accept_session(data, net.now)
        assert session.done and isinstance(session.outcome, SignalProtocolError)
        assert session.signals_to_send() == []
    assert pool.handovers.drops[DropReason.MALFORMED] == 2
    assert pool.handovers.drops[DropReason.OVERSIZED] == 1
    assert pool.get(NONCE).state == "Idle"


def test_session_opened_with_other_than_lock_is_refused_with_abort() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    pool = net.pools[B]
    session = pool.accept_session(encode(Signal(SignalType.TAKE, NONCE, b"\x01" * 16, 1)), net.now)
    assert isinstance(session.outcome, SignalProtocolError)
    [reply] = [decode(d) for d in session.signals_to_send()]
    assert reply.type is SignalType.ABORT and reply.reason is AbortReason.PROTOCOL
    assert pool.get(NONCE).state == "Idle"


# --- timeouts and peer aborts ---------------------------------------------------------------


@pytest.mark.parametrize("swallow", [SignalType.LOCK, SignalType.LOCKED, SignalType.TAKE, SignalType.TAKEN])
@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_silent_peer_times_out_per_the_failure_rule(swallow: SignalType, pinger: str) -> None:
    def swallowing(_sender: str, data: bytes) -> list[bytes]:
        return [] if decode(data).type is swallow else [data]

    net = Net(CFG)
    net.add_pair(NONCE, pinger=pinger)
    link = net.take(A, NONCE, tamper=swallowing)
    net.run_sessions()
    if swallow is SignalType.TAKEN:
        assert isinstance(link.initiator.outcome, HandoverTimeout | ChannelBroken)
    else:
        assert isinstance(link.initiator.outcome, HandoverTimeout)
    if link.responder is not None and swallow is not SignalType.TAKEN:
        # A swallowed message also breaks the FIFO: a later ABORT then shows a sequence gap.
        assert isinstance(link.responder.outcome,
                          HandoverTimeout | ChannelBroken | PeerRefused | SignalProtocolError)
    _final_rule(net, NONCE)
    assert_symmetry(net, NONCE)
    assert_no_leak(net, NONCE)


def test_entry_expiring_mid_handover_ends_the_session_with_abort() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=B)
    link = net.take(A, NONCE)
    net.run_until(net.now + net.sig_delay / 2)
    net.pools[A].remove(NONCE, net.now)  # the local entry dies while LOCK is in flight
    net.flush()
    net.run_sessions()
    assert isinstance(link.initiator.outcome, HandoverError)
    assert [s.type for s in link.initiator.sent] == [SignalType.LOCK, SignalType.ABORT]
    assert link.initiator.sent[-1].reason is AbortReason.ENTRY_GONE
    assert net.state(B, NONCE) in ("Idle", "Expired")
    assert_no_leak(net, NONCE)


def test_cancel_aborts_and_returns_the_entry() -> None:
    net = Net(CFG)
    net.add_pair(NONCE, pinger=A)
    link: Link = net.take(A, NONCE)
    link.initiator.cancel(net.now)
    net.flush()
    net.run_sessions()
    assert [s.type for s in link.initiator.sent] == [SignalType.LOCK, SignalType.ABORT]
    assert link.initiator.sent[-1].reason is AbortReason.CANCELLED
    assert net.state(A, NONCE) == net.state(B, NONCE) == "Idle"
    assert_no_leak(net, NONCE)


def test_settle_waits_from_entering_settling_and_losing_the_entry_there_fails() -> None:
    """Rule 7: settle_time counts from Settling (TAKE / TAKEN seen); only losing the entry fails it."""
    net = Net(PairConfig(lock_timeout=1.0, settle_time=0.1))
    net.add_pair(NONCE, pinger=A)
    link = net.take(A, NONCE)
    net.run_until(net.now + 10, lambda: link.responder is not None and link.responder.state == "Settling")
    resp = link.responder
    assert resp is not None
    entered = net.now
    net.run_until(net.now + 10, lambda: link.initiator.state == "Settling")
    net.pools[A].remove(NONCE, net.now)  # the initiator's entry dies while settling
    net.flush()
    net.run_sessions()
    assert link.initiator.state == "Failed" and isinstance(link.initiator.outcome, HandoverError)
    assert isinstance(resp.outcome, Lease)
    assert resp.ended_at is not None and resp.ended_at >= entered + 0.1
    assert net.state(B, NONCE) == "InUse"
    assert_no_leak(net, NONCE)
