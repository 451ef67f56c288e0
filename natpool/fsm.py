"""Compiled machines: the runtime steps the generated tables; python-statemachine stays the authority.

One python-statemachine event costs ~120 µs (a thread-safe queue, macrostep
scans, SCXML entry/exit sets; no setting skips them), and a take fires 15 of
them. A dict-table step costs ~0.1 µs. So the hot paths (entry lifecycle,
both handover roles) step the compiled tables of ``natpool/machines/tables.py``
directly: look up ``(state, event) -> (target, guard)``, read the guard
attribute on the object, write ``state``. That is only sound while the tables
say exactly what the generated classes say, so equivalence is enforced:

* :func:`verify` runs when :mod:`natpool.machines` is imported: it reads the
  machine back from each class's public metadata (``cls.states``,
  ``state.transitions``, ``transition.events`` / ``cond`` / ``validators``
  and the action lists) and raises :class:`MachineMismatch` with a diff when
  the class and its compiled table disagree, or when the class uses a
  feature a table cannot express (actions, ``unless``, validators, two
  transitions for one event and source, ...);
* a hypothesis differential test (tests/machines/test_compiled_machines.py) drives
  class and table side by side through random events and guard values.

The class itself still runs every transition whenever python-statemachine
listeners are bound (trace recording, user listeners: they see exactly what
the class reports), and for every transition in *strict mode*:
``NATPOOL_STRICT_MACHINES=1`` in the environment (read at import) or
:func:`set_strict`. Refusals always go through the class, so the errors a
caller sees are the class's own (``TransitionNotAllowed``).

This module imports nothing from natpool: :mod:`natpool.machines` calls it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol

from statemachine import StateMachine

ENV_STRICT: Final = "NATPOOL_STRICT_MACHINES"

_strict = os.environ.get(ENV_STRICT, "").strip() not in ("", "0")


def set_strict(on: bool) -> None:
    """Route every transition through the python-statemachine class (``True``), or step the tables."""
    global _strict
    _strict = bool(on)


def strict() -> bool:
    """Whether strict mode is on (see :func:`set_strict` and ``NATPOOL_STRICT_MACHINES``)."""
    return _strict


class TableLike(Protocol):
    """What this module needs of a generated ``natpool.machines.tables.Table``."""

    @property
    def name(self) -> str: ...
    @property
    def states(self) -> tuple[str, ...]: ...
    @property
    def initial(self) -> str: ...
    @property
    def final(self) -> frozenset[str]: ...
    @property
    def transitions(self) -> dict[tuple[str, str], tuple[str, str]]: ...


class MachineMismatch(RuntimeError):
    """A generated class and its compiled table disagree: regenerate (``natpool spec generate``)."""


# --- reading a class back ---------------------------------------------------------------------


@dataclass
class ReadBack:
    """A python-statemachine class, as a table: what :func:`read_back` found."""

    states: tuple[str, ...]
    initial: str | None
    final: frozenset[str]
    transitions: dict[tuple[str, str], tuple[str, str]]
    problems: list[str] = field(default_factory=list)


def _explicit(specs: Iterable[Any]) -> list[str]:
    """Non-convention callbacks (actions a table would not run); convention names are listener hooks."""
    return [str(getattr(s, "func", s)) for s in specs if not getattr(s, "is_convention", False)]


def _defined_on(cls: type[StateMachine], specs: Iterable[Any]) -> list[str]:
    """Convention callbacks (``on_enter_<state>``, ``after_<event>``...) the class itself defines."""
    names = [str(getattr(s, "func", "")) for s in specs if getattr(s, "is_convention", False)]
    return [n for n in names if n and hasattr(cls, n) and not hasattr(StateMachine, n)]


def read_back(cls: type[StateMachine]) -> ReadBack:
    """Read states, initial, finals and guarded transitions from ``cls``'s public metadata."""
    states = tuple(str(s.value) for s in cls.states)
    initials = [str(s.value) for s in cls.states if s.initial]
    out = ReadBack(states, initials[0] if len(initials) == 1 else None,
                   frozenset(str(s.value) for s in cls.states if s.final), {})
    if len(initials) != 1:
        out.problems.append(f"initial states {initials}, expected exactly one")
    for setting, want in (("allow_event_without_transition", False), ("catch_errors_as_events", False)):
        if getattr(cls, setting, None) is not want:
            out.problems.append(f"{setting} is {getattr(cls, setting, None)!r}, the runtime needs {want!r}")
    for state in cls.states:
        src = str(state.value)
        if not state.is_atomic:
            out.problems.append(f"state {src} is compound/parallel")
        for hook in ("enter", "exit"):
            actions = _explicit(getattr(state, hook)) + _defined_on(cls, getattr(state, hook))
            if actions:
                out.problems.append(f"state {src} has {hook} actions {actions}")
        for t in state.transitions:
            events = [str(e) for e in t.events]
            label = f"{src} --{'/'.join(events) or '(eventless)'}-->"
            targets = [str(x.value) for x in t.targets]
            if len(targets) != 1 or not events or t.internal:
                out.problems.append(f"{label}: targets {targets}, internal={t.internal}: not a plain transition")
                continue
            conds = [(str(c.func), bool(c.expected_value)) for c in t.cond]
            if any(not positive for _, positive in conds) or len(conds) > 1:
                out.problems.append(f"{label}: guards {conds}; a table holds one positive guard")
            guard = conds[0][0] if conds else ""
            actions = (_explicit(t.validators) + _explicit(t.before) + _explicit(t.on) + _explicit(t.after)
                       + _defined_on(cls, [*t.before, *t.on, *t.after]))
            if actions:
                out.problems.append(f"{label}: validators/actions {actions}")
            for event in events:
                key = (src, event)
                if key in out.transitions:
                    out.problems.append(f"{label}: a second transition for ({src}, {event})")
                    continue
                out.transitions[key] = (targets[0], guard)
    return out


