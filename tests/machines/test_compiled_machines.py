"""The compiled tables behave exactly like the generated python-statemachine classes.

The runtime steps ``natpool/machines/tables.py`` on its hot paths (natpool.fsm)
and keeps the classes as the authority. Three layers of evidence:

* the import check: every class read back from its public metadata equals
  its table, and a mutated table copy (or a class using a feature a table
  cannot express) fails the check with a diff naming the difference;
* a differential test per machine: random events with random guard values,
  the class and the table side by side, same states and same refusals;
* the runtime objects (PairEntry, both session roles in the simulator)
  behave identically whether they step the tables or run every transition
  through the class (strict mode), and listeners still see the class's own
  callbacks with the real object as ``model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from statemachine import State, StateMachine
from statemachine.exceptions import TransitionNotAllowed

from natpool import fsm
from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason, PairEntry
from natpool.core.handover import Session
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import HandoverError, InvalidState, LocalError, PairBusy, UnknownPair
from natpool.machines import TABLES, EntryMachine, InitiatorMachine, ResponderMachine
from natpool.machines.tables import Table
from natpool.sim import NetConfig, Simulation
from natpool.wire.frame import Frame, Kind, encode

CLASSES: dict[str, type[StateMachine]] = {"Entry": EntryMachine, "Initiator": InitiatorMachine,
                                          "Responder": ResponderMachine}


@contextlib.contextmanager
def strict_mode(on: bool) -> Iterator[None]:
    """Set strict mode for a block, restoring what it was (the CI's strict step sets it for the run)."""
    was = fsm.strict()
    fsm.set_strict(on)
    try:
        yield
    finally:
        fsm.set_strict(was)


@pytest.fixture
def strict_off() -> Iterator[None]:
    with strict_mode(False):
        yield


# --- the import check -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_class_reads_back_as_its_table(name: str) -> None:
    cls, table = CLASSES[name], TABLES[name]
    back = fsm.read_back(cls)
    assert back.problems == []
    assert (back.states, back.initial, back.final) == (table.states, table.initial, table.final)
    assert back.transitions == table.transitions
    assert fsm.diff(cls, table) == []


def _mutations(table: Table) -> list[tuple[str, Table]]:
    """Copies of ``table``, each wrong in one way; the first transition is the victim."""
    (key, (target, guard)), *_ = table.transitions.items()
    guarded = next(k for k, v in table.transitions.items() if v[1])
    other = next(s for s in table.states if s != target)
    t = dict(table.transitions)
    return [
        ("target", dataclasses.replace(table, transitions={**t, key: (other, guard)})),
        ("guard added", dataclasses.replace(table, transitions={**t, key: (target, "bogus_guard")})),
        ("guard dropped", dataclasses.replace(table, transitions={**t, guarded: (t[guarded][0], "")})),
        ("transition missing", dataclasses.replace(table, transitions={k: v for k, v in t.items() if k != key})),
        ("transition extra", dataclasses.replace(table, transitions={**t, (table.initial, "no_such_event"):
                                                                     (other, "")})),
        ("initial", dataclasses.replace(table, initial=next(s for s in table.states if s != table.initial))),
        ("final", dataclasses.replace(table, final=table.final | {table.initial})),
        ("states", dataclasses.replace(table, states=tuple(reversed(table.states)))),
    ]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_mutated_table_copy_fails_the_import_check(name: str) -> None:
    cls, table = CLASSES[name], TABLES[name]
    for what, bad in _mutations(table):
        lines = fsm.diff(cls, bad)
        assert lines, f"{what}: mutation not detected"
        with pytest.raises(fsm.MachineMismatch) as info:
            fsm.verify({name: (cls, bad)})
        assert all(line in str(info.value) for line in lines)
    # The diff names the transition that differs, with both sides.
    key, (target, guard) = next(iter(table.transitions.items()))
    (line,) = fsm.diff(cls, dataclasses.replace(table, transitions={**table.transitions, key: (target, "g2")}))
    assert f"({key[0]}, {key[1]})" in line and repr((target, guard)) in line and repr((target, "g2")) in line
    assert TABLES[name] is table and fsm.diff(cls, table) == []  # the real table was never touched


class _Fancy(StateMachine):
    """Features a (target, guard) table cannot express: the check must refuse them, not ignore them."""

    a = State("A", value="A", initial=True)
    b = State("B", value="B")
    c = State("C", value="C", final=True)

    go = a.to(b, unless="blocked") | a.to(c, cond="ok")
    stop = b.to(c, cond=["x", "y"], on="act")

    def on_enter_b(self) -> None:
        """An action the table would not run."""

    def act(self) -> None:
        """Another one."""


def test_features_a_table_cannot_express_are_reported() -> None:
    back = fsm.read_back(_Fancy)
    text = "\n".join(back.problems)
    assert "a second transition for (A, go)" in text
    assert "guards [('blocked', False)]" in text
    assert "guards [('x', True), ('y', True)]" in text
    assert "actions ['act']" in text
    assert "state B has enter actions ['on_enter_b']" in text


def test_the_import_check_runs_at_import() -> None:
    """Re-running ``natpool.machines``'s import over a mutated table raises, naming the difference."""
    code = ("import importlib, dataclasses\n"
            "import natpool.machines as m, natpool.machines.tables as t\n"
            "t.TABLES['Entry'] = dataclasses.replace(t.ENTRY, initial='Locked')\n"
            "try:\n    importlib.reload(m)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "else:\n    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out.startswith("MachineMismatch") and "initial: class 'Idle', table 'Locked'" in out, out


# --- class vs table, event by event ---------------------------------------------------------------


class Model:
    """A bare model: ``state`` plus every guard any spec machine names (properties over ``guards``)."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.guards: dict[str, bool] = {}


GUARDS = sorted({g for t in TABLES.values() for _, g in t.transitions.values() if g})


def _guard_property(name: str) -> property:
    def read(self: Model) -> bool:
        return self.guards[name]
    return property(read)


for _guard in GUARDS:  # real properties: python-statemachine resolves guard names on the model's type
    setattr(Model, _guard, _guard_property(_guard))


def _steps(name: str) -> st.SearchStrategy[list[tuple[str, dict[str, bool]]]]:
    events = [*sorted({e for _, e in TABLES[name].transitions}), "not_an_event"]
    return st.lists(st.tuples(st.sampled_from(events), st.fixed_dictionaries({g: st.booleans() for g in GUARDS})),
                    max_size=30)


def _outcome(fire: Any, model: Model, event: str) -> tuple[str, str, str]:
    try:
        fire(model, event)
    except TransitionNotAllowed as exc:
        return ("refused", str(exc), model.state)
    return ("ok", "", model.state)


def _class_fire(cls: type[StateMachine]) -> Any:
    return lambda model, event: cls(model=model, start_value=model.state).send(event)


@pytest.mark.parametrize("name", sorted(CLASSES))
@given(data=st.data())
def test_table_and_class_agree_on_random_event_sequences(name: str, data: st.DataObject) -> None:
    with strict_mode(False):
        _table_and_class_agree(name, data)


def _table_and_class_agree(name: str, data: st.DataObject) -> None:
    cls, table = CLASSES[name], TABLES[name]
    compiled = fsm.Compiled(cls, table)
    start = data.draw(st.sampled_from(table.states), label="start")
    steps = data.draw(_steps(name), label="steps")
    by_class, by_table = Model(start), Model(start)
    for event, guards in steps:
        by_class.guards = by_table.guards = guards
        want = _outcome(_class_fire(cls), by_class, event)
        got = _outcome(compiled.fire, by_table, event)
        assert got == want, (event, guards)
        # And the bare table decision (what the entry's pre-check uses) agrees on accept/refuse.
        hit = table.transitions.get((start, event))
        accepted = hit is not None and (not hit[1] or guards[hit[1]])
        assert accepted == (want[0] == "ok")
        assert want[2] == (hit[0] if accepted and hit is not None else start)
        start = by_class.state


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_strict_mode_and_listeners_run_the_class(name: str, strict_off: None) -> None:
    cls, table = CLASSES[name], TABLES[name]
    compiled = fsm.Compiled(cls, table)
    (src, event), (target, _guard) = next(iter(table.transitions.items()))
    seen: list[tuple[str, str, str, object]] = []

    class Listener:
        def after_transition(self, event: Any, source: Any, target: Any, model: Any) -> None:
            seen.append((str(event), source.value, target.value, model))

    model = Model(src)
    model.guards = dict.fromkeys(GUARDS, True)
    compiled.fire(model, event, (Listener(),))
    assert seen == [(event, src, target, model)]
    calls: list[str] = []

    class Spy(fsm.Compiled):
        def through_class(self, obj: Any, event: str, target: str, listeners: tuple[object, ...] = ()) -> None:
            calls.append(event)
            super().through_class(obj, event, target, listeners)

    spy = Spy(cls, table)
    model.state = src
    spy.fire(model, event)
    assert calls == [] and model.state == target  # the table stepped
    fsm.set_strict(True)
    model.state = src
    spy.fire(model, event)
    assert calls == [event] and model.state == target  # strict: the class ran it


def test_strict_mode_is_read_from_the_environment_at_import() -> None:
    code = "import natpool.machines as m; print(m.strict())"
    for value, want in (("1", "True"), ("0", "False"), ("", "False")):
        env = {**os.environ, fsm.ENV_STRICT: value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=env, timeout=60).stdout.strip()
        assert out == want, value


# --- the runtime objects: compiled vs strict ------------------------------------------------------

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
CFG = PairConfig(lock_timeout=PairConfig().no_inbound_timeout - PairConfig().ping_interval, settle_time=0.5)

ENTRY_OPS = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(
    ["begin_lock", "finish_lock", "abort_lock", "use", "start_settle", "expire", "pong", "tick"])), max_size=40)


def _entry_trace(ops: list[tuple[int, str]], strict: bool) -> list[object]:
    with strict_mode(strict):
        return _entry_ops(ops)


def _entry_ops(ops: list[tuple[int, str]]) -> list[object]:
    entries = [PairEntry(EndpointPair(ALICE, BOB, 0x100 + i), "alice" if i % 2 == 0 else "bob", i % 2 == 0, CFG,
                         0.0) for i in range(4)]
    trace: list[object] = []
    now = 0.0
    for index, op in ops:
        now += 0.3
        e = entries[index]
        try:
            if op == "abort_lock":
                e.abort_lock(now)
            elif op == "expire":
                e.expire(ExpiryReason.CLOSED, now)
            elif op == "start_settle":
                trace.append(e.start_settle(now))
            elif op == "pong":  # answers the pinger's outstanding ping (changes ``drained``)
                e.datagrams_to_send(now)
                e.receive_datagram(encode(Frame(e.nonce, Kind.PONG)), ("127.0.0.1", e.remote.port), now)
            elif op == "tick":
                e.handle_timer(now)
            else:
                trace.append(getattr(e, op)(now))
        except InvalidState as exc:
            trace.append((type(exc).__name__, str(exc), type(exc.__cause__).__name__))
        trace.append(tuple(x.state for x in entries))
    trace.append([list(iter(x.next_event, None)) for x in entries])
    return trace


@given(ENTRY_OPS)
def test_pair_entries_behave_the_same_stepping_tables_or_running_the_class(ops: list[tuple[int, str]]) -> None:
    assert _entry_trace(ops, strict=False) == _entry_trace(ops, strict=True)


def _handover_trace(seed: int, plan: list[tuple[str, float]], loss: float, strict: bool) -> list[object]:
    with strict_mode(strict):
        return _handover_run(seed, plan, loss)


def _handover_run(seed: int, plan: list[tuple[str, float]], loss: float) -> list[object]:
    sim = Simulation(seed, NetConfig(loss=loss), signalling_delay=0.02, config=PairConfig(lock_timeout=0.5))
    nodes = {"alice": sim.add_node("alice"), "bob": sim.add_node("bob")}
    nonces = [sim.punch(nodes["alice"], nodes["bob"]).nonce for _ in range(2)]
    sim.run_until(5.003)
    handles: list[Any] = []
    out: list[object] = []
    t0 = sim.now()
    for node, delay in sorted(plan, key=lambda p: p[1]):
        sim.run_until(t0 + delay)
        try:
            handles.append(nodes[node].take(nonces[0]))
        except (PairBusy, UnknownPair, LocalError, HandoverError) as exc:
            out.append(type(exc).__name__)
    sim.run_until(t0 + 3.0)
    for h in handles:
        out.append((h.done, type(h.outcome).__name__, h.ended_at))
    for n in nodes.values():
        out.append([(c.nonce, c.source, c.target, c.event, c.reason, c.at) for c in n.transitions()])
        out.append(sorted((s.nonce, type(s).__name__, s.state) for s in n.pool.handovers.sessions()))
    return out


@given(seed=st.integers(0, 50), plan=st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.floats(0.0, 0.1)),
                                               min_size=1, max_size=3),
       loss=st.sampled_from([0.0, 0.3]))
def test_handover_sessions_behave_the_same_stepping_tables_or_running_the_class(
        seed: int, plan: list[tuple[str, float]], loss: float) -> None:
    compiled = _handover_trace(seed, plan, loss, strict=False)
    strict = _handover_trace(seed, plan, loss, strict=True)
    assert compiled == strict
    assert any(compiled[len(plan):])  # something transitioned


def test_listeners_see_the_real_session_and_entry_as_model(strict_off: None) -> None:
    seen: list[tuple[str, str, str, str]] = []

    class Recorder:
        def after_transition(self, event: Any, source: Any, target: Any, model: Any) -> None:
            assert isinstance(model, PairEntry | Session), model
            seen.append((type(model).__name__, str(event), source.value, target.value))

    sim = Simulation(1, signalling_delay=0.02)
    a, b = sim.add_node("alice", listeners=[Recorder()]), sim.add_node("bob", listeners=[Recorder()])
    nonce = sim.punch(a, b).nonce
    sim.run_until(5.0)
    handle = a.take(nonce)
    assert sim.run_until(lambda: handle.done, timeout=5.0)
    assert ("InitiatorSession", "settle", "Settling", "Done") in seen
    assert ("ResponderSession", "recv_take", "Committed", "Settling") in seen
    assert seen.count(("PairEntry", "use", "Locked", "InUse")) == 2


def test_a_traced_entry_keeps_its_bound_machine_until_a_final_state_or_a_failure(strict_off: None) -> None:
    class Boom:
        armed = False

        def after_transition(self, event: Any) -> None:
            if self.armed:
                raise RuntimeError(f"listener failed on {event}")

    boom = Boom()
    e = PairEntry(EndpointPair(ALICE, BOB, 0x77), "bob", False, CFG, 0.0, (boom,))
    assert e.begin_lock(1.0)
    binding: Any = e._machine_binding
    assert binding is not None and binding[0] is EntryMachine
    e.abort_lock(1.1)
    again: Any = e._machine_binding
    assert again[2] is binding[2]  # the same machine, which re-reads e.state on every event
    boom.armed = True
    with pytest.raises(RuntimeError):
        e.begin_lock(1.2)
    assert e._machine_binding is None  # a failed event leaves no half-processed machine behind
    boom.armed = False
    e.expire(ExpiryReason.CLOSED, 1.3)
    assert e.state == "Expired" and e._machine_binding is None  # the engine stops for good in a final state
    untraced = PairEntry(EndpointPair(ALICE, BOB, 0x78), "bob", False, CFG, 0.0)
    assert untraced.begin_lock(1.0) and untraced._machine_binding is None  # the hot path binds nothing
