"""Random fault schedules against the real sessions and pools: the spec's safety properties hold.

Hypothesis draws who pings, several takers on both nodes at random times
(take and take_any), keepalive loss and duplication, and channels that
break after a random number of messages, all on :mod:`natpool.sim`. After
every simulated event Symmetry is checked; at the end AtomicTake,
StrictSilence and NoLeak.
"""

from __future__ import annotations

import random

from hypothesis import event, given
from hypothesis import strategies as st

from natpool.config import PairConfig
from natpool.core.lease import Lease
from natpool.errors import HandoverError, PairBusy, UnknownPair
from natpool.sim import InFlight, TakeHandle
from tests.support.handover_sim import A, B, Faults, assert_no_leak, duo, leases, sessions

NONCE = 0xA11CE

takers = st.lists(
    st.tuples(st.sampled_from([A, B]), st.floats(0.0, 0.12), st.booleans(), st.none() | st.integers(1, 5)),
    min_size=1, max_size=4,
)


@given(pinger=st.sampled_from([A, B]), plan=takers, loss=st.sampled_from([0.0, 0.2, 0.5]),
       dup=st.booleans(), start=st.floats(9.9, 10.1), rnd=st.randoms(use_true_random=False))
def test_random_schedules_keep_the_safety_properties(
    pinger: str, plan: list[tuple[str, float, bool, int | None]], loss: float, dup: bool, start: float,
    rnd: random.Random,
) -> None:
    cfg = PairConfig(lock_timeout=0.5, settle_time=0.03 if dup else 0.0)
    net = duo(cfg)
    net.add_pair(NONCE, pinger=pinger)
    net.run_until(start)

    def copies(_dg: InFlight) -> int:
        if rnd.random() < loss:
            return 0
        return 2 if dup and rnd.random() < 0.5 else 1

    net.sim.network.fate = copies
    links: list[TakeHandle] = []
    busy = 0
    t0 = net.now
    for node, delay, by_peer, break_after in sorted(plan, key=lambda p: p[1]):
        net.run_until(t0 + delay)
        counter = {"n": 0}

        def breaker(_sender: str, _data: bytes, c: dict[str, int] = counter, k: int | None = break_after) -> bool:
            c["n"] += 1
            return k is not None and c["n"] >= k

        try:
            peer = B if node == A else A
            faults = Faults(break_after=breaker)
            link = (net.take(node, peer=peer, faults=faults) if by_peer
                    else net.take(node, NONCE, faults=faults))
        except UnknownPair:  # expired by an earlier failed handover
            busy += 1
            continue
        if isinstance(link.outcome, PairBusy) and link.end is None:  # the local claim was lost: nothing sent
            busy += 1
            continue
        links.append(link)
    net.run_sessions()
    net.run_until(net.now + 1.0)  # let late channel closes and timers settle

    # Every session ended with a lease or a typed HandoverError; none still owns an entry.
    for _, s in sessions(net.sim):
        assert isinstance(s.outcome, Lease | HandoverError)
    assert_no_leak(net, NONCE)
    # AtomicTake: at most one lease per node, and both leases (if any) come from the same session.
    per_node: dict[str, list[Lease]] = {A: [], B: []}
    for link in links:
        for lease in leases(link):
            node = link.node.identity if lease.role == "initiator" else (B if link.node.identity == A else A)
            per_node[node].append(lease)
    assert len(per_node[A]) <= 1 and len(per_node[B]) <= 1
    if per_node[A] and per_node[B]:
        assert per_node[A][0].sid == per_node[B][0].sid
    # A node holds a lease exactly when its entry went InUse.
    for node in (A, B):
        if per_node[node]:
            assert net.state(node, NONCE) in ("InUse", "Expired")
        else:
            assert net.state(node, NONCE) != "InUse"
    # StrictSilence: nothing leaves a side after its entry locked.
    for node in (A, B):
        locked = net.locked_at(node, NONCE)
        if locked is not None:
            assert not [s for s in net.sim.sent_by(node) if s.time >= locked]
    assert net.sim.silence_violations() == []
    assert busy + len(links) == len(plan)
    event(f"leases: {len(per_node[A]) + len(per_node[B])}, final: {net.state(A, NONCE)}/{net.state(B, NONCE)}")
