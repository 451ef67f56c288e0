"""Compile a :class:`System` bound to one model's constants into Python closures.

The whole system becomes one generated Python module (actions as nested loops
over their parameters, guards and effects inlined, tables as dicts), which is
``exec``'d once per run: the search then only calls plain functions on plain
tuples. The source is kept on the result for debugging (``--dump-python``).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from natpool.check.dsl import Scope, Translator, inline, step_conditions
from natpool.check.system import Action, Model, Property, System

State = tuple[Any, ...]
Succ = tuple[int, tuple[Any, ...], State]
ActionFn = Callable[[State, list[Succ]], None]


def upd(t: tuple[Any, ...], i: int, v: Any) -> tuple[Any, ...]:
    return t[:i] + (v,) + t[i + 1:]  # noqa: RUF005 - fastest form on small tuples


def upd2(t: tuple[Any, ...], i: int, j: int, v: Any) -> tuple[Any, ...]:
    r = t[i]
    return t[:i] + (r[:j] + (v,) + r[j + 1:],) + t[i + 1:]  # noqa: RUF005


@dataclass
class PropInstance:
    prop: Property
    kind: str  # invariant | action | stuck
    fn: Callable[..., Any]


@dataclass
class Compiled:
    system: System
    model: Model
    variables: tuple[str, ...]
    domains: dict[str, tuple[int, ...]]
    init: State
    actions: list[ActionFn]
    action_names: list[str]
    action_params: list[tuple[str, ...]]
    action_at: list[Callable[..., Any] | None]
    fair_positions: list[tuple[int, ...] | None]
    invariants: list[tuple[Property, Callable[[State], tuple[Any, ...] | None]]]
    action_props: list[tuple[Property, Callable[[State, State], tuple[Any, ...] | None]]]
    stuck: list[tuple[Property, list[tuple[Any, ...]], Callable[[State], list[bool]]]]
    terminal: Callable[[State], bool]
    canon: Callable[[State], State] | None
    source: str
    skipped: list[str] = field(default_factory=list)


def _scope(system: System, model: Model, local: frozenset[str] = frozenset()) -> Scope:
    return Scope(variables=tuple(system.variables), constants=model.constants, domains=tuple(system.domains),
                 defines=system.defines, machines=system.machines, locals=local)


def _py(system: System, model: Model, node: ast.expr, local: frozenset[str]) -> str:
    return Translator(_scope(system, model, local), tla=False).expr(inline(node, system.defines))


def action_guard(a: Action, defines: Any) -> ast.expr:
    """User guard, then the table conditions of every ``step`` in lets and effects."""
    extra: list[ast.expr] = []
    for _, e in a.lets:
        extra += step_conditions(inline(e, defines))
    extra += step_conditions(inline(a.guard, defines))
    for _, idx, val in a.effect:
        for x in (*idx, val):
            extra += step_conditions(inline(x, defines))
    inlined = inline(a.guard, defines)
    have = {ast.dump(c) for c in (inlined.values if isinstance(inlined, ast.BoolOp)
                                  and isinstance(inlined.op, ast.And) else [inlined])}
    unique = []
    for c in extra:
        key = ast.dump(c)
        if key not in have:
            have.add(key)
            unique.append(c)
    if not unique:
        return a.guard
    return ast.BoolOp(op=ast.And(), values=[a.guard, *unique])


def _emit_action(i: int, a: Action, system: System, model: Model, var_names: tuple[str, ...]) -> list[str]:
    local = frozenset(p for p, _ in a.params) | frozenset(n for n, _ in a.lets)
    lines = [f"def act_{i}(st, out):", f"    {', '.join('v_' + v for v in var_names)}, = st"]
    ind = "    "
    for pname, dom in a.params:
        if dom not in system.domains:
            raise ValueError(f"action {a.name}: unknown domain {dom}")
        lines.append(f"{ind}for L_{pname} in D_{dom}:")
        ind += "    "
    for lname, lexpr in a.lets:
        lines.append(f"{ind}L_{lname} = {_py(system, model, lexpr, local)}")
    guard = _py(system, model, action_guard(a, system.defines), local)
    lines.append(f"{ind}if {guard}:")
    ind += "    "
    assigned: list[str] = []
    for var, idx, val in a.effect:
        if var not in var_names:
            raise ValueError(f"action {a.name}: assigns unknown variable {var}")
        if var not in assigned:
            lines.append(f"{ind}n_{var} = v_{var}")
            assigned.append(var)
        rhs = _py(system, model, val, local)
        ix = [_py(system, model, x, local) for x in idx]
        if not ix:
            lines.append(f"{ind}n_{var} = {rhs}")
        elif len(ix) == 1:
            lines.append(f"{ind}n_{var} = upd(n_{var}, {ix[0]}, {rhs})")
        elif len(ix) == 2:
            lines.append(f"{ind}n_{var} = upd2(n_{var}, {ix[0]}, {ix[1]}, {rhs})")
        else:
            raise ValueError(f"action {a.name}: at most two indices")
    new = ", ".join(("n_" if v in assigned else "v_") + v for v in var_names)
    params = "".join(f"L_{p}, " for p, _ in a.params)
    lines.append(f"{ind}out.append(({i}, ({params}), ({new},)))")
    return lines


def _emit_pred(fname: str, p: Property, node: ast.expr, system: System, model: Model, var_names: tuple[str, ...],
               primed: bool) -> list[str]:
    local = frozenset(n for n, _ in p.params)
    args = "st, nx" if primed else "st"
    lines = [f"def {fname}({args}):", f"    {', '.join('v_' + v for v in var_names)}, = st"]
    if primed:
        lines.append(f"    {', '.join('x_' + v for v in var_names)}, = nx")
    ind = "    "
    for pname, dom in p.params:
        lines.append(f"{ind}for L_{pname} in D_{dom}:")
        ind += "    "
    body = _py(system, model, node, local)
    inst = "".join(f"L_{n}, " for n, _ in p.params)
    lines += [f"{ind}if not {body}:", f"{ind}    return ({inst})", "    return None"]
    return lines


def _emit_stuck(fname: str, p: Property, node: ast.expr, system: System, model: Model,
                var_names: tuple[str, ...]) -> list[str]:
    local = frozenset(n for n, _ in p.params)
    body = _py(system, model, node, local)
    loops = "".join(f" for L_{n} in D_{d}" for n, d in p.params)
    return [f"def {fname}(st):", f"    {', '.join('v_' + v for v in var_names)}, = st",
            f"    return [{body}{loops}]"]


def _eval_const(system: System, model: Model, node: ast.expr, ns: dict[str, Any]) -> Any:
    return eval(_py(system, model, node, frozenset()), ns)  # noqa: S307 - spec-derived, validated subset


def compile_system(system: System, model: Model, reduce: bool = True) -> Compiled:
    """Bind ``system`` to ``model``'s constants; ``reduce`` enables the symmetry reduction."""
    var_names = tuple(system.variables)
    ns: dict[str, Any] = {"upd": upd, "upd2": upd2}
    for m in system.machines.values():
        ns[f"TB_{m.name}"] = dict(m.table)
        for sname, states in m.sets.items():
            ns[f"SET_{m.name}_{sname}"] = frozenset(states)
    domains: dict[str, tuple[int, ...]] = {}
    for dname, dexpr in system.domains.items():
        domains[dname] = tuple(_eval_const(system, model, dexpr, ns))
        ns[f"D_{dname}"] = domains[dname]
    init = tuple(_eval_const(system, model, system.variables[v][0], ns) for v in var_names)

    src: list[str] = []
    for i, a in enumerate(system.actions):
        src += _emit_action(i, a, system, model, var_names)
    skipped: list[str] = []
    props_inv: list[tuple[int, Property]] = []
    props_act: list[tuple[int, Property]] = []
    props_stuck: list[tuple[int, Property]] = []
    for j, p in enumerate(system.properties):
        if p.when is not None and not _eval_const(system, model, p.when, ns):
            skipped.append(p.name)
            continue
        if p.invariant is not None:
            src += _emit_pred(f"inv_{j}", p, p.invariant, system, model, var_names, primed=False)
            props_inv.append((j, p))
        if p.action is not None:
            src += _emit_pred(f"aprop_{j}", p, p.action, system, model, var_names, primed=True)
            props_act.append((j, p))
        if p.stuck is not None:
            src += _emit_stuck(f"stuck_{j}", p, p.stuck, system, model, var_names)
            props_stuck.append((j, p))
    src += ["def terminal(st):", f"    {', '.join('v_' + v for v in var_names)}, = st",
            f"    return {_py(system, model, system.terminal, frozenset())}"]
    at_fns: list[str | None] = []
    for i, a in enumerate(system.actions):
        local = frozenset(p for p, _ in a.params) | frozenset(n for n, _ in a.lets)
        at_node = a.at
        if at_node is None:
            names = [n for n, _ in a.lets] + [p for p, _ in a.params]
            at_node = next((ast.Name(id=n, ctx=ast.Load()) for n in ("n", "m") if n in names), None)
        if at_node is None:
            at_fns.append(None)
            continue
        params = ", ".join(f"L_{p}" for p, _ in a.params)
        src += [f"def at_{i}(st, {params}):", f"    {', '.join('v_' + v for v in var_names)}, = st"]
        src += [f"    L_{n} = {_py(system, model, e, local)}" for n, e in a.lets]
        src += [f"    return {_py(system, model, at_node, local)}"]
        at_fns.append(f"at_{i}")
    source = "\n".join(src) + "\n"
    exec(compile(source, f"<natpool system {system.name}>", "exec"), ns)  # noqa: S102 - generated from spec

    fair_positions: list[tuple[int, ...] | None] = []
    for a in system.actions:
        names = [p for p, _ in a.params]
        fair_positions.append(tuple(names.index(f) for f in a.fair) if a.is_fair else None)
    stuck = []
    for j, p in props_stuck:
        insts = [()]  # type: list[tuple[Any, ...]]
        for _, d in p.params:
            insts = [(*x, v) for x in insts for v in domains[d]]
        stuck.append((p, insts, ns[f"stuck_{j}"]))
    canon = _make_canon(system, model, var_names, domains, ns) if reduce and system.symmetry else None
    return Compiled(
        system=system, model=model, variables=var_names, domains=domains, init=init,
        actions=[ns[f"act_{i}"] for i in range(len(system.actions))],
        action_names=[a.name for a in system.actions],
        action_params=[tuple(p for p, _ in a.params) for a in system.actions],
        action_at=[ns[f] if f else None for f in at_fns],
        fair_positions=fair_positions,
        invariants=[(p, ns[f"inv_{j}"]) for j, p in props_inv],
        action_props=[(p, ns[f"aprop_{j}"]) for j, p in props_act],
        stuck=stuck, terminal=ns["terminal"], canon=canon, source=source, skipped=skipped)


