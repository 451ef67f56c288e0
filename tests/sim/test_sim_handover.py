"""Handover (take) between simulated nodes: real sessions over simulated signalling channels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason
from natpool.core.lease import Lease
from natpool.errors import ChannelBroken, HandoverError, HandoverTimeout, LocalError, PairBusy
from natpool.sim import NetConfig, SimNode, Simulation

CFG = PairConfig()
DELAY = 0.02  # default one-way signalling delay
TALKING = {"Idle", "InLocking"}


def setup(seed: int = 1, net: NetConfig | None = None, pairs: int = 2,
          signalling_delay: float = DELAY) -> tuple[Simulation, SimNode, SimNode, list[int]]:
    sim = Simulation(seed, net, signalling_delay=signalling_delay)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonces = [sim.punch(a, b).nonce for _ in range(pairs)]
    return sim, a, b, nonces


def first_silent(sim: Simulation, node: SimNode, nonce: int) -> float:
    """When ``node``'s entry for ``nonce`` went silent (Locked)."""
    (change,) = [c for c in node.transitions("finish_lock") if c.nonce == nonce]
    return change.at


@pytest.mark.parametrize("initiator", ["pinger", "ponger"])
def test_take_hands_the_pair_over_in_two_signalling_round_trips(initiator: str) -> None:
    sim, a, b, (nonce, other) = setup()
    sim.run_until(5.005)  # a ping (sent at 5.0) is outstanding: the drain overlaps the first round trip
    taker, peer = (a, b) if initiator == "pinger" else (b, a)
    handle = taker.take(nonce)
    assert not handle.done
    assert sim.run_until(lambda: handle.done, timeout=CFG.lock_timeout)
    lease = handle.lease
    assert isinstance(lease, Lease) and lease.role == "initiator" and lease.nonce == nonce
    assert handle.ended_at == pytest.approx(handle.started_at + 4 * DELAY)
    responder = handle.responder
    assert responder is not None and isinstance(responder.outcome, Lease)
    assert responder.outcome.role == "responder"
    assert peer.leases() == [responder.outcome] and taker.leases() == [lease]
    assert taker.state(nonce) == peer.state(nonce) == "InUse"
    assert sim.signalling.stats.sent == sim.signalling.stats.delivered == 4
    assert all(end.closed for ch in sim.signalling.channels for end in ch.ends)
    # strict silence from the moment each side locked, and the pong of the drain was waited for
    for node in (a, b):
        t_silent = first_silent(sim, node, nonce)
        assert not [d for d in sim.sent_by(node.identity, nonce) if d.time >= t_silent]
    assert a.pool.drops == b.pool.drops == {}
    sim.run_until(120.0)
    assert sim.silence_violations() == []
    assert a.state(other) == b.state(other) == "Idle"  # the other pair is untouched
    assert taker.state(nonce) == peer.state(nonce) == "InUse"


def test_take_any_by_peer_and_a_lost_local_claim() -> None:
    sim, a, _b, nonces = setup(pairs=2)
    sim.run_until(1.0)
    h1 = a.take(peer="bob")
    h2 = a.take(peer="bob")
    assert h1.session is not None and h2.session is not None
    assert {h1.session.nonce, h2.session.nonce} == set(nonces)
    h3 = a.take(peer="bob")  # nothing Idle left: fails at once, nothing sent
    assert h3.done and isinstance(h3.outcome, PairBusy) and h3.ended_at == 1.0 and h3.lease is None
    assert len(sim.signalling.channels) == 2
    assert sim.run_until(lambda: h1.done and h2.done, timeout=CFG.lock_timeout)
    assert h1.lease is not None and h2.lease is not None


def test_simultaneous_takes_the_pinger_session_wins() -> None:
    sim, a, b, (nonce, _) = setup()
    sim.run_until(2.0)
    ha = a.take(nonce)  # alice is the pinger
    hb = b.take(nonce)
    assert sim.run_until(lambda: ha.done and hb.done, timeout=CFG.lock_timeout)
    assert isinstance(ha.outcome, Lease) and isinstance(hb.outcome, PairBusy)
    assert a.state(nonce) == b.state(nonce) == "InUse"
    assert len(a.leases()) == len(b.leases()) == 1


def test_channel_broken_before_the_take_returns_both_entries_to_idle() -> None:
    sim, a, b, (nonce, _) = setup()
    sim.run_until(2.0)
    handle = a.take(nonce)
    sim.run_until(2.0 + 1.5 * DELAY)  # LOCK arrived, LOCKED is in flight
    (channel,) = sim.signalling.channels
    channel.break_()
    responder = handle.responder
    assert responder is not None
    assert sim.run_until(lambda: handle.done and responder.done, timeout=CFG.lock_timeout)
    assert sim.now() == 2.0 + 1.5 * DELAY  # both ends observe the break at once
    assert isinstance(handle.outcome, ChannelBroken)
    assert isinstance(responder.outcome, ChannelBroken)
    sim.run_until(60.0)  # both aborted to Idle (rule 4) and keepalive resumed
    assert a.state(nonce) == b.state(nonce) == "Idle"
    assert a.expiries() == b.expiries() == {}
    assert sim.silence_violations() == []


