"""Load the declarative system model, its properties, mutants and bounded models.

``spec/system.toml`` (constants, domains, variables, defines, actions),
``spec/properties.toml`` and ``spec/mutants.toml`` are parsed here once into
ASTs; :mod:`natpool.check.compile` turns them into Python closures and
:mod:`natpool.specgen.emit_tla` into TLA+, so both read the same objects.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from natpool.check.dsl import Define, MachineInfo, names_used, parse_effect, parse_expr, stepped_events
from natpool.resources import models_dir
from natpool.spec.load import default_spec_dir, load_machines
from natpool.spec.model import MachineSpec, SpecError

Effect = list[tuple[str, list[ast.expr], ast.expr]]


@dataclass(frozen=True)
class ConstDecl:
    name: str
    type: str  # "int" | "bool"
    min: int
    doc: str
    default: int | bool | None = None  # a model may leave the constant out (added later: old models still load)


@dataclass(frozen=True)
class Action:
    name: str
    params: tuple[tuple[str, str], ...]  # (name, domain), in order
    lets: tuple[tuple[str, ast.expr], ...]
    guard: ast.expr
    effect: Effect
    fair: tuple[str, ...]  # params identifying one weakly fair instance; () = not fair
    is_fair: bool
    at: ast.expr | None
    why: str
    guard_text: str
    effect_text: str


@dataclass(frozen=True)
class Property:
    name: str
    params: tuple[tuple[str, str], ...]
    invariant: ast.expr | None
    action: ast.expr | None
    stuck: ast.expr | None
    when: ast.expr | None
    why: str
    texts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Symmetry:
    domain: str
    klass: str  # define mapping an element to its class
    indexed: tuple[str, ...]
    refs: tuple[str, ...]


@dataclass(frozen=True)
class Mutant:
    name: str
    doc: str
    add_transitions: tuple[tuple[str, str, str, str], ...]  # machine, source, event, target
    defines: dict[str, Define]
    actions: dict[str, dict[str, str]]  # action name -> {"guard": ..., "effect": ...}
    expect: tuple[str, ...]


@dataclass(frozen=True)
class System:
    name: str
    doc: str
    constants: dict[str, ConstDecl]
    domains: dict[str, ast.expr]
    variables: dict[str, tuple[ast.expr, str]]  # name -> (init, doc)
    defines: dict[str, Define]
    actions: tuple[Action, ...]
    properties: tuple[Property, ...]
    terminal: ast.expr
    symmetry: Symmetry | None
    machines: dict[str, MachineInfo]
    mutant: Mutant | None = None


@dataclass(frozen=True)
class Model:
    """One bounded configuration from ``models/*.toml``."""

    name: str
    path: Path | None
    profile: str
    doc: str
    constants: dict[str, int | bool]
    expect: tuple[str, ...]  # properties this model is EXPECTED to violate (documents a broken assumption)
    reduce: bool


def machine_infos(machines: Mapping[str, MachineSpec]) -> dict[str, MachineInfo]:
    out = {}
    for m in machines.values():
        table = {(s, t.event): (t.target, t.guard) for t in m.transitions for s in t.source}
        out[m.name] = MachineInfo(m.name, m.initial, dict(m.sets), table)
    return out


def _str(d: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise SpecError(f"{where}: missing or non-string {key!r}")
    return v


def _params(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: params must be a table name = Domain")
    return tuple((str(k), str(v)) for k, v in raw.items())


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: {exc}") from exc


def _action(raw: dict[str, Any], where: str) -> Action:
    name = _str(raw, "name", where)
    w = f"{where} action {name}"
    params = _params(raw.get("params", {}), w)
    lets = tuple((str(k), parse_expr(str(v), f"{w} let {k}")) for k, v in raw.get("let", {}).items())
    fair = tuple(str(x) for x in raw.get("fair", []))
    guard_text = _str(raw, "guard", w)
    effect_text = _str(raw, "effect", w)
    at = raw.get("at")
    return Action(name=name, params=params, lets=lets, guard=parse_expr(guard_text, f"{w} guard"),
                  effect=parse_effect(effect_text, f"{w} effect"), fair=fair, is_fair="fair" in raw,
                  at=parse_expr(str(at), f"{w} at") if at else None, why=str(raw.get("why", "")).strip(),
                  guard_text=guard_text, effect_text=effect_text)


def _defines(raw: dict[str, Any], where: str) -> dict[str, Define]:
    out = {}
    for name, d in raw.items():
        params = tuple(str(p) for p in d.get("params", []))
        w = f"{where} define {name}"
        out[name] = Define(name, params, parse_expr(_str(d, "expr", w), w), str(d.get("why", "")).strip())
    return out


def _property(raw: dict[str, Any], where: str) -> Property:
    name = _str(raw, "name", where)
    w = f"{where} property {name}"
    parsed: dict[str, ast.expr | None] = {}
    texts = {}
    for key in ("invariant", "action", "stuck", "when"):
        text = raw.get(key)
        parsed[key] = parse_expr(str(text), f"{w} {key}") if text is not None else None
        if text is not None:
            texts[key] = " ".join(str(text).split())
    if not any(parsed[k] is not None for k in ("invariant", "action", "stuck")):
        raise SpecError(f"{w}: needs invariant, action or stuck")
    return Property(name, _params(raw.get("params", {}), w), parsed["invariant"], parsed["action"], parsed["stuck"],
                    parsed["when"], str(raw.get("why", "")).strip(), texts)


def load_mutants(spec_dir: Path | None = None) -> dict[str, Mutant]:
    path = (spec_dir or default_spec_dir()) / "mutants.toml"
    if not path.exists():
        return {}
    doc = _load_toml(path)
    out = {}
    for raw in doc.get("mutant", []):
        name = _str(raw, "name", path.name)
        adds = []
        for t in raw.get("add_transition", []):
            for src in t["source"]:
                adds.append((str(t["machine"]), str(src), str(t["event"]), str(t["target"])))
        out[name] = Mutant(name=name, doc=" ".join(str(raw.get("doc", "")).split()), add_transitions=tuple(adds),
                           defines=_defines(raw.get("define", {}), f"{path.name} mutant {name}"),
                           actions={k: {kk: str(vv) for kk, vv in v.items()} for k, v in raw.get("action", {}).items()},
                           expect=tuple(raw.get("expect", [])))
    return out


def load_system(spec_dir: Path | None = None, machines: Mapping[str, MachineSpec] | None = None,
                mutant: str | None = None) -> System:
    """Parse the system model; with ``mutant``, apply that seeded bug (tables included)."""
    base = spec_dir or default_spec_dir()
    specs = machines if machines is not None else load_machines(base)
    infos = machine_infos(specs)
    doc = _load_toml(base / "system.toml")
    where = "system.toml"
    sysd = doc.get("system", {})
    consts = {}
    for k, v in doc.get("constants", {}).items():
        if v.get("type") not in ("int", "bool"):
            raise SpecError(f"{where}: constant {k} needs type int or bool")
        default = v.get("default")
        if default is not None and (isinstance(default, bool) != (v["type"] == "bool")):
            raise SpecError(f"{where}: constant {k}: default {default!r} is not of type {v['type']}")
        consts[k] = ConstDecl(k, str(v["type"]), int(v.get("min", 0)), str(v.get("doc", "")), default)
    domains = {k: parse_expr(str(v), f"{where} domain {k}") for k, v in doc.get("domains", {}).items()}
    variables = {k: (parse_expr(_str(v, "init", f"{where} variable {k}"), f"{where} variable {k}"),
                     str(v.get("doc", ""))) for k, v in doc.get("variables", {}).items()}
    defines = _defines(doc.get("define", {}), where)
    actions = [_action(a, where) for a in doc.get("action", [])]
    pdoc = _load_toml(base / "properties.toml")
    defines.update(_defines(pdoc.get("define", {}), "properties.toml"))
    props = tuple(_property(p, "properties.toml") for p in pdoc.get("property", []))
    sym_raw = doc.get("symmetry")
    symmetry = None
    if sym_raw:
        symmetry = Symmetry(str(sym_raw["domain"]), str(sym_raw["class"]), tuple(sym_raw.get("indexed", [])),
                            tuple(sym_raw.get("refs", [])))
    mut = None
    if mutant is not None:
        muts = load_mutants(base)
        if mutant not in muts:
            raise SpecError(f"unknown mutant {mutant!r}; known: {', '.join(sorted(muts))}")
        mut = muts[mutant]
        for mname, src, ev, tgt in mut.add_transitions:
            info = infos[mname]
            table = dict(info.table)
            table[(src, ev)] = (tgt, "")
            infos[mname] = replace(info, table=table)
        defines.update(mut.defines)
        by_name = {a.name: a for a in actions}
        for aname, over in mut.actions.items():
            if aname not in by_name:
                raise SpecError(f"mutant {mutant}: no action {aname!r}")
            a = by_name[aname]
            w = f"mutant {mutant} action {aname}"
            g = over.get("guard", a.guard_text)
            ef = over.get("effect", a.effect_text)
            by_name[aname] = replace(a, guard=parse_expr(g, w), effect=parse_effect(ef, w), guard_text=g,
                                     effect_text=ef)
        actions = [by_name[a.name] for a in actions]
    system = System(name=_str(sysd, "name", where), doc=str(sysd.get("doc", "")).strip(), constants=consts,
                    domains=domains, variables=variables, defines=defines, actions=tuple(actions), properties=props,
                    terminal=parse_expr(_str(sysd, "terminal", where), f"{where} terminal"), symmetry=symmetry,
                    machines=infos, mutant=mut)
    _check_guard_names(system)
    return system


def _check_guard_names(system: System) -> None:
    """A table transition with a named guard may only be stepped by an action that models that guard."""
    for a in system.actions:
        mentioned = names_used(a.guard)
        nodes: list[ast.expr] = [v for _, _, v in a.effect] + [e for _, e in a.lets]
        for node in nodes:
            for mname, event in stepped_events(node):
                info = system.machines.get(mname)
                if info is None:
                    raise SpecError(f"action {a.name}: unknown machine {mname}")
                for (_, ev), (_, guard) in info.table.items():
                    if ev == event and guard and guard not in mentioned:
                        raise SpecError(f"action {a.name} steps {mname}.{event}, whose spec guard {guard!r} "
                                        f"its guard does not mention")
        for name in a.fair:
            if name not in dict(a.params):
                raise SpecError(f"action {a.name}: fair names unknown param {name!r}")


def load_model(path: Path, system: System) -> Model:
    doc = _load_toml(path)
    m = doc.get("model", {})
    consts: dict[str, int | bool] = {}
    raw = doc.get("constants", {})
    for name, decl in system.constants.items():
        if name not in raw and decl.default is None:
            raise SpecError(f"{path.name}: constant {name} missing")
        v = raw.get(name, decl.default)
        if decl.type == "bool" and not isinstance(v, bool):
            raise SpecError(f"{path.name}: {name} must be true/false")
        if decl.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < decl.min):
            raise SpecError(f"{path.name}: {name} must be an int >= {decl.min}")
        consts[name] = v
    unknown = set(raw) - set(system.constants)
    if unknown:
        raise SpecError(f"{path.name}: unknown constants {sorted(unknown)}")
    expect = tuple(str(x) for x in m.get("expect", []))
    if consts.get("R", 0) and not consts.get("adversary"):
        raise SpecError(f"{path.name}: rogue sessions (R > 0) need adversary = true")
    if consts.get("duplicate") and not consts.get("settle") and "CleanHandover" not in expect:
        raise SpecError(f"{path.name}: duplicate = true needs settle = true (or expect CleanHandover to fail)")
    return Model(name=str(m.get("name", path.stem)), path=path, profile=str(m.get("profile", "fast")),
                 doc=" ".join(str(m.get("doc", "")).split()), constants=consts, expect=expect,
                 reduce=bool(m.get("reduce", True)))


def default_models_dir() -> Path:
    """The source checkout's ``models/``, else the installed package's copy (see :mod:`natpool.resources`)."""
    return models_dir().path


def list_models(profile: str | None = None, models_dir: Path | None = None) -> list[Path]:
    base = models_dir or default_models_dir()
    paths = sorted(base.glob("*.toml"))
    if profile is None:
        return paths
    out = []
    for p in paths:
        prof = _load_toml(p).get("model", {}).get("profile", "fast")
        if prof == profile:
            out.append(p)
    return out