def _make_canon(system: System, model: Model, var_names: tuple[str, ...], domains: dict[str, tuple[int, ...]],
                ns: dict[str, Any]) -> Callable[[State], State] | None:
    """Taker-permutation symmetry: sort interchangeable sessions, renumber references.

    Sound for every property here because each quantifies over all sessions
    and a permutation never moves a session to another class (node). Two
    symmetric states may still get different representatives when sessions
    tie; that only costs reduction, never soundness.
    """
    sym = system.symmetry
    assert sym is not None
    cls_define = system.defines[sym.klass]
    call = ast.Call(func=ast.Name(id=sym.klass, ctx=ast.Load()), args=[ast.Name(id="x", ctx=ast.Load())],
                    keywords=[])
    fn = eval(f"lambda L_x: {_py(system, model, call, frozenset({'x'}))}", ns)  # noqa: S307
    assert cls_define.params
    classes: dict[Any, list[int]] = {}
    for s in domains[sym.domain]:
        classes.setdefault(fn(s), []).append(s)
    groups = [c for c in classes.values() if len(c) > 1]
    if not groups:
        return None
    idx_pos = [var_names.index(v) for v in sym.indexed]
    ref_pos = [var_names.index(v) for v in sym.refs]

    def remap(value: Any, mapping: dict[int, int]) -> Any:
        if isinstance(value, tuple):
            return tuple(remap(x, mapping) for x in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return mapping.get(value, value)
        return value

    def flatten(value: Any, out: set[int]) -> None:
        if isinstance(value, tuple):
            for x in value:
                flatten(x, out)
        elif isinstance(value, int) and not isinstance(value, bool):
            out.add(value)

    def apply(st: State, mapping: dict[int, int]) -> State:
        out = list(st)
        inv = {v: k for k, v in mapping.items()}
        for k in idx_pos:
            col = st[k]
            out[k] = tuple(col[inv.get(s, s)] for s in range(len(col)))
        for k in ref_pos:
            out[k] = remap(st[k], mapping)
        return tuple(out)

    def canon(st: State) -> State:
        mapping: dict[int, int] = {}
        ties: list[list[int]] = []
        for group in groups:
            keys = {s: tuple(st[k][s] for k in idx_pos) for s in group}
            order = sorted(group, key=keys.__getitem__)
            for new, old in zip(group, order, strict=True):
                if new != old:
                    mapping[old] = new
            run = [order[0]]
            for s in order[1:]:
                if keys[s] == keys[run[-1]]:
                    run.append(s)
                else:
                    if len(run) > 1:
                        ties.append(run)
                    run = [s]
            if len(run) > 1:
                ties.append(run)
        if ties:
            referenced: set[int] = set()
            for k in ref_pos:
                flatten(st[k], referenced)
            # identical sessions nobody refers to are interchangeable as they are
            ties = [run for run in ties if referenced.intersection(run)]
        if ties:
            # Sessions equal on every indexed variable differ only in how refs name
            # them: try each order of the tied ones and keep the smallest state,
            # so the result is a true orbit representative (traces replay exactly).
            best: State | None = None
            options: list[dict[int, int]] = [dict(mapping)]
            for run in ties:
                slots = [mapping.get(s, s) for s in run]
                options = [{**m, **dict(zip(run, perm, strict=True))} for m in options
                           for perm in itertools.permutations(slots)]
            for m in options:
                cand = apply(st, {k: v for k, v in m.items() if k != v})
                if best is None or cand < best:
                    best = cand
            assert best is not None
            return best
        if not mapping:
            return st
        return apply(st, mapping)

    return canon
