"""Peer binding and signed signalling in the simulator (issue 10 item 4): a third node attacks a pair.

alice and bob share a pair; mallory is a third node on the same simulated
signalling service, whose channels tell the responder who really opened
them. She opens sessions for alice–bob's pair, and replays what she
recorded of alice's sessions on a channel that appears to come from alice
(the worst case: a relay that forwards recordings under alice's name).
"""

from __future__ import annotations

from functools import partial

import pytest

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason
from natpool.core.lease import Lease
from natpool.endpoints import EndpointPair
from natpool.errors import DropReason, PairBusy
from natpool.sim import SimNode, Simulation
from natpool.sim.signalling import ChannelEnd
from natpool.wire import signal as wire
from natpool.wire.signal import Signal, SignalType

CFG = PairConfig()
DELAY = 0.02
KEY = b"alice-bob pair key from the punch"


def setup(key: bytes | None, pinger: str = "alice") -> tuple[Simulation, SimNode, SimNode, SimNode, int]:
    sim = Simulation(7, signalling_delay=DELAY)
    a, b, m = sim.add_node("alice"), sim.add_node("bob"), sim.add_node("mallory")
    pair = EndpointPair(a.endpoint(), b.endpoint(), sim.new_nonce())
    a.add(pair, is_pinger=pinger == "alice", key=key)
    b.add(pair, is_pinger=pinger == "bob", key=key)
    sim.run_until(1.0)
    return sim, a, b, m, pair.nonce


def fake_pair(sim: Simulation, m: SimNode, b: SimNode, nonce: int) -> None:
    """mallory adds a pair with alice–bob's nonce, pointing at bob's real endpoint of it (no key)."""
    bob_end = b.entry(nonce).local
    m.add(EndpointPair(m.endpoint(), bob_end, nonce), is_pinger=False)


def channel_as(sim: Simulation, sender: SimNode, to: SimNode) -> ChannelEnd:
    """A raw signalling channel from ``sender`` to ``to``'s responder side; returns the sender's end."""
    end, far = sim.signalling.open(sender, to)
    far.on_receive = partial(to._accept, far)
    return end


def no_transitions(node: SimNode, nonce: int) -> bool:
    return not [c for c in node.transitions() if c.nonce == nonce]


@pytest.mark.parametrize("key", [None, KEY], ids=["legacy", "keyed"])
def test_mallory_opening_a_session_for_alice_bobs_pair_is_refused(key: bytes | None) -> None:
    sim, a, b, m, nonce = setup(key)
    fake_pair(sim, m, b, nonce)
    handle = m.take(nonce)
    assert sim.run_until(lambda: handle.done, timeout=CFG.lock_timeout)
    assert handle.lease is None and b.leases() == []
    assert b.pool.drops[DropReason.UNEXPECTED_PEER] == 1
    assert no_transitions(b, nonce) and b.state(nonce) == "Idle"  # nothing claimed, ever
    # ABORT(UNKNOWN_PAIR): for mallory, bob has no such pair (her entry expires, gone remotely)
    assert m.expiries() == {nonce: ExpiryReason.PEER_GONE}
    # the real peer still takes it
    real = a.take(nonce)
    assert sim.run_until(lambda: real.done, timeout=CFG.lock_timeout)
    assert isinstance(real.lease, Lease) and len(b.leases()) == 1


def test_mallorys_lock_during_bobs_take_does_not_win_the_tie_break() -> None:
    """bob (ponger) takes; mallory's LOCK reaches bob while bob waits for alice: bob's take still succeeds."""
    sim, a, b, m, nonce = setup(None)
    fake_pair(sim, m, b, nonce)
    bob_take = b.take(nonce)
    intruder = m.take(nonce)  # arrives at bob at t+DELAY, while bob's initiator is Locking
    assert sim.run_until(lambda: bob_take.done and intruder.done, timeout=CFG.lock_timeout)
    assert isinstance(bob_take.lease, Lease) and bob_take.lease.role == "initiator"
    assert intruder.lease is None and [le.role for le in a.leases()] == ["responder"]
    assert b.pool.drops[DropReason.UNEXPECTED_PEER] == 1
    assert bob_take.ended_at == pytest.approx(bob_take.started_at + 4 * DELAY)


