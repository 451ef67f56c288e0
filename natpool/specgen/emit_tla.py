"""TLA+ export: one module for the system model plus a TLC ``.cfg`` per model.

Generated from the same parsed declarations ``natpool check`` compiles
(spec/system.toml, spec/properties.toml, the machine tables), through the same
expression translator, so Init, Next, fairness and properties are those the
checker explores. Without reductions TLC should find the same number of
distinct states (the state is exactly the declared variables). Mutants are
checker-only and not exported.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

from natpool.check.compile import action_guard
from natpool.check.dsl import Define, Scope, Translator, names_used
from natpool.check.system import Action, Model, Property, System, list_models, load_model, load_system
from natpool.spec.model import MachineSpec, SpecError

MODULE = "NatpoolHandover"
FORALL = "\\A"
TLA_DIR = ("spec", "tla")


def _scope(system: System, local: frozenset[str] = frozenset()) -> Scope:
    consts: dict[str, int | bool] = {k: (False if c.type == "bool" else 0) for k, c in system.constants.items()}
    return Scope(variables=tuple(system.variables), constants=consts, domains=tuple(system.domains),
                 defines=system.defines, machines=system.machines, locals=local)


def _tla(system: System, node: ast.expr, local: frozenset[str] = frozenset()) -> str:
    return Translator(_scope(system, local), tla=True).expr(node)


def _quant(params: tuple[tuple[str, str], ...], kind: str = "\\E") -> str:
    return f"{kind} " + ", ".join(f"{p} \\in {d}" for p, d in params) + " : " if params else ""


def _call(name: str, params: tuple[tuple[str, str], ...]) -> str:
    return f"{name}({', '.join(p for p, _ in params)})" if params else name


def action_op(a: Action) -> str:
    return f"A_{a.name}"


def property_ops(p: Property) -> dict[str, str]:
    """TLA+ operator name per kind: the invariant keeps the property's name."""
    out = {}
    if p.invariant is not None:
        out["invariant"] = p.name
    if p.action is not None:
        out["action"] = p.name + ("Step" if p.invariant is not None else "")
    if p.stuck is not None:
        out["stuck"] = p.name
    return out


def _action(system: System, a: Action) -> list[str]:
    local = frozenset(p for p, _ in a.params) | frozenset(n for n, _ in a.lets)
    head = f"{_call(action_op(a), a.params)} =="
    lines = [f"\\* {a.name}: {' '.join(a.why.split())}" if a.why else f"\\* {a.name}", head]
    ind = "    "
    if a.lets:
        for k, (n, e) in enumerate(a.lets):
            lines.append(f"{ind}{'LET ' if k == 0 else '    '}{n} == {_tla(system, e, local)}")
        lines.append(f"{ind}IN")
    conj = [_tla(system, action_guard(a, system.defines), local)]
    by_var: dict[str, list[tuple[list[ast.expr], ast.expr]]] = {}
    for var, idx, val in a.effect:
        by_var.setdefault(var, []).append((idx, val))
    for var, assigns in by_var.items():
        if any(not idx for idx, _ in assigns):
            if len(assigns) != 1:
                raise SpecError(f"action {a.name}: {var} assigned whole and in part")
            conj.append(f"{var}' = {_tla(system, assigns[0][1], local)}")
            continue
        clauses = []
        for idx, val in assigns:
            path = "".join(f"[{_tla(system, x, local)}]" for x in idx)
            clauses.append(f"!{path} = {_tla(system, val, local)}")
        conj.append(f"{var}' = [{var} EXCEPT {', '.join(clauses)}]")
    unchanged = [v for v in system.variables if v not in by_var]
    if unchanged:
        conj.append(f"UNCHANGED <<{', '.join(unchanged)}>>")
    lines += [f"{ind}/\\ {c}" for c in conj]
    return lines


