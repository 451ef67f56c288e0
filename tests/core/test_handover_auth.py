"""Peer binding and signed, fresh signals (issue 10 item 4), message by message, on :mod:`natpool.sim`.

alice and bob share one pair; mallory is a third node on the same simulated
signalling service. Signalling is manual (``signalling_manual=True``): every
message waits in ``sim.signalling.in_flight`` until the test delivers it, so
a test records, replays, forges (a channel's ``intercept``, a raw channel it
opens and hands to bob with ``serve``) and withholds any signal exactly where
it wants. Datagrams cross an instant link (no delay) and only move when the
virtual clock does (:func:`udp`), so a drain completes as soon as the test
lets the keepalive frames through. No time passes unless a test moves it.

The timed, whole-take versions of these attacks live in tests/sim/test_sim_auth.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from natpool.config import PairConfig
from natpool.core.handover import InitiatorSession, Session
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, HandoverError, InvalidKey, PairBusy, PeerRefused
from natpool.sim import Channel, ChannelEnd, NetConfig, SimNode, Simulation, TakeHandle
from natpool.wire import signal as wire
from natpool.wire.keys import SIGNAL, derive
from natpool.wire.signal import NO_RAND, AbortReason, Signal, SignalType

A, B, M = "alice", "bob", "mallory"
NONCE = 0xC0FFEE
KEY = bytes(range(32))
CFG = PairConfig(ping_interval=1.0, no_inbound_timeout=30.0, ping_lifespan=1.0, lock_timeout=5.0)
INSTANT = NetConfig(delay_min=0.0, delay_max=0.0)


def new_sim() -> tuple[Simulation, SimNode, SimNode, SimNode]:
    sim = Simulation(11, INSTANT, config=CFG, signalling_manual=True)
    return sim, sim.add_node(A), sim.add_node(B), sim.add_node(M)


def setup(key: bytes | None = KEY, pinger: str = A) -> tuple[Simulation, SimNode, SimNode, SimNode]:
    """alice and bob holding pair NONCE (``pinger`` pings, both ``key``), first keepalive exchanged; and mallory."""
    sim, a, b, m = new_sim()
    sim.punch(a, b, nonce=NONCE, pinger=a if pinger == A else b, key=key)
    udp(sim)
    return sim, a, b, m


def udp(sim: Simulation) -> None:
    """Deliver the datagrams due now, and what they cause (the drain completes); the clock stays."""
    sim.run_for(0.0)


def deliver(sim: Simulation, channel: Channel, to: str | None = None, count: int | None = None) -> list[bytes]:
    """Deliver what waits on ``channel`` in FIFO order (only towards node ``to``; at most ``count`` messages).

    Replies made meanwhile are delivered too (unless ``to`` excludes them);
    close notices are delivered as they come up. Returns the messages, in order.
    """
    sig = sim.signalling
    out: list[bytes] = []
    while count is None or len(out) < count:
        i = next((i for i in sig.deliverable()
                  if sig.in_flight[i].channel is channel and to in (None, sig.in_flight[i].to.owner)), None)
        if i is None:
            break
        data = sig.in_flight[i].data
        sig.deliver(i)
        if data is not None:
            out.append(data)
    return out


def waiting(sim: Simulation, channel: Channel, to: str) -> list[bytes]:
    """The messages on their way to node ``to`` on ``channel``, oldest first."""
    return [p.data for p in sim.signalling.in_flight if p.channel is channel and p.to.owner == to and p.data]


def opened(sim: Simulation, sender: SimNode, to: SimNode, anonymous: bool = False) -> tuple[ChannelEnd, ChannelEnd]:
    """A channel from ``sender`` that ``to`` serves as responder; returns (sender's end, ``to``'s end)."""
    end, far = sim.signalling.open(sender, to)
    to.serve(far, anonymous=anonymous)
    return end, far


def served(node: SimNode, end: ChannelEnd) -> Session:
    """The responder session ``node`` opened for the first message on ``end``."""
    (session,) = [link.session for link in node.links if link.end is end]
    return session


def take(node: SimNode) -> tuple[TakeHandle, InitiatorSession, Channel]:
    handle = node.take(NONCE)
    assert handle.session is not None and handle.end is not None
    return handle, handle.session, handle.end.channel


def responder(handle: TakeHandle) -> Session:
    session = handle.responder
    assert session is not None
    return session


def lock_of(sim: Simulation, channel: Channel) -> bytes:
    """The LOCK waiting on ``channel`` (a recording of it: nothing is delivered)."""
    (lock,) = waiting(sim, channel, B)
    assert wire.decode(lock).type is SignalType.LOCK
    return lock


def no_transitions(node: SimNode) -> bool:
    return not [c for c in node.transitions() if c.nonce == NONCE]


# --- peer binding ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["legacy", "keyed"])
def test_lock_from_a_third_party_is_refused_and_claims_nothing(key: bytes | None) -> None:
    sim, a, b, m = setup(key)
    handle, _ini, ch = take(a)
    lock = lock_of(sim, ch)  # the real peer's LOCK bytes, recorded; alice's channel is never delivered
    a.cancel(handle)  # alice's take is not the point here
    end, far = opened(sim, m, b)
    end.send(lock)
    deliver(sim, end.channel)
    resp = served(b, far)
    assert resp.done and isinstance(resp.outcome, HandoverError)
    assert b.state(NONCE) == "Idle" and b.pool.handovers.owner(NONCE) is None and no_transitions(b)
    assert b.pool.drops == {DropReason.UNEXPECTED_PEER: 1}
    # answered as for an unknown nonce (legacy format: mallory holds no key of this pair), then closed
    assert [wire.decode(d) for d in end.received] == [
        Signal(SignalType.ABORT, NONCE, resp.sid, 1, AbortReason.UNKNOWN_PAIR)]
    assert end.closed_by_peer
    # the same LOCK on a channel whose peer is alice is served
    end2, far2 = opened(sim, a, b)
    end2.send(lock)
    deliver(sim, end2.channel)
    again = served(b, far2)
    assert not again.done and b.state(NONCE) == "InLocking" and b.pool.handovers.owner(NONCE) is again


def test_third_party_lock_during_a_local_take_does_not_win_the_tie_break() -> None:
    """bob (ponger) takes; mallory's LOCK for the pair arrives meanwhile: refused, bob's take goes on."""
    sim, a, b, m = setup(key=None)
    bob, bob_ini, bob_ch = take(b)
    end, far = opened(sim, m, b)
    end.send(wire.encode(Signal(SignalType.LOCK, NONCE, b"\x66" * 16, 1)))
    deliver(sim, end.channel)
    intruder = served(b, far)
    assert intruder.done and isinstance(intruder.outcome, HandoverError)
    assert not bob.done and bob_ini.state == "Locking" and b.pool.handovers.owner(NONCE) is bob_ini
    assert b.pool.drops == {DropReason.UNEXPECTED_PEER: 1}
    deliver(sim, bob_ch)
    assert isinstance(bob.lease, Lease) and isinstance(responder(bob).outcome, Lease)
    assert [le.role for le in a.leases()] == ["responder"]
    # control: the real peer's LOCK does win the tie-break over bob's pending take
    sim2, a2, b2, _m2 = setup(key=None)
    bob2, _, _ = take(b2)
    alice2, _, alice2_ch = take(a2)
    deliver(sim2, alice2_ch, to=B, count=1)
    winner = responder(alice2)
    assert isinstance(bob2.outcome, PairBusy) and b2.pool.handovers.owner(NONCE) is winner
    assert b2.pool.drops == {}


def test_peer_none_keeps_the_legacy_behaviour() -> None:
    """A signalling layer that cannot name the peer (peer_identity None) is not checked (documented as such)."""
    sim, _a, b, m = setup(key=None)
    end, far = opened(sim, m, b, anonymous=True)  # mallory's channel, but bob cannot tell whose it is
    end.send(wire.encode(Signal(SignalType.LOCK, NONCE, b"\x66" * 16, 1)))
    deliver(sim, end.channel)
    assert not served(b, far).done and b.state(NONCE) == "InLocking"
    assert b.pool.drops == {}


# --- signed signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_keyed_take_signs_every_signal_and_hands_over(pinger: str) -> None:
    sim, a, b, _m = setup(KEY, pinger=pinger)
    handle, ini, ch = take(a)
    log = deliver(sim, ch)
    resp = responder(handle)
    assert isinstance(ini.outcome, Lease) and isinstance(resp.outcome, Lease)
    assert [wire.decode(d).type.name for d in log] == ["LOCK", "LOCKED", "TAKE", "TAKEN"]
    assert [r.data for r in sim.signalling.sent_on(ch)] == log  # nothing else was sent
    sigs = [*ini.sent, *resp.sent]
    assert all(s.signed and len(wire.encode(s)) == wire.SIGNED_SIZE for s in sigs)
    assert {s.ri for s in sigs} == {ini.sent[0].ri}  # one initiator random, echoed by everyone
    assert ini.sent[0].rr == NO_RAND and {s.rr for s in resp.sent} == {s.rr for s in ini.sent[1:]}
    assert a.pool.drops == b.pool.drops == {}


def test_a_pinger_responder_stays_in_locking_until_take() -> None:
    """Freshness: LOCKED goes out once drained, but the pinger locks only on TAKE (spec/handover.md)."""
    sim, a, b, _m = setup(KEY, pinger=B)
    handle, _ini, ch = take(a)
    sent_before = len(sim.sent_by(B))
    deliver(sim, ch, to=B, count=1)  # LOCK
    (locked,) = waiting(sim, ch, A)
    assert wire.decode(locked).type is SignalType.LOCKED
    udp(sim)
    assert b.state(NONCE) == "InLocking" and b.entry(NONCE).drained and len(sim.sent_by(B)) == sent_before
    deliver(sim, ch, to=A, count=1)  # LOCKED: alice answers TAKE
    (take_sig,) = waiting(sim, ch, B)
    assert wire.decode(take_sig).type is SignalType.TAKE and b.state(NONCE) == "InLocking"
    deliver(sim, ch, to=B, count=1)
    resp = responder(handle)
    assert b.state(NONCE) == "InUse" and isinstance(resp.outcome, Lease)  # locked on TAKE (settle_time 0)


@pytest.mark.parametrize("pinger", [A, B], ids=["responder-ponger", "responder-pinger"])
def test_replayed_lock_and_disconnect_leave_the_pair_idle(pinger: str) -> None:
    """A recorded LOCK, replayed by someone on the real peer's channel, then a disconnect: the pair stays."""
    sim, a, b, _m = setup(KEY, pinger=pinger)
    handle, _ini, ch = take(a)
    lock = lock_of(sim, ch)
    a.cancel(handle)  # the recorded session never reached bob (its channel is never delivered)
    udp(sim)
    assert a.state(NONCE) == "Idle"
    end, far = opened(sim, a, b)  # appears to come from alice
    end.send(lock)
    deliver(sim, end.channel)
    replay = served(b, far)
    assert not replay.done and b.state(NONCE) == "InLocking"
    assert [wire.decode(d).type for d in end.received] == [SignalType.LOCKED]
    end.close()  # the replayer disconnects
    deliver(sim, end.channel)
    assert replay.done and b.state(NONCE) == "Idle"
    # and by timeout instead of a disconnect
    end2, far2 = opened(sim, a, b)
    end2.send(lock)
    deliver(sim, end2.channel)
    replay2 = served(b, far2)
    sim.run_for(CFG.lock_timeout + 0.1)
    assert replay2.done and not isinstance(replay2.outcome, Lease) and b.state(NONCE) == "Idle"
    assert a.state(NONCE) == "Idle" and a.expiries() == b.expiries() == {}
    assert a.leases() == b.leases() == []


