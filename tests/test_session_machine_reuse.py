"""The reusable per-thread session machines behave exactly like a machine bound afresh per transition.

``natpool.core.binding.fire`` fires non-final session events on
one Initiator/Responder machine per thread bound to a proxy model. These
tests run random handover schedules (both roles, tie-breaks, broken
channels, lost keepalives) against the real code and against a reference
that binds a fresh generated machine for every event, and require identical
listener callbacks (event, source, target, and the real session as
``model``), session states and outcomes.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from handover_net import A, B, Net, Sent
from hypothesis import given
from hypothesis import strategies as st
from statemachine import StateMachine

from natpool.config import PairConfig
from natpool.core import binding
from natpool.core.entry import PairEntry
from natpool.core.handover import Session
from natpool.core.pool import PairPool
from natpool.errors import PairBusy, UnknownPair
from natpool.machines import InitiatorMachine, ResponderMachine
from natpool.machines.tables import Table

NONCE = 0xB0B


def _fresh_fire(cls: type[StateMachine], table: Table, target: Any, event: str, listeners: tuple[object, ...]) -> None:
    """The reference: a fresh binding per event (what the sessions did before the reuse)."""
    cls(model=target, start_value=target.state, listeners=list(listeners)).send(event)


class Recorder:
    """Listener recording every transition, naming the model by order of first appearance."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.models: list[object] = []
        self.seen: list[tuple[str, str, int, str, str, str]] = []

    def after_transition(self, event: Any, source: Any, target: Any, model: Any) -> None:
        assert isinstance(model, PairEntry | Session), f"listener saw {model!r}"  # never the proxy
        index = next((i for i, m in enumerate(self.models) if m is model), None)
        if index is None:
            index = len(self.models)
            self.models.append(model)
        self.seen.append((self.node, type(model).__name__, index, str(event), str(source.value),
                          str(target.value)))


PLAN = st.lists(st.tuples(st.sampled_from([A, B]), st.floats(0.0, 0.12), st.none() | st.integers(1, 5)),
                min_size=1, max_size=4)


def _run(pinger: str, plan: list[tuple[str, float, int | None]], loss: float, seed: int, fresh: bool,
         mp: pytest.MonkeyPatch) -> list[object]:
    with mp.context() as m:
        if fresh:
            m.setattr(binding, "fire", _fresh_fire)
        cfg = PairConfig(lock_timeout=0.5)
        net = Net(cfg)
        recs = {n: Recorder(n) for n in (A, B)}
        net.pools = {n: PairPool(n, cfg, listeners=(recs[n],)) for n in (A, B)}
        net.add_pair(NONCE, pinger=pinger)
        net.run_until(10.0)
        rnd = random.Random(seed)

        def copies(_sent: Sent) -> int:
            return 0 if rnd.random() < loss else 1

        net.udp_copies = copies
        outcome: list[object] = []
        t0 = net.now
        for node, delay, break_after in sorted(plan, key=lambda p: p[1]):
            net.run_until(t0 + delay)
            counter = {"n": 0}

            def breaker(_s: str, _d: bytes, c: dict[str, int] = counter, k: int | None = break_after) -> bool:
                c["n"] += 1
                return k is not None and c["n"] >= k

            try:
                net.take(node, NONCE, break_after=breaker)
            except (PairBusy, UnknownPair) as exc:
                outcome.append(type(exc).__name__)
        net.run_sessions()
        net.run_until(net.now + 1.0)
        outcome += [(type(s).__name__, s.state, type(s.outcome).__name__) for _, _, s in net.sessions()]
        return [recs[A].seen, recs[B].seen, outcome]


@given(pinger=st.sampled_from([A, B]), plan=PLAN, loss=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 99))
def test_reusable_session_machines_match_fresh_bindings(
    pinger: str, plan: list[tuple[str, float, int | None]], loss: float, seed: int,
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        reused = _run(pinger, plan, loss, seed, False, mp)
        fresh = _run(pinger, plan, loss, seed, True, mp)
    assert reused == fresh
    assert reused[0] or reused[1]  # the schedule did transition something


def test_the_proxy_keeps_no_session_between_transitions() -> None:
    net = Net(PairConfig(lock_timeout=0.5))
    net.add_pair(NONCE, pinger=A)
    net.run_until(10.0)
    link = net.take(A, NONCE)
    net.run_sessions()
    assert link.initiator.state == "Done"
    cache = binding.reusable_machines()
    assert cache  # the non-final events used reusable machines
    for reusable in cache.values():
        assert reusable.proxy.target is None
        assert reusable.machine.model is reusable.proxy
        assert not reusable.busy


def test_a_failing_listener_discards_the_reusable_session_machine() -> None:
    class Boom:
        armed = True

        def after_transition(self, model: Any) -> None:
            if self.armed and isinstance(model, Session):
                raise RuntimeError("listener failed")

    boom = Boom()
    cfg = PairConfig(lock_timeout=0.5)
    net = Net(cfg)
    net.pools = {n: PairPool(n, cfg, listeners=(boom,)) for n in (A, B)}
    net.add_pair(NONCE, pinger=A)
    net.run_until(10.0)
    with pytest.raises(RuntimeError):
        net.take(A, NONCE)
    sessions = (InitiatorMachine, ResponderMachine)
    assert not any(key[0] in sessions and key[1:] == (id(boom),) for key in binding.reusable_machines())