def _machines(system: System) -> list[str]:
    lines = ["\\* ---- machine tables (spec/entry.toml, spec/initiator.toml, spec/responder.toml)"]
    for m in system.machines.values():
        pairs = ", ".join(f'<<"{s}", "{e}">>' for (s, e) in m.table)
        lines.append(f"{m.name}_can(s, e) == <<s, e>> \\in {{{pairs}}}")
        cases = "\n    [] ".join(f'(s = "{s}" /\\ e = "{e}") -> "{t}"' for (s, e), (t, _) in m.table.items())
        lines.append(f"{m.name}_step(s, e) ==\n    CASE {cases}")
        for sname, states in sorted(m.sets.items()):
            members = ", ".join(f'"{x}"' for x in sorted(states))
            lines.append(f"{m.name}_{sname} == {{{members}}}")
        lines.append("")
    return lines


def _define_order(system: System) -> list[Define]:
    """Defines in spec order, except that TLA+ needs every operator defined before its first use."""
    done: dict[str, Define] = {}

    def visit(d: Define, path: tuple[str, ...]) -> None:
        if d.name in done:
            return
        if d.name in path:
            raise SpecError(f"defines are recursive: {' -> '.join((*path, d.name))}")
        for used in sorted(names_used(d.body)):
            if used in system.defines and used != d.name:
                visit(system.defines[used], (*path, d.name))
        done[d.name] = d

    for d in system.defines.values():
        visit(d, ())
    return list(done.values())


def _check_names(system: System) -> None:
    """TLA+ forbids a parameter or bound name that is also a module-level name."""
    globals_ = (set(system.variables) | set(system.constants) | set(system.defines) | set(system.domains)
                | {action_op(a) for a in system.actions} | {n for p in system.properties
                                                            for n in property_ops(p).values()})
    locals_: list[tuple[str, set[str]]] = [(f"define {d.name}", set(d.params)) for d in system.defines.values()]
    locals_ += [(f"action {a.name}", {p for p, _ in a.params} | {n for n, _ in a.lets}) for a in system.actions]
    locals_ += [(f"property {p.name}", {n for n, _ in p.params}) for p in system.properties]
    for where, names in locals_:
        clash = names & globals_
        if clash:
            raise SpecError(f"{where}: names {sorted(clash)} clash with module-level TLA+ names")


def emit_module(system: System) -> str:
    _check_names(system)
    out = [f"{'-' * 28} MODULE {MODULE} {'-' * 28}",
           "(* GENERATED by `natpool spec generate` from spec/system.toml, spec/properties.toml and the machine",
           "   tables of spec/*.toml. DO NOT EDIT. `natpool check` explores the same Init/Next/fairness.",
           "   It carries the adversary too: CONSTANT adversary (forged and replayed keepalive frames and signals,",
           "   R rogue sessions, the no_inbound_timeout timer) and CONSTANT auth (MAC, ping ids once, fresh signals,",
           "   peer binding); `natpool check --tlc JAR` runs TLC on it and compares. *)",
           "EXTENDS Integers, Sequences, FiniteSets, TLC", ""]
    for c in system.constants.values():
        out.append(f"CONSTANT {c.name}  \\* {c.type}: {c.doc}")
    out.append("")
    for v, (_, doc) in system.variables.items():
        out.append(f"VARIABLE {v}  \\* {doc}")
    out += [f"vars == <<{', '.join(system.variables)}>>", ""]
    out += _machines(system)
    out.append("\\* ---- domains")
    for dname, dexpr in system.domains.items():
        out.append(f"{dname} == {_tla(system, dexpr)}")
    out += ["", "\\* ---- defines"]
    for d in _define_order(system):
        head = f"{d.name}({', '.join(d.params)})" if d.params else d.name
        out.append(f"{head} == {_tla(system, d.body, frozenset(d.params))}")
    out += ["", "Init =="]
    out += [f"    /\\ {v} = {_tla(system, e)}" for v, (e, _) in system.variables.items()]
    out += ["", f"Terminal == {_tla(system, system.terminal)}", ""]
    for a in system.actions:
        out += _action(system, a)
        out.append("")
    out.append("Next ==")
    for a in system.actions:
        out.append(f"    \\/ {_quant(a.params)}{_call(action_op(a), a.params)}")
    out.append("    \\/ (Terminal /\\ UNCHANGED vars)  \\* accepted end states are not deadlocks")
    out += ["", "Fairness =="]
    fair = [a for a in system.actions if a.is_fair]
    for a in fair:
        outer = tuple((p, d) for p, d in a.params if p in a.fair)
        inner = tuple((p, d) for p, d in a.params if p not in a.fair)
        out.append(f"    /\\ {_quant(outer, FORALL)}WF_vars({_quant(inner)}{_call(action_op(a), a.params)})")
    if not fair:
        out.append("    TRUE")
    out += ["", "Spec == Init /\\ [][Next]_vars /\\ Fairness", "", "\\* ---- properties (spec/properties.toml)"]
    for p in system.properties:
        ops = property_ops(p)
        local = frozenset(n for n, _ in p.params)
        out.append(f"\\* {p.name}: {' '.join(p.why.split())}")
        if p.invariant is not None:
            out.append(f"{ops['invariant']} == {_quant(p.params, FORALL)}{_tla(system, p.invariant, local)}")
        if p.action is not None:
            out.append(f"{ops['action']} == [][{_quant(p.params, FORALL)}{_tla(system, p.action, local)}]_vars")
        if p.stuck is not None:
            out.append(f"{ops['stuck']} == {_quant(p.params, FORALL)}[]<>(~({_tla(system, p.stuck, local)}))")
        out.append("")
    out.append("=" * 78)
    return "\n".join(out) + "\n"


