"""Peer binding and signed, fresh signals (issue 10 item 4) on the sans-IO sessions.

Two real :class:`PairPool` s; datagrams and signals are carried by hand
(instantly, in order), so a test can record, replay, forge and drop any
signal exactly where it wants. Time only moves when a test moves it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from natpool.config import PairConfig
from natpool.core.entry import PairEntry
from natpool.core.handover import InitiatorSession, ResponderSession, Session
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, HandoverError, InvalidKey, PairBusy, PeerRefused
from natpool.wire import signal as wire
from natpool.wire.keys import SIGNAL, derive
from natpool.wire.signal import NO_RAND, AbortReason, Signal, SignalType

A, B, M = "alice", "bob", "mallory"
NONCE = 0xC0FFEE
KEY = bytes(range(32))
CFG = PairConfig(ping_interval=1.0, no_inbound_timeout=30.0, ping_lifespan=1.0, lock_timeout=5.0)


class Pair2:
    """alice and bob holding one pair (``pinger`` pings), optionally keyed; a clock that tests move."""

    def __init__(self, key: bytes | None = KEY, pinger: str = A) -> None:
        self.now = 0.0
        self.pools = {n: PairPool(n, CFG) for n in (A, B)}
        self.pair = EndpointPair(Endpoint(A, "10.0.0.1", 40000), Endpoint(B, "10.0.0.2", 40000), NONCE)
        for n, pool in self.pools.items():
            pool.add(self.pair, n == pinger, self.now, key=key)
        self.udp()

    def entry(self, node: str) -> PairEntry:
        return self.pools[node].get(NONCE)

    def udp(self) -> None:
        """Deliver keepalive frames both ways until none is left (the drain completes at once)."""
        moved = True
        while moved:
            moved = False
            for node, pool in self.pools.items():
                other = B if node == A else A
                for nonce, data, _addr in pool.datagrams_to_send(self.now):
                    moved = True
                    self.pools[other].receive_datagram(nonce, data, pool.get(nonce).local.addr, self.now)

    def advance(self, dt: float, *sessions: Session) -> None:
        self.now += dt
        for pool in self.pools.values():
            pool.handle_timer(self.now)
        for s in sessions:
            s.handle_timer(self.now)
        self.udp()

    def take(self, node: str) -> InitiatorSession:
        return self.pools[node].start_take(NONCE, None, self.now)

    def accept(self, node: str, data: bytes, peer: str | None) -> ResponderSession:
        resp = self.pools[node].accept_session(data, self.now, peer=peer)
        self.udp()
        return resp

    def run(self, ini: InitiatorSession, resp: ResponderSession) -> list[bytes]:
        """Shuttle signals between the two sessions until both are quiet; returns everything sent, in order."""
        log: list[bytes] = []
        moved = True
        while moved:
            moved = False
            self.udp()
            for src, dst in ((ini, resp), (resp, ini)):
                for data in src.signals_to_send():
                    moved = True
                    log.append(data)
                    dst.receive_signal(data, self.now)
        return log


def lock_of(ini: InitiatorSession) -> bytes:
    (lock,) = ini.signals_to_send()
    assert wire.decode(lock).type is SignalType.LOCK
    return lock


def sent_types(session: Session) -> list[str]:
    return [s.type.name for s in session.sent]


# --- peer binding ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["legacy", "keyed"])
def test_lock_from_a_third_party_is_refused_and_claims_nothing(key: bytes | None) -> None:
    net = Pair2(key)
    lock = lock_of(net.take(A))  # the real peer's LOCK bytes, delivered on mallory's channel
    net.entry(A).abort_lock(net.now)  # alice's take is not the point here
    resp = net.accept(B, lock, peer=M)
    assert resp.done and isinstance(resp.outcome, HandoverError) and not isinstance(resp.outcome, Lease)
    assert net.entry(B).state == "Idle" and net.pools[B].handovers.owner(NONCE) is None
    assert net.pools[B].drops[DropReason.UNEXPECTED_PEER] == 1
    # answered as for an unknown nonce (legacy format: mallory holds no key of this pair)
    (reply,) = resp.signals_to_send()
    assert wire.decode(reply) == Signal(SignalType.ABORT, NONCE, resp.sid, 1, AbortReason.UNKNOWN_PAIR)
    # the same LOCK on a channel whose peer is alice is served
    again = net.accept(B, lock, peer=A)
    assert not again.done and net.entry(B).state == "InLocking"


def test_third_party_lock_during_a_local_take_does_not_win_the_tie_break() -> None:
    """bob (ponger) takes; mallory's LOCK for the pair arrives meanwhile: refused, bob's take goes on."""
    net = Pair2(key=None)
    bob = net.take(B)
    bob_lock = lock_of(bob)
    forged = wire.encode(Signal(SignalType.LOCK, NONCE, b"\x66" * 16, 1))
    intruder = net.accept(B, forged, peer=M)
    assert intruder.done and isinstance(intruder.outcome, HandoverError)
    assert not bob.done and bob.state == "Locking" and net.pools[B].handovers.owner(NONCE) is bob
    assert net.pools[B].drops[DropReason.UNEXPECTED_PEER] == 1
    alice = net.accept(A, bob_lock, peer=B)
    net.run(bob, alice)
    assert isinstance(bob.outcome, Lease) and isinstance(alice.outcome, Lease)
    # control: the real peer's LOCK does win the tie-break over bob's pending take
    net2 = Pair2(key=None)
    bob2 = net2.take(B)
    alice2 = net2.take(A)
    winner = net2.accept(B, lock_of(alice2), peer=A)
    assert isinstance(bob2.outcome, PairBusy) and net2.pools[B].handovers.owner(NONCE) is winner


def test_peer_none_keeps_the_legacy_behaviour() -> None:
    """A signalling layer that cannot name the peer (peer=None) is not checked (documented as such)."""
    net = Pair2(key=None)
    resp = net.accept(B, lock_of(net.take(A)), peer=None)
    assert not resp.done and net.entry(B).state == "InLocking"


# --- signed signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("pinger", [A, B], ids=["initiator-pinger", "initiator-ponger"])
def test_keyed_take_signs_every_signal_and_hands_over(pinger: str) -> None:
    net = Pair2(KEY, pinger=pinger)
    ini = net.take(A)
    resp = net.accept(B, lock_of(ini), peer=A)
    log = net.run(ini, resp)
    assert isinstance(ini.outcome, Lease) and isinstance(resp.outcome, Lease)
    assert [wire.decode(d).type.name for d in log] == ["LOCKED", "TAKE", "TAKEN"]
    sigs = [*ini.sent, *resp.sent]
    assert all(s.signed and len(wire.encode(s)) == wire.SIGNED_SIZE for s in sigs)
    assert {s.ri for s in sigs} == {ini.sent[0].ri}  # one initiator random, echoed by everyone
    assert ini.sent[0].rr == NO_RAND and {s.rr for s in resp.sent} == {s.rr for s in ini.sent[1:]}
    assert net.pools[A].drops == net.pools[B].drops == {}


def test_a_pinger_responder_stays_in_locking_until_take() -> None:
    """Freshness: LOCKED goes out once drained, but the pinger locks only on TAKE (spec/handover.md)."""
    net = Pair2(KEY, pinger=B)
    ini = net.take(A)
    resp = net.accept(B, lock_of(ini), peer=A)
    (locked,) = resp.signals_to_send()
    assert wire.decode(locked).type is SignalType.LOCKED
    assert net.entry(B).state == "InLocking" and net.entry(B).drained and not net.pools[B].datagrams_to_send(net.now)
    ini.receive_signal(locked, net.now)
    (take,) = ini.signals_to_send()
    resp.receive_signal(take, net.now)
    assert net.entry(B).state == "InUse" and isinstance(resp.outcome, Lease)  # locked on TAKE (settle_time 0)


@pytest.mark.parametrize("pinger", [A, B], ids=["responder-ponger", "responder-pinger"])
def test_replayed_lock_and_disconnect_leave_the_pair_idle(pinger: str) -> None:
    """A recorded LOCK, replayed by someone on the real peer's channel, then a disconnect: the pair stays."""
    net = Pair2(KEY, pinger=pinger)
    ini = net.take(A)
    lock = lock_of(ini)
    ini.cancel(net.now)  # the recorded session never reached bob
    net.udp()
    assert net.entry(A).state == "Idle"
    replay = net.accept(B, lock, peer=A)
    assert not replay.done and net.entry(B).state == "InLocking"
    assert [wire.decode(d).type for d in replay.signals_to_send()] == [SignalType.LOCKED]
    replay.channel_closed(net.now)
    assert net.entry(B).state == "Idle"
    # and by timeout instead of a disconnect
    replay2 = net.accept(B, lock, peer=A)
    net.advance(CFG.lock_timeout + 0.1, replay2)
    assert replay2.done and net.entry(B).state == "Idle"
    assert net.entry(A).state == "Idle"
    assert not [e for p in net.pools.values() for e in p.entries() if e.state != "Idle"]