def test_a_busy_session_replayed_later_yields_no_lease() -> None:
    """Issue 10's attack: a session that ended BUSY, replayed later, produced a lease. Not with a key."""
    sim, a, b, _m = setup(KEY)
    # an earlier successful session, fully recorded (the attacker has its TAKE too)
    handle0, ini0, ch0 = take(a)
    deliver(sim, ch0)
    old_take = next(wire.encode(s) for s in ini0.sent if s.type is SignalType.TAKE)
    resp0 = responder(handle0)
    assert isinstance(ini0.outcome, Lease) and isinstance(resp0.outcome, Lease)
    a.release(ini0.outcome)
    b.release(resp0.outcome)
    sim, a, b, _m = setup(KEY)  # a fresh pair (same key, same nonce: the worst case for replays)
    claimed = b.claim(NONCE)  # bob's side is busy: the session ends BUSY
    handle, _ini, ch = take(a)
    lock = lock_of(sim, ch)
    deliver(sim, ch)
    busy = responder(handle)
    assert isinstance(handle.outcome, PairBusy) and [s.type for s in busy.sent] == [SignalType.BUSY]
    claimed.abort_lock(sim.now())
    b.pump()
    assert a.state(NONCE) == b.state(NONCE) == "Idle"
    # later: the attacker replays the BUSY session's LOCK, then every TAKE it can make
    end, far = opened(sim, a, b)
    end.send(lock)
    deliver(sim, end.channel)
    replay = served(b, far)
    (locked,) = (wire.decode(d) for d in end.received)
    assert locked.type is SignalType.LOCKED and locked.rr != NO_RAND
    old = wire.decode(old_take)
    lock_sig = wire.decode(lock)
    assert locked.ri is not None
    attempts = [
        old_take,  # the earlier session's TAKE (another sid)
        wire.encode(replace(old, sid=lock_sig.sid, ri=lock_sig.ri, rr=locked.rr)),  # re-bound, MAC copied
        wire.encode(wire.sign(Signal(SignalType.TAKE, NONCE, lock_sig.sid, 2, None, locked.ri, locked.rr, b""),
                              derive(b"not the key, but 16+ bytes", SIGNAL), by_responder=False)),
        wire.encode(Signal(SignalType.TAKE, NONCE, lock_sig.sid, 2)),  # legacy, unsigned
        wire.encode(wire.sign(Signal(SignalType.TAKE, NONCE, lock_sig.sid, 2, None, locked.ri, locked.rr, b""),
                              derive(KEY, SIGNAL), by_responder=True)),  # right key, wrong direction
    ]
    for data in attempts:
        end.send(data)
    assert deliver(sim, end.channel) == attempts
    assert not replay.done and b.state(NONCE) == "InLocking"
    assert replay.drops == {DropReason.REPLAY: 1, DropReason.BAD_MAC: 4}
    assert b.pool.drops == replay.drops
    sim.run_for(CFG.lock_timeout + 0.1)
    assert isinstance(replay.outcome, HandoverError) and b.leases() == []
    assert b.state(NONCE) == "Idle" and b.expiries() == {}


