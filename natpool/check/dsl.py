"""The expression language of ``spec/system.toml`` and ``spec/properties.toml``.

A small Python subset, parsed with :mod:`ast`, translated twice: to Python
source (compiled into the checker's closures) and to TLA+ (the exported
module). Both translations come from one AST, which is what makes the checker
and the TLA+ module equivalent by construction; anything outside the subset
is rejected when the spec is loaded, not silently mistranslated.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from natpool.spec.model import SpecError

PRIME_RE = re.compile(r"([A-Za-z_]\w*)'")
NEXT_PREFIX = "__next__"
HELPERS = frozenset({"implies", "len", "head", "tail", "append", "step", "can", "const", "upto", "all", "any", "sum"})
_CMP_PY: dict[type[ast.cmpop], str] = {
   ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_CMP_TLA: dict[type[ast.cmpop], str] = {
   ast.Eq: "=", ast.NotEq: "#", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_BIN_PY: dict[type[ast.operator], str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}
_BIN_TLA: dict[type[ast.operator], str] = {
   ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "\\div", ast.Mod: "%"}


def parse_expr(text: str, where: str) -> ast.expr:
    """Parse one expression; ``x'`` (next-state value) becomes ``__next__x``."""
    src = PRIME_RE.sub(NEXT_PREFIX + r"\1", " ".join(text.split()))
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        raise SpecError(f"{where}: cannot parse {text!r}: {exc.msg}") from exc
    _validate(tree.body, where)
    return tree.body


def parse_effect(text: str, where: str) -> list[tuple[str, list[ast.expr], ast.expr]]:
    """Parse assignment lines into ``(variable, index expressions, value)``."""
    out: list[tuple[str, list[ast.expr], ast.expr]] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            stmt = ast.parse(line, mode="exec").body[0]
        except SyntaxError as exc:
            raise SpecError(f"{where}: cannot parse {line!r}: {exc.msg}") from exc
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
            raise SpecError(f"{where}: expected `target = expression`, got {line!r}")
        target = stmt.targets[0]
        idx: list[ast.expr] = []
        while isinstance(target, ast.Subscript):
            idx.insert(0, target.slice)
            target = target.value
        if not isinstance(target, ast.Name):
            raise SpecError(f"{where}: bad assignment target in {line!r}")
        for e in (*idx, stmt.value):
            _validate(e, where)
        out.append((target.id, idx, stmt.value))
    return out


def _validate(node: ast.AST, where: str) -> None:
    ok = (ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.BinOp, ast.Compare, ast.IfExp,
          ast.Subscript, ast.Name, ast.Constant, ast.Tuple, ast.Call, ast.Attribute, ast.GeneratorExp,
          ast.comprehension, ast.Load, ast.Store, *_BIN_PY, *_CMP_PY, ast.In, ast.NotIn)
    for sub in ast.walk(node):
        if not isinstance(sub, ok):
            raise SpecError(f"{where}: {type(sub).__name__} is outside the spec expression language")
        if isinstance(sub, ast.Compare) and len(sub.ops) != 1:
            raise SpecError(f"{where}: chained comparisons are not allowed")
        if isinstance(sub, ast.Constant) and not isinstance(sub.value, int | str | bool):
            raise SpecError(f"{where}: constant {sub.value!r} is not an int, string or bool")
        if isinstance(sub, ast.Call) and (not isinstance(sub.func, ast.Name) or sub.keywords):
            raise SpecError(f"{where}: only calls of helpers and defines by name are allowed")
        if isinstance(sub, ast.Attribute) and not isinstance(sub.value, ast.Name):
            raise SpecError(f"{where}: attributes are only Machine.initial or Machine.<set>")
        if isinstance(sub, ast.comprehension) and (sub.is_async or not isinstance(sub.target, ast.Name)):
            raise SpecError(f"{where}: comprehensions bind one name")