def test_a_busy_session_replayed_later_yields_no_lease() -> None:
    """Issue 10's attack: a session that ended BUSY, replayed later, produced a lease. Not with a key."""
    net = Pair2(KEY)
    # an earlier successful session, fully recorded (the attacker has its TAKE too)
    ini0 = net.take(A)
    resp0 = net.accept(B, lock_of(ini0), peer=A)
    net.run(ini0, resp0)
    old_take = next(wire.encode(s) for s in ini0.sent if s.type is SignalType.TAKE)
    for session in (ini0, resp0):
        assert isinstance(session.outcome, Lease)
        session.outcome.release(net.now)
    net = Pair2(KEY)  # a fresh pair (same key, same nonce: the worst case for replays)
    net.entry(B).begin_lock(net.now)  # bob's side is busy: the session ends BUSY
    ini = net.take(A)
    lock = lock_of(ini)
    busy = net.accept(B, lock, peer=A)
    net.run(ini, busy)
    assert isinstance(ini.outcome, PairBusy) and [s.type for s in busy.sent] == [SignalType.BUSY]
    net.entry(B).abort_lock(net.now)
    assert net.entry(A).state == net.entry(B).state == "Idle"
    # later: the attacker replays the BUSY session's LOCK, then every TAKE it can make
    replay = net.accept(B, lock, peer=A)
    (locked,) = (wire.decode(d) for d in replay.signals_to_send())
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
        replay.receive_signal(data, net.now)
    assert not replay.done and net.entry(B).state == "InLocking"
    assert replay.drops == {DropReason.REPLAY: 1, DropReason.BAD_MAC: 4}
    net.advance(CFG.lock_timeout + 0.1, replay)
    assert isinstance(replay.outcome, HandoverError) and not isinstance(replay.outcome, Lease)
    assert net.entry(B).state == "Idle"