def diff(cls: type[StateMachine], table: TableLike) -> list[str]:
    """Every way ``cls`` and ``table`` differ, one line each; empty when they are equivalent."""
    got = read_back(cls)
    name = f"{cls.__name__} vs tables.{table.name.upper()}"
    lines = [f"{name}: {p}" for p in got.problems]
    for what, cls_value, table_value in (("states", got.states, table.states),
                                         ("initial", got.initial, table.initial),
                                         ("final", sorted(got.final), sorted(table.final))):
        if cls_value != table_value:
            lines.append(f"{name}: {what}: class {cls_value!r}, table {table_value!r}")
    for key in sorted(set(got.transitions) | set(table.transitions)):
        c, t = got.transitions.get(key), table.transitions.get(key)
        if c != t:
            lines.append(f"{name}: ({key[0]}, {key[1]}): class {c!r}, table {t!r}  (target, guard)")
    return lines


def verify(machines: Mapping[str, tuple[type[StateMachine], TableLike]]) -> None:
    """Raise :class:`MachineMismatch` listing every difference between each class and its table."""
    lines = [line for cls, table in machines.values() for line in diff(cls, table)]
    if lines:
        raise MachineMismatch("generated machines and compiled tables differ "
                              "(run `natpool spec generate`):\n  " + "\n  ".join(lines))


# --- stepping -----------------------------------------------------------------------------------


class Compiled:
    """One machine's table, stepped on any object whose ``state`` field it owns.

    ``fire`` behaves as ``cls(model=obj, start_value=obj.state).send(event)``
    would: same target, same guard reads, the class's own exception on a
    refusal. The class runs the transition only for refusals (a fresh machine:
    its error is the class's own), with listeners bound and in strict mode.
    There the object keeps its bound machine in ``_machine_binding`` between
    events (one event on a bound machine ~120 µs, a fresh one ~260 µs; ~10.7
    KB each, so only traced or strict objects pay it), dropped when it
    reaches a final state or an event fails.
    """

    __slots__ = ("cls", "final", "name", "transitions")

    def __init__(self, cls: type[StateMachine], table: TableLike) -> None:
        self.cls = cls
        self.name = table.name
        self.transitions = table.transitions
        self.final = table.final

    def fire(self, obj: Any, event: str, listeners: tuple[object, ...] = ()) -> None:
        """Transition ``obj`` on ``event``; raises ``TransitionNotAllowed`` exactly when the class would."""
        hit = self.transitions.get((obj.state, event))
        if hit is None or (hit[1] and not getattr(obj, hit[1])):
            self.refuse(obj, event, listeners)
        if listeners or _strict:  # :meth:`enter`, inlined (a take fires nine session events through here)
            self.through_class(obj, event, hit[0], listeners)
        else:
            obj.state = hit[0]

    def enter(self, obj: Any, event: str, target: str, listeners: tuple[object, ...] = ()) -> None:
        """The caller found ``(obj.state, event) -> target`` in the table and its guard true: transition.

        The hot path is one attribute write; with listeners, or in strict
        mode, the class runs the transition (and re-evaluates the guard).
        """
        if listeners or _strict:
            self.through_class(obj, event, target, listeners)
        else:
            obj.state = target

    def refuse(self, obj: Any, event: str, listeners: tuple[object, ...] = ()) -> NoReturn:
        """Let a fresh machine of the class refuse ``event``: the caller sees the class's own error."""
        self.cls(model=obj, start_value=obj.state, listeners=list(listeners)).send(event)
        raise AssertionError(f"{self.cls.__name__} accepted {event} that the compiled table refused")

    def through_class(self, obj: Any, event: str, target: str, listeners: tuple[object, ...] = ()) -> None:
        """Fire ``event`` on the class, bound to ``obj`` (listeners see ``obj`` as ``model``)."""
        bound = getattr(obj, "_machine_binding", None)
        if bound is not None and bound[0] is self.cls and bound[1] == listeners:
            machine = bound[2]
        else:
            machine = self.cls(model=obj, start_value=obj.state, listeners=list(listeners))
        obj._machine_binding = None  # a failing event leaves no half-processed machine behind
        machine.send(event)  # python-statemachine reads obj.state afresh on every event
        if target not in self.final:  # the engine stops for good in a final state
            obj._machine_binding = (self.cls, listeners, machine)