def test_signalling_slower_than_the_lock_timeout_times_out() -> None:
    sim, a, b, (nonce, _) = setup(signalling_delay=CFG.lock_timeout * 0.6)
    sim.run_until(1.0)
    handle = a.take(nonce)
    assert sim.run_until(lambda: handle.done, timeout=2 * CFG.lock_timeout)
    assert isinstance(handle.outcome, HandoverTimeout)
    assert handle.ended_at == pytest.approx(1.0 + CFG.lock_timeout)
    sim.run_until(60.0)
    assert a.state(nonce) == b.state(nonce) == "Idle"
    assert sim.silence_violations() == []


def handover_run(seed: int, take_at: float, break_after: float | None, loss: float,
                 dup: float) -> tuple[Simulation, SimNode, SimNode, list[int], list[str]]:
    net = NetConfig(loss=loss, duplicate=dup, delay_min=0.005, delay_max=0.05)
    sim, a, b, nonces = setup(seed, net, pairs=2)
    sim.run_until(take_at)
    handles = [a.take(nonces[0]), b.take(nonces[1])]
    if break_after is not None:
        sim.run_until(take_at + break_after)
        sim.signalling.break_all()
    sim.run_until(take_at + 2 * CFG.lock_timeout)
    return sim, a, b, nonces, [type(h.outcome).__name__ for h in handles]


def test_handover_runs_are_deterministic() -> None:
    r1 = handover_run(9, 4.99, None, 0.3, 0.2)
    r2 = handover_run(9, 4.99, None, 0.3, 0.2)
    assert r1[0].log == r2[0].log and r1[4] == r2[4]
    assert [s.session.sent for s in r1[1].links] == [s.session.sent for s in r2[1].links]


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32),
    take_at=st.floats(0.5, 12.0),
    break_after=st.none() | st.floats(0.0, 0.2),
    loss=st.sampled_from([0.0, 0.2, 0.6]),
    dup=st.sampled_from([0.0, 0.3]),
)
def test_handover_under_faults_keeps_silence_and_symmetry(
    seed: int, take_at: float, break_after: float | None, loss: float, dup: float
) -> None:
    sim, a, b, nonces, outcomes = handover_run(seed, take_at, break_after, loss, dup)
    # every take ended within its lock timeout, with a lease or a typed error
    for node in (a, b):
        for link in node.links:
            assert link.session.done and isinstance(link.session.outcome, Lease | HandoverError)
            assert link.session.ended_at is not None
            assert link.session.ended_at <= link.session.started_at + CFG.lock_timeout + 1e-9
    assert sim.silence_violations() == []
    for nonce in nonces:
        sa, sb = a.state(nonce), b.state(nonce)
        # one side handed the pair out: the other never keeps talking on it
        if "InUse" in (sa, sb):
            assert sa not in TALKING and sb not in TALKING, (sa, sb, outcomes)
    if break_after is None and loss == 0.0:
        assert outcomes == ["Lease", "Lease"]


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32), take_at=st.floats(0.5, 12.0))
def test_settle_time_keeps_duplicated_keepalives_from_the_application(seed: int, take_at: float) -> None:
    """CleanHandover: with settle_time >= the longest datagram lifetime, no frame reaches an InUse pair."""
    delay_max = 0.3
    sim = Simulation(seed, NetConfig(duplicate=0.5, delay_min=0.01, delay_max=delay_max),
                     config=PairConfig(settle_time=delay_max))
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonces = [sim.punch(a, b).nonce for _ in range(3)]
    sim.run_until(take_at)
    handles = [a.take(nonces[0]), b.take(nonces[1]), a.take(nonces[2])]
    sim.run_until(take_at + 2 * CFG.lock_timeout)
    assert all(h.lease is not None for h in handles)
    assert sim.stray_deliveries() == []
    assert sim.silence_violations() == []


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32), take_at=st.floats(0.5, 12.0))
def test_no_settle_needed_without_duplicates_while_timeouts_are_honest(seed: int, take_at: float) -> None:
    """settle_time = 0 is exact when nothing duplicates and every round trip beats the drain grace (>= 0.2 s)."""
    sim = Simulation(seed, NetConfig(delay_min=0.01, delay_max=0.09))
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonces = [sim.punch(a, b).nonce for _ in range(3)]
    sim.run_until(take_at)
    handles = [a.take(nonces[0]), b.take(nonces[1]), a.take(nonces[2])]
    sim.run_until(take_at + 2 * CFG.lock_timeout)
    assert all(h.lease is not None for h in handles)
    assert sim.stray_deliveries() == []