def test_forged_and_replayed_signals_are_dropped_and_the_take_still_succeeds() -> None:
    sim, a, b, _m = setup(KEY)
    recorded: dict[SignalType, bytes] = {}

    def forger(_end: ChannelEnd, data: bytes) -> Sequence[bytes]:
        """In the middle of alice's channel: forgeries ahead of bob's LOCKED and alice's TAKE."""
        sig = wire.decode(data)
        recorded[sig.type] = data
        lock = recorded[SignalType.LOCK]
        sid = wire.decode(lock).sid
        if sig.type is SignalType.LOCKED:
            return [
                wire.encode(Signal(SignalType.LOCKED, NONCE, sid, 1)),  # unsigned
                data[:-1] + bytes([data[-1] ^ 1]),  # MAC bit flip
                wire.encode(wire.sign(replace(sig, rr=b"\x01" * 8, mac=b""), derive(KEY[::-1], SIGNAL), True)),
                wire.encode(Signal(SignalType.ABORT, NONCE, sid, 1, AbortReason.UNKNOWN_PAIR)),  # unsigned "gone"
                lock,  # reflected: alice's own LOCK (direction)
                b"\x92" + b"\x00" * 20,  # malformed
                data,
                data,  # a duplicate of a valid one: REPLAY
            ]
        if sig.type is SignalType.TAKE:
            # the LOCK again, inside the session (a replay), and an unsigned ABORT
            return [lock, wire.encode(Signal(SignalType.ABORT, NONCE, sid, 9, AbortReason.CANCELLED)), data]
        return [data]

    def install(channel: Channel) -> None:
        channel.intercept = forger

    sim.signalling.on_open = install
    handle, ini, ch = take(a)
    sim.signalling.on_open = None
    deliver(sim, ch, to=B, count=1)  # LOCK: bob answers LOCKED, the forger sends six messages ahead of it
    resp = responder(handle)
    assert len(deliver(sim, ch, to=A, count=6)) == 6
    assert not ini.done and ini.state == "Locking"
    assert ini.drops == {DropReason.BAD_MAC: 5, DropReason.MALFORMED: 1}
    deliver(sim, ch, to=A, count=2)  # LOCKED (alice answers TAKE) and its duplicate
    assert ini.drops[DropReason.REPLAY] == 1 and not ini.done
    assert len(deliver(sim, ch, to=B, count=2)) == 2  # the replayed LOCK and the unsigned ABORT, before TAKE
    assert not resp.done and resp.drops == {DropReason.REPLAY: 1, DropReason.BAD_MAC: 1}
    deliver(sim, ch)
    assert isinstance(ini.outcome, Lease) and isinstance(resp.outcome, Lease)
    assert a.pool.handovers.drops == {DropReason.BAD_MAC: 5, DropReason.MALFORMED: 1, DropReason.REPLAY: 1}
    assert b.pool.handovers.drops == {DropReason.REPLAY: 1, DropReason.BAD_MAC: 1}
    assert [wire.decode(r.data).type.name for r in sim.signalling.sent_on(ch)] == ["LOCK", "LOCKED", "TAKE", "TAKEN"]