def test_without_a_key_the_same_replay_yields_a_lease() -> None:
    """The control of the test above: legacy signals are unauthenticated (README says so)."""
    net = Pair2(key=None)
    ini = net.take(A)
    lock = lock_of(ini)
    ini.cancel(net.now)
    net.udp()
    replay = net.accept(B, lock, peer=A)
    replay.signals_to_send()
    replay.receive_signal(wire.encode(Signal(SignalType.TAKE, NONCE, wire.decode(lock).sid, 2)), net.now)
    net.advance(0.0, replay)
    assert isinstance(replay.outcome, Lease)


def test_forged_and_replayed_signals_are_dropped_and_the_take_still_succeeds() -> None:
    net = Pair2(KEY)
    ini = net.take(A)
    lock = lock_of(ini)
    resp = net.accept(B, lock, peer=A)
    (locked,) = resp.signals_to_send()
    lsig = wire.decode(locked)
    forged_to_ini = [
        wire.encode(Signal(SignalType.LOCKED, NONCE, ini.sid, 1)),  # unsigned
        locked[:-1] + bytes([locked[-1] ^ 1]),  # MAC bit flip
        wire.encode(wire.sign(replace(lsig, rr=b"\x01" * 8, mac=b""), derive(KEY[::-1], SIGNAL), True)),  # other key
        wire.encode(Signal(SignalType.ABORT, NONCE, ini.sid, 1, AbortReason.UNKNOWN_PAIR)),  # unsigned "gone"
        lock,  # reflected: its own LOCK (direction)
        b"\x92" + b"\x00" * 20,  # malformed
    ]
    for data in forged_to_ini:
        ini.receive_signal(data, net.now)
    assert not ini.done and ini.state == "Locking"
    assert ini.drops == {DropReason.BAD_MAC: 5, DropReason.MALFORMED: 1}
    ini.receive_signal(locked, net.now)
    ini.receive_signal(locked, net.now)  # a duplicate of a valid one: REPLAY, dropped
    assert ini.drops[DropReason.REPLAY] == 1 and not ini.done
    (take,) = ini.signals_to_send()
    resp.receive_signal(lock, net.now)  # the LOCK again, inside the session: a replay
    resp.receive_signal(wire.encode(Signal(SignalType.ABORT, NONCE, ini.sid, 9, AbortReason.CANCELLED)), net.now)
    assert not resp.done and resp.drops == {DropReason.REPLAY: 1, DropReason.BAD_MAC: 1}
    resp.receive_signal(take, net.now)
    net.run(ini, resp)
    assert isinstance(ini.outcome, Lease) and isinstance(resp.outcome, Lease)
    assert net.pools[A].handovers.drops[DropReason.BAD_MAC] == 5