@dataclass(frozen=True)
class Define:
    name: str
    params: tuple[str, ...]
    body: ast.expr
    why: str = ""


@dataclass
class Scope:
    """What the names in an expression refer to."""

    variables: tuple[str, ...]
    constants: Mapping[str, int | bool]
    domains: Iterable[str]
    defines: Mapping[str, Define]
    machines: Mapping[str, MachineInfo]
    locals: frozenset[str] = frozenset()


@dataclass(frozen=True)
class MachineInfo:
    """A (possibly mutated) transition table: ``(state, event) -> (target, guard)``."""

    name: str
    initial: str
    sets: Mapping[str, frozenset[str]]
    table: Mapping[tuple[str, str], tuple[str, str]]


def names_used(node: ast.AST) -> set[str]:
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
    return out


class _Subst(ast.NodeTransformer):
    def __init__(self, mapping: dict[str, ast.expr]) -> None:
        self.mapping = mapping

    def visit_Name(self, node: ast.Name) -> ast.expr:
        hit = self.mapping.get(node.id)
        return copy.deepcopy(hit) if hit is not None else node


def inline(node: ast.expr, defines: Mapping[str, Define], depth: int = 0) -> ast.expr:
    """Replace calls of defines by their bodies (arguments substituted)."""
    if depth > 40:
        raise SpecError("defines are recursive")

    class _Inline(ast.NodeTransformer):
        def visit_Call(self, call: ast.Call) -> ast.expr:
            self.generic_visit(call)
            assert isinstance(call.func, ast.Name)
            d = defines.get(call.func.id)
            if d is None:
                return call
            if len(call.args) != len(d.params):
                raise SpecError(f"{d.name} takes {len(d.params)} arguments, got {len(call.args)}")
            body = _Subst(dict(zip(d.params, call.args, strict=True))).visit(copy.deepcopy(d.body))
            return inline(body, defines, depth + 1)

    return _Inline().visit(copy.deepcopy(node))  # type: ignore[no-any-return]


def step_conditions(node: ast.expr, path: tuple[ast.expr, ...] = ()) -> list[ast.expr]:
    """For every ``step(M, x, e)`` reached under if-conditions ``path``: ``implies(path, can(M, x, e))``.

    These are added to an action's guard, so an action that needs a transition
    the table lacks is disabled instead of producing a bogus state.
    """
    out: list[ast.expr] = []
    if isinstance(node, ast.IfExp):
        out += step_conditions(node.test, path)
        out += step_conditions(node.body, (*path, node.test))
        out += step_conditions(node.orelse, (*path, ast.UnaryOp(op=ast.Not(), operand=node.test)))
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "step":
        for a in node.args:
            out += step_conditions(a, path)
        can = ast.Call(func=ast.Name(id="can", ctx=ast.Load()), args=copy.deepcopy(node.args), keywords=[])
        if path:
            cond = path[0] if len(path) == 1 else ast.BoolOp(op=ast.And(), values=list(path))
            out.append(ast.Call(func=ast.Name(id="implies", ctx=ast.Load()), args=[copy.deepcopy(cond), can],
                                keywords=[]))
        else:
            out.append(can)
        return out
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
            out += step_conditions(child, path)
    return out


def stepped_events(node: ast.AST) -> list[tuple[str, str]]:
    """``(machine, event)`` of every ``step``/``can`` call with literal arguments."""
    out = []
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "step"
                and len(sub.args) == 3 and isinstance(sub.args[0], ast.Name)
                and isinstance(sub.args[2], ast.Constant) and isinstance(sub.args[2].value, str)):
            out.append((sub.args[0].id, sub.args[2].value))
    return out