def test_a_signed_abort_from_the_initiator_before_any_answer_is_accepted() -> None:
    """The initiator may give up before LOCKED reaches it: its ABORT lacks rr and must still end the session."""
    sim, a, b, _m = setup(KEY)
    handle, _ini, ch = take(a)
    deliver(sim, ch, to=B, count=1)  # LOCK; bob's LOCKED stays on its way
    resp = responder(handle)
    assert [wire.decode(d).type for d in waiting(sim, ch, A)] == [SignalType.LOCKED]
    a.cancel(handle)
    (abort,) = waiting(sim, ch, B)
    assert wire.decode(abort).type is SignalType.ABORT and wire.decode(abort).rr == NO_RAND
    deliver(sim, ch, to=B, count=1)
    assert isinstance(resp.outcome, PeerRefused) and b.state(NONCE) == "Idle"
    assert a.state(NONCE) == "Idle" and resp.drops == {}


@pytest.mark.parametrize("key_a, key_b", [(KEY, None), (None, KEY), (KEY, KEY[::-1])],
                         ids=["signed-to-unkeyed", "unsigned-to-keyed", "key-mismatch"])
def test_a_lock_in_the_wrong_format_or_key_is_refused_in_silence(key_a: bytes | None, key_b: bytes | None) -> None:
    sim, a, b, _m = new_sim()
    pair = EndpointPair(a.endpoint(), b.endpoint(), NONCE)
    a.add(pair, is_pinger=True, key=key_a)
    b.add(pair, is_pinger=False, key=key_b)  # the clock never runs: no keepalive frame is exchanged
    handle, _ini, ch = take(a)
    assert len(deliver(sim, ch)) == 1  # the LOCK, and nothing back
    resp = responder(handle)
    assert resp.done and isinstance(resp.outcome, HandoverError)
    assert [r.sender for r in sim.signalling.sent_on(ch)] == [A] and handle.end is not None and handle.end.closed
    assert b.state(NONCE) == "Idle" and no_transitions(b) and b.pool.drops == {DropReason.BAD_MAC: 1}


@pytest.mark.parametrize("key", [b"", b"short", bytes(15), "x" * 32])
def test_a_short_or_non_bytes_key_raises(key: object) -> None:
    pool = PairPool(A, CFG)
    pair = EndpointPair(Endpoint(A, "10.0.0.1", 40000), Endpoint(B, "10.0.0.2", 40000), NONCE)
    with pytest.raises(InvalidKey):
        pool.add(pair, True, 0.0, key=key)  # type: ignore[arg-type]
    assert pool.entries() == []