def test_fully_manual_handover_step_by_step() -> None:
    """Both the UDP network and signalling under test control: the shape a stateful test drives."""
    sim = Simulation(3, NetConfig(manual=True), signalling_manual=True)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonce = sim.punch(a, b).nonce
    net, sig = sim.network, sim.signalling
    assert [d.kind for d in sim.log] == ["ping"]  # sent on add, still in flight
    handle = a.take(nonce)  # alice must drain that ping before she may lock
    assert [p.data is not None for p in sig.in_flight] == [True]  # LOCK
    sig.deliver(0)  # bob accepts: he is the ponger, so LOCKED goes out at once
    assert b.state(nonce) == "InLocking" and len(sig.in_flight) == 1
    sig.deliver(0)  # LOCKED reaches alice, who is still draining
    assert a.state(nonce) == "InLocking" and not sig.in_flight
    net.deliver(0)  # the ping reaches bob, who still answers while InLocking
    assert [(d.sender, d.kind, d.state) for d in sim.log][-1] == ("bob", "pong", "InLocking")
    net.deliver(0)  # the pong drains alice: she locks and sends TAKE
    assert a.state(nonce) == "Locked"
    sig.deliver(0)  # TAKE: bob locks, hands out, answers TAKEN
    assert b.state(nonce) == "InUse"
    sig.deliver_all()  # TAKEN, then the close notices
    assert handle.lease is not None and a.state(nonce) == "InUse"
    assert not net.in_flight and sim.silence_violations() == [] and sim.stray_deliveries() == []
    assert sim.now() == 0.0  # no virtual time passed at all


def test_released_lease_closes_the_socket_and_late_frames_are_unowned() -> None:
    sim, a, b, (nonce, _) = setup()
    sim.run_until(1.0)
    handle = a.take(nonce)
    assert sim.run_until(lambda: handle.done, timeout=CFG.lock_timeout)
    assert handle.lease is not None
    a.release(handle.lease)
    assert a.expiries() == {nonce: ExpiryReason.CLOSED}
    assert a.state(nonce) is None and nonce not in a.pool
    entry = b.entry(nonce)
    sim.inject(entry.local.addr, entry.remote.addr, b"late")  # e.g. the peer's app still sending
    sim.run_until(2.0)
    assert sim.unowned == 1


OPS = st.sampled_from(["take", "claim", "remove", "partition", "heal", "break", "release"])


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.1, 0.3]),
    dup=st.sampled_from([0.0, 0.2]),
    delay_max=st.sampled_from([0.01, 0.1, 0.4]),
    settle=st.sampled_from([0.0, 0.5]),
    signalling_delay=st.sampled_from([0.001, 0.02, 0.5]),
    steps=st.lists(st.tuples(OPS, st.integers(0, 2), st.integers(0, 5), st.sampled_from([0.001, 0.05, 1.0, 5.0])),
                   max_size=30),
)
def test_random_operations_keep_silence_symmetry_and_clean_handover(
    seed: int, loss: float, dup: float, delay_max: float, settle: float, signalling_delay: float,
    steps: list[tuple[str, int, int, float]],
) -> None:
    """Three nodes, six pairs, arbitrary takes/claims/removals/partitions/breaks/releases."""
    sim = Simulation(seed, NetConfig(loss=loss, duplicate=dup, delay_min=0.005, delay_max=delay_max),
                     config=PairConfig(settle_time=settle), signalling_delay=signalling_delay)
    nodes = [sim.add_node(name) for name in ("a", "b", "c")]
    # pairs a-b, b-c, c-a twice each; the pinger alternates between the two sides
    nonces = [sim.punch(nodes[i % 3], nodes[(i + 1) % 3], pinger=nodes[(i + i % 2) % 3]).nonce for i in range(6)]
    for op, ni, pi, wait in steps:
        node, nonce = nodes[ni], nonces[pi]
        try:
            if op == "take":
                node.take(nonce)
            elif op == "claim":
                node.claim(nonce)
            elif op == "remove":
                node.remove(nonce)
            elif op == "partition":
                sim.partition(node, nodes[(ni + 1) % 3])
            elif op == "heal":
                sim.heal()
            elif op == "break":
                sim.signalling.break_all(node)
            elif node.leases():
                node.release(node.leases()[0])
        except (LocalError, HandoverError):
            pass  # not this node's pair, not Idle, already gone...
        sim.run_for(wait)
    sim.run_for(3 * CFG.lock_timeout)
    assert sim.silence_violations() == []
    if settle >= delay_max:
        assert sim.stray_deliveries() == []
    for nonce in nonces:
        states = {node.state(nonce) for node in nodes} - {None}
        if "InUse" in states:
            assert not states & TALKING, states
    assert all(link.session.done for node in nodes for link in node.links)
