"""Parse and validate ``spec/*.toml`` machine files."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

from natpool.resources import SpecNotFound, spec_dir
from natpool.spec.model import Guard, MachineSpec, SpecError, Transition

MACHINE_FILES = ("entry.toml", "initiator.toml", "responder.toml")


def default_spec_dir() -> Path:
    """The source checkout's ``spec/``, else the installed package's copy (see :mod:`natpool.resources`)."""
    return spec_dir().path


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _req_str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str):
        raise SpecError(f"{where}: missing or non-string '{key}'")
    return value


def load_machine(path: Path) -> MachineSpec:
    """Load one machine file and check it is internally consistent."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise SpecNotFound(f"spec file {path} not found") from exc
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: {exc}") from exc
    where = path.name
    m = doc.get("machine")
    if not isinstance(m, dict):
        raise SpecError(f"{where}: missing [machine] table")
    name = _req_str(m, "name", where)
    states = _str_list(m.get("states"), f"{where} machine.states")
    if len(set(states)) != len(states):
        raise SpecError(f"{where}: duplicate state names")
    known = set(states)
    initial = _req_str(m, "initial", where)
    final = frozenset(_str_list(m.get("final", []), f"{where} machine.final"))
    sets_raw = m.get("sets", {})
    sets = {k: frozenset(_str_list(v, f"{where} machine.sets.{k}")) for k, v in sets_raw.items()}
    for label, group in [("initial", {initial}), ("final", final), *sets.items()]:
        unknown = set(group) - known
        if unknown:
            raise SpecError(f"{where}: {label} names unknown states {sorted(unknown)}")

    guards: dict[str, Guard] = {}
    for gname, g in doc.get("guard", {}).items():
        guards[gname] = Guard(gname, _req_str(g, "formula", f"{where} guard.{gname}"),
                              str(g.get("why", "")).strip())

    transitions: list[Transition] = []
    seen: set[tuple[str, str]] = set()
    for i, t in enumerate(doc.get("transition", [])):
        tw = f"{where} transition #{i + 1}"
        event = _req_str(t, "event", tw)
        source = _str_list(t.get("source"), f"{tw} source")
        target = _req_str(t, "target", tw)
        guard = str(t.get("guard", ""))
        for s in (*source, target):
            if s not in known:
                raise SpecError(f"{tw} ({event}): unknown state {s!r}")
        for s in source:
            if s in final:
                raise SpecError(f"{tw} ({event}): leaves final state {s!r}")
            if (s, event) in seen:
                raise SpecError(f"{tw}: event {event!r} declared twice from {s!r} (must be deterministic)")
            seen.add((s, event))
        if guard and guard not in guards:
            raise SpecError(f"{tw} ({event}): guard {guard!r} has no [guard.{guard}] section")
        transitions.append(Transition(event, source, target, guard, str(t.get("why", "")).strip()))
    if not transitions:
        raise SpecError(f"{where}: no transitions")
    return MachineSpec(
        name=name,
        doc=str(m.get("doc", "")).strip(),
        states=states,
        initial=initial,
        final=final,
        sets=sets,
        transitions=tuple(transitions),
        guards=guards,
        source_file=f"spec/{path.name}",
        source_sha256=hashlib.sha256(raw).hexdigest(),
    )


def load_machines(spec_dir: Path | None = None) -> dict[str, MachineSpec]:
    """All machines in ``spec_dir``, keyed by machine name (Entry, Initiator, Responder)."""
    base = spec_dir or default_spec_dir()
    out: dict[str, MachineSpec] = {}
    for fname in MACHINE_FILES:
        spec = load_machine(base / fname)
        out[spec.name] = spec
    return out