@pytest.mark.parametrize("key", [None, KEY], ids=["legacy", "keyed"])
def test_a_lock_and_disconnect_from_a_non_peer_does_not_expire_a_pinger_responders_pair(key: bytes | None) -> None:
    sim, a, b, m, nonce = setup(key, pinger="bob")
    end = channel_as(sim, m, b)
    end.send(wire.encode(Signal(SignalType.LOCK, nonce, b"\x6d" * 16, 1)))
    sim.run_for(DELAY)
    end.channel.break_()
    sim.run_for(3 * CFG.no_inbound_timeout)
    assert no_transitions(b, nonce) and a.state(nonce) == b.state(nonce) == "Idle"
    assert b.pool.drops[DropReason.UNEXPECTED_PEER] == 1


def recorded_lock(sim: Simulation, a: SimNode, b: SimNode, nonce: int) -> bytes:
    """A session of alice's that ended BUSY (bob's side was claimed); returns its LOCK as recorded."""
    entry = b.claim(nonce)
    handle = a.take(nonce)
    assert sim.run_until(lambda: handle.done, timeout=CFG.lock_timeout)
    assert isinstance(handle.outcome, PairBusy)
    entry.abort_lock(sim.now())
    b.pump()
    assert handle.end is not None
    lock = handle.end.peer.received[0]
    assert wire.decode(lock).type is SignalType.LOCK
    return lock


@pytest.mark.parametrize("pinger", ["alice", "bob"])
def test_a_busy_session_replayed_later_produces_no_lease(pinger: str) -> None:
    sim, a, b, _m, nonce = setup(KEY, pinger=pinger)
    lock = recorded_lock(sim, a, b, nonce)
    sim.run_for(10.0)
    lsig = wire.decode(lock)
    end = channel_as(sim, a, b)  # appears to come from alice: peer binding alone cannot help here
    end.send(lock)
    sim.run_for(DELAY)
    (resp,) = [link.session for link in b.links if link.end is end.peer]
    assert resp.state == "Committed" and b.state(nonce) == "InLocking"
    # the attacker cannot bind a TAKE to bob's fresh random: unsigned, re-signed under a guess, old ones
    end.send(wire.encode(Signal(SignalType.TAKE, nonce, lsig.sid, 2)))
    guess = wire.sign(Signal(SignalType.TAKE, nonce, lsig.sid, 2, None, lsig.ri, b"\x01" * 8, b""),
                      b"\x00" * 32, by_responder=False)
    end.send(wire.encode(guess))
    end.send(lock)
    sim.run_for(CFG.lock_timeout + 1.0)
    assert resp.done and not isinstance(resp.outcome, Lease) and b.leases() == []
    assert b.pool.drops[DropReason.BAD_MAC] == 2 and b.pool.drops[DropReason.REPLAY] == 1
    assert a.state(nonce) == b.state(nonce) == "Idle"
    assert not [c for c in b.transitions("finish_lock") if c.nonce == nonce]  # never Locked, never expired
    assert b.expiries() == {}
    real = a.take(nonce)  # and the pair is still good for the real peer
    assert sim.run_until(lambda: real.done, timeout=CFG.lock_timeout)
    assert isinstance(real.lease, Lease)


def test_the_same_replay_without_a_key_produces_a_lease() -> None:
    """Control (and what the README documents): legacy signals are not bound to a session."""
    sim, a, b, _m, nonce = setup(None)
    lock = recorded_lock(sim, a, b, nonce)
    end = channel_as(sim, a, b)
    end.send(lock)
    end.send(wire.encode(Signal(SignalType.TAKE, nonce, wire.decode(lock).sid, 2)))
    sim.run_for(CFG.lock_timeout)
    assert [le.role for le in b.leases()] == ["responder"] and a.leases() == []


@pytest.mark.parametrize("initiator", ["pinger", "ponger"])
def test_a_keyed_take_costs_the_same_round_trips(initiator: str) -> None:
    """Signing and the freshness check add no message and no round trip (two signalling RTTs)."""
    sim, a, b, _m, nonce = setup(KEY)
    sim.run_until(5.005)  # a ping is outstanding: the pinger's drain overlaps the first round trip
    taker = a if initiator == "pinger" else b
    handle = taker.take(nonce)
    assert sim.run_until(lambda: handle.done, timeout=CFG.lock_timeout)
    assert isinstance(handle.lease, Lease)
    assert handle.ended_at == pytest.approx(handle.started_at + 4 * DELAY)
    assert handle.end is not None
    sent = [*handle.end.received, *handle.end.peer.received]
    assert len(sent) == 4 and all(d[0] == wire.SIGNED_VERSION_BYTE for d in sent)
    assert a.pool.drops == b.pool.drops == {}
    sim.run_until(60.0)
    assert sim.silence_violations() == []