def _applies(system: System, p: Property, model: Model) -> bool:
    if p.when is None:
        return True
    scope = Scope(variables=(), constants=model.constants, domains=(), defines={}, machines=system.machines)
    return bool(eval(Translator(scope, tla=False).expr(p.when), {}))  # noqa: S307 - validated spec subset


def emit_cfg(system: System, model: Model) -> str:
    out = [f"\\* GENERATED by `natpool spec generate`: TLC configuration of models/{model.name}.toml. DO NOT EDIT.",
           f"\\* {model.doc}"]
    if model.expect:
        out.append(f"\\* EXPECTED TO FAIL (a deliberately broken assumption): {', '.join(model.expect)}")
    if model.constants.get("adversary"):
        auth = "on" if model.constants.get("auth") else "OFF (legacy: the attacks succeed)"
        out.append(f"\\* ADVERSARY: forges and replays keepalive frames and signals; authentication {auth}")
    out.append("CONSTANTS")
    for k, v in model.constants.items():
        out.append(f"    {k} = {('TRUE' if v else 'FALSE') if isinstance(v, bool) else v}")
    out += ["SPECIFICATION Spec"]
    inv = []
    props = []
    for p in system.properties:
        if not _applies(system, p, model):
            continue
        ops = property_ops(p)
        if "invariant" in ops:
            inv.append(ops["invariant"])
        props += [ops[k] for k in ("action", "stuck") if k in ops]
    if inv:
        out.append("INVARIANTS " + " ".join(inv))
    if props:
        out.append("PROPERTIES " + " ".join(props))
    out.append("CHECK_DEADLOCK TRUE")
    return "\n".join(out) + "\n"


def tla_outputs(root: Path, machines: Mapping[str, MachineSpec]) -> dict[Path, str]:
    """Hook called by natpool.specgen.generate: the module and one .cfg per models/*.toml."""
    spec = root / "spec"
    if not (spec / "system.toml").exists():
        return {}
    system = load_system(spec, machines)
    base = root.joinpath(*TLA_DIR)
    out = {base / f"{MODULE}.tla": emit_module(system)}
    for path in list_models(None, root / "models"):
        model = load_model(path, system)
        out[base / f"{model.name}.cfg"] = emit_cfg(system, model)
    return out