@dataclass
class Translator:
    """Translate validated expressions to Python source or TLA+ text."""

    scope: Scope
    tla: bool
    _fresh: list[int] = field(default_factory=lambda: [0])

    def fresh(self) -> str:
        self._fresh[0] += 1
        return f"x{self._fresh[0]}_"

    def expr(self, node: ast.expr, local: frozenset[str] = frozenset()) -> str:
        t = self.tla
        e = self.expr
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                return ("TRUE" if v else "FALSE") if t else repr(v)
            if isinstance(v, str):
                if '"' in v or "\\" in v:
                    raise SpecError(f"string {v!r} may not contain quotes or backslashes")
                return f'"{v}"'
            return str(v)
        if isinstance(node, ast.Name):
            return self._name(node.id, local)
        if isinstance(node, ast.Tuple):
            items = ", ".join(e(x, local) for x in node.elts)
            if t:
                return f"<<{items}>>"
            return f"({items},)" if node.elts else "()"
        if isinstance(node, ast.BoolOp):
            op = (" /\\ " if isinstance(node.op, ast.And) else " \\/ ") if t else (
                " and " if isinstance(node.op, ast.And) else " or ")
            return "(" + op.join(e(v, local) for v in node.values) + ")"
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return f"~({e(node.operand, local)})" if t else f"(not {e(node.operand, local)})"
            return f"(-{e(node.operand, local)})"
        if isinstance(node, ast.BinOp):
            table = _BIN_TLA if t else _BIN_PY
            return f"({e(node.left, local)} {table[type(node.op)]} {e(node.right, local)})"
        if isinstance(node, ast.Compare):
            cop, right = node.ops[0], node.comparators[0]
            if isinstance(cop, ast.In | ast.NotIn):
                neg = isinstance(cop, ast.NotIn)
                rhs = self._set(right, local)
                if t:
                    op_txt = "\\notin" if neg else "\\in"
                    return f"({e(node.left, local)} {op_txt} {rhs})"
                return f"({e(node.left, local)} {'not in' if neg else 'in'} {rhs})"
            ctable = _CMP_TLA if t else _CMP_PY
            return f"({e(node.left, local)} {ctable[type(cop)]} {e(right, local)})"
        if isinstance(node, ast.IfExp):
            if t:
                return f"(IF {e(node.test, local)} THEN {e(node.body, local)} ELSE {e(node.orelse, local)})"
            return f"({e(node.body, local)} if {e(node.test, local)} else {e(node.orelse, local)})"
        if isinstance(node, ast.Subscript):
            return f"{e(node.value, local)}[{e(node.slice, local)}]"
        if isinstance(node, ast.Attribute):
            return self._attr(node)
        if isinstance(node, ast.Call):
            return self._call(node, local)
        raise SpecError(f"unsupported expression {ast.dump(node)}")

    def _name(self, name: str, local: frozenset[str]) -> str:
        sc = self.scope
        if name in local or name in sc.locals:
            return name if self.tla else f"L_{name}"
        if name.startswith(NEXT_PREFIX):
            base = name[len(NEXT_PREFIX):]
            if base not in sc.variables:
                raise SpecError(f"{base}' is not a variable")
            return f"{base}'" if self.tla else f"x_{base}"
        if name in sc.variables:
            return name if self.tla else f"v_{name}"
        if name in sc.constants:
            return name if self.tla else repr(sc.constants[name])
        if name in set(sc.domains):
            return name if self.tla else f"D_{name}"
        raise SpecError(f"unknown name {name!r}")

    def _attr(self, node: ast.Attribute) -> str:
        assert isinstance(node.value, ast.Name)
        m = self.scope.machines.get(node.value.id)
        if m is None:
            raise SpecError(f"{node.value.id} is not a machine")
        if node.attr == "initial":
            return f'"{m.initial}"'
        if node.attr not in m.sets:
            raise SpecError(f"{m.name} has no state set {node.attr!r}")
        return f"{m.name}_{node.attr}" if self.tla else f"SET_{m.name}_{node.attr}"

    def _set(self, node: ast.expr, local: frozenset[str]) -> str:
        if isinstance(node, ast.Tuple):
            items = ", ".join(self.expr(x, local) for x in node.elts)
            return "{" + items + "}" if self.tla else f"({items},)"
        return self.expr(node, local)

    def _machine(self, node: ast.expr) -> str:
        if not isinstance(node, ast.Name) or node.id not in self.scope.machines:
            raise SpecError("step/can take a machine name first")
        return node.id

    def _call(self, node: ast.Call, local: frozenset[str]) -> str:
        assert isinstance(node.func, ast.Name)
        f, a, t, e = node.func.id, node.args, self.tla, self.expr
        if f in self.scope.defines:
            if not t:
                raise SpecError(f"define {f} must be inlined before translation to Python")
            return f"{f}(" + ", ".join(e(x, local) for x in a) + ")"
        if f not in HELPERS:
            raise SpecError(f"unknown function {f!r}")
        if f in ("all", "any", "sum"):
            return self._quant(f, a, local)
        args = [self._machine(a[0])] + [e(x, local) for x in a[1:]] if f in ("step", "can") else (
            [e(x, local) for x in a] if f != "const" else [])
        if f == "implies":
            return f"(({args[0]}) => ({args[1]}))" if t else f"((not {args[0]}) or {args[1]})"
        if f == "len":
            return f"Len({args[0]})" if t else f"len({args[0]})"
        if f == "head":
            return f"Head({args[0]})" if t else f"{args[0]}[0]"
        if f == "tail":
            return f"Tail({args[0]})" if t else f"{args[0]}[1:]"
        if f == "append":
            return f"Append({args[0]}, {args[1]})" if t else f"({args[0]} + ({args[1]},))"
        if f == "step":
            return f"{args[0]}_step({args[1]}, {args[2]})" if t else f"TB_{args[0]}[({args[1]}, {args[2]})][0]"
        if f == "can":
            return f"{args[0]}_can({args[1]}, {args[2]})" if t else f"(({args[1]}, {args[2]}) in TB_{args[0]})"
        if f == "upto":
            return f"({args[0]})..({args[1]})" if t else f"tuple(range({args[0]}, {args[1]} + 1))"
        if f == "const":
            dom, val = e(a[0], local), e(a[1], local)
            if t:
                return f"[{self.fresh()} \\in {dom} |-> {val}]"
            return f"(({val},) * len({dom}))"
        raise SpecError(f"unsupported call {f}")

    def _quant(self, f: str, a: list[ast.expr], local: frozenset[str]) -> str:
        if len(a) != 1 or not isinstance(a[0], ast.GeneratorExp) or len(a[0].generators) != 1:
            raise SpecError(f"{f}() takes one generator expression `e for x in D [if c]`")
        g = a[0]
        comp = g.generators[0]
        assert isinstance(comp.target, ast.Name)
        var = comp.target.id
        if var in local or var in self.scope.locals:
            # also catches capture after a define is inlined into an action binding the same name
            raise SpecError(f"{f}(): {var!r} is already bound here; use another name")
        inner = local | {var}
        dom = self.expr(comp.iter, local)
        conds = [self.expr(c, inner) for c in comp.ifs]
        body = self.expr(g.elt, inner)
        if f == "sum" and not (isinstance(g.elt, ast.Constant) and g.elt.value == 1):
            raise SpecError("sum() only counts: sum(1 for x in D if c)")
        if self.tla:
            cond = " /\\ ".join(f"({c})" for c in conds)
            if f == "all":
                pre = f"({cond}) => " if conds else ""
                return f"(\\A {var} \\in {dom} : {pre}{body})"
            if f == "any":
                pre = cond + " /\\ " if conds else ""
                return f"(\\E {var} \\in {dom} : {pre}{body})"
            return f"Cardinality({{{var} \\in {dom} : {cond or 'TRUE'}}})"
        ifs = "".join(f" if {c}" for c in conds)
        return f"{f}({body} for L_{var} in {dom}{ifs})"