def test_a_signed_abort_from_the_initiator_before_any_answer_is_accepted() -> None:
    """The initiator may give up before LOCKED reaches it: its ABORT lacks rr and must still end the session."""
    net = Pair2(KEY)
    ini = net.take(A)
    lock = lock_of(ini)
    resp = net.accept(B, lock, peer=A)
    resp.signals_to_send()  # LOCKED, not delivered
    ini.cancel(net.now)
    (abort,) = ini.signals_to_send()
    assert wire.decode(abort).rr == NO_RAND
    resp.receive_signal(abort, net.now)
    assert isinstance(resp.outcome, PeerRefused) and net.entry(B).state == "Idle"


@pytest.mark.parametrize("key_a, key_b", [(KEY, None), (None, KEY), (KEY, KEY[::-1])],
                         ids=["signed-to-unkeyed", "unsigned-to-keyed", "key-mismatch"])
def test_a_lock_in_the_wrong_format_or_key_is_refused_in_silence(key_a: bytes | None, key_b: bytes | None) -> None:
    net = Pair2(key_b)
    ini_pool = PairPool(A, CFG)
    ini_pool.add(net.pair, True, net.now, key=key_a)
    lock = lock_of(ini_pool.start_take(NONCE, None, net.now))
    resp = net.accept(B, lock, peer=A)
    assert resp.done and isinstance(resp.outcome, HandoverError) and resp.signals_to_send() == []
    assert net.entry(B).state == "Idle" and net.pools[B].drops == {DropReason.BAD_MAC: 1}


@pytest.mark.parametrize("key", [b"", b"short", bytes(15), "x" * 32])
def test_a_short_or_non_bytes_key_raises(key: object) -> None:
    pool = PairPool(A, CFG)
    pair = EndpointPair(Endpoint(A, "10.0.0.1", 40000), Endpoint(B, "10.0.0.2", 40000), NONCE)
    with pytest.raises(InvalidKey):
        pool.add(pair, True, 0.0, key=key)  # type: ignore[arg-type]
    assert pool.entries() == []
