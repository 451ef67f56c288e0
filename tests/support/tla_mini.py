"""A tiny TLA+ interpreter for the subset `natpool spec generate` emits (test helper, not a TLC).

TLC is not installable here, so this evaluates the generated module's Init,
Next and invariants straight from the `tla` package's syntax tree: the tests
then compare its state graph with the one `natpool check` explores. It is an
independent path (TLA+ text -> parser -> this evaluator) to the same states,
so a translation bug in either direction shows up as a difference.

Values: ints, bools, strings, frozensets, ``Fn`` (a function on 0..n-1, a
tuple) and ``Seq`` (a TLA+ sequence, 1-indexed, a tuple); both compare equal
to the checker's plain tuples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tla  # type: ignore[import-untyped]


class Fn(tuple):  # type: ignore[type-arg]
    """A function with domain 0..n-1 (plain tuples from the checker are read the same way)."""


class Seq(tuple):  # type: ignore[type-arg]
    """A TLA+ sequence (1-indexed)."""


State = dict[str, Any]
Env = dict[str, Any]


class Module:
    def __init__(self, text: str, constants: dict[str, Any]) -> None:
        tree = tla.parse(text)
        self.defs: dict[str, tuple[list[str], Any]] = {}
        self.variables: list[str] = []
        self.constants = constants
        for unit in tree.units:
            kind = type(unit).__name__
            if kind == "Variables":
                self.variables += [n.operator for n in unit.names]
            elif kind == "OperatorDefinition":
                params = [a.operator for a in unit.arity] if unit.arity else []
                self.defs[unit.name] = (params, unit.definiens)

    # ------------------------------------------------------------ expressions
    def ev(self, node: Any, env: Env, st: State) -> Any:
        kind = type(node).__name__
        if kind == "Parentheses":
            return self.ev(node.expression, env, st)
        if kind == "IntegralNumeral":
            return int(node.value)
        if kind == "StringLiteral":
            return node.value[1:-1]
        if kind == "BooleanLiteral":
            return node.value == "TRUE"
        if kind == "Tuple":
            return Seq(self.ev(x, env, st) for x in node.items)
        if kind == "SetEnumeration":
            return frozenset(self.ev(x, env, st) for x in node.items)
        if kind == "If":
            return self.ev(node.then if self.ev(node.predicate, env, st) else node.else_, env, st)
        if kind == "Cases":
            for item in node.cases:
                if self.ev(item.predicate, env, st):
                    return self.ev(item.expression, env, st)
            raise ValueError("CASE: no arm matched")
        if kind == "Let":
            inner = dict(env)
            for d in node.definitions:
                inner[d.name] = self.ev(d.definiens, inner, st)
            return self.ev(node.expression, inner, st)
        if kind == "FunctionApplication":
            f = self.ev(node.function, env, st)
            (arg,) = node.arguments
            k = self.ev(arg, env, st)
            return f[k - 1] if isinstance(f, Seq) else f[k]
        if kind == "Function":
            (decl,) = node.declaration
            name, dom = decl.arguments[0].operator, sorted(self.ev(decl.arguments[1], env, st))
            assert dom == list(range(len(dom))), "functions are on 0..n-1 here"
            return Fn(self.ev(node.value, {**env, name: x}, st) for x in dom)
        if kind == "Except":
            f = self.ev(node.function, env, st)
            for ch in node.changes:
                path = [self.ev(sel[0], env, st) for sel in ch.item]
                f = self._update(f, path, self.ev(ch.expression, env, st))
            return f
        if kind == "Quantification":
            binds = self._bindings(node.declarations, env, st)
            results = (self.ev(node.predicate, b, st) for b in binds)
            return all(results) if node.quantifier == "\\A" else any(results)
        if kind == "SetSlice":
            decl = node.declaration
            name = decl.arguments[0].operator
            return frozenset(x for x in self.ev(decl.arguments[1], env, st)
                             if self.ev(node.predicate, {**env, name: x}, st))
        if kind == "VerticalList":
            vals = (self.ev(i.expression, env, st) for i in node.arguments)
            return all(vals) if node.operator == "/\\" else any(vals)
        if kind == "OperatorApplication":
            return self._apply(node, env, st)
        raise ValueError(f"unsupported TLA+ node {kind}")

    def _update(self, f: Any, path: list[Any], value: Any) -> Any:
        k = path[0] - 1 if isinstance(f, Seq) else path[0]
        inner = value if len(path) == 1 else self._update(f[k], path[1:], value)
        return type(f)((*f[:k], inner, *f[k + 1:]))

    def _bindings(self, decls: list[Any], env: Env, st: State) -> list[Env]:
        out = [env]
        for d in decls:
            name = d.arguments[0].operator
            out = [{**b, name: x} for b in out for x in sorted(self.ev(d.arguments[1], b, st))]
        return out

    def _apply(self, node: Any, env: Env, st: State) -> Any:
        op, args = node.operator, node.arguments
        if args is None:
            if op in env:
                return env[op]
            if op in st:
                return st[op]
            if op in self.constants:
                return self.constants[op]
            params, body = self.defs[op]
            assert not params
            return self.ev(body, {}, st)
        bin_ops: dict[str, Callable[[Any, Any], Any]] = {
            "=": lambda a, b: a == b, "#": lambda a, b: a != b, "<": lambda a, b: a < b,
            ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
            "+": lambda a, b: a + b, "%": lambda a, b: a % b, "\\div": lambda a, b: a // b,
            "..": lambda a, b: frozenset(range(a, b + 1)), "\\in": lambda a, b: a in b,
            "\\notin": lambda a, b: a not in b,
        }
        if op == "-":
            vals = [self.ev(a, env, st) for a in args]
            return -vals[0] if len(vals) == 1 else vals[0] - vals[1]
        if op in bin_ops:
            return bin_ops[op](self.ev(args[0], env, st), self.ev(args[1], env, st))
        if op == "/\\":
            return all(self.ev(a, env, st) for a in args)
        if op == "\\/":
            return any(self.ev(a, env, st) for a in args)
        if op == "=>":
            return (not self.ev(args[0], env, st)) or self.ev(args[1], env, st)
        if op == "~":
            return not self.ev(args[0], env, st)
        if op == "'":
            return st["'" + args[0].operator]
        if op == "Len":
            return len(self.ev(args[0], env, st))
        if op == "Head":
            return self.ev(args[0], env, st)[0]
        if op == "Tail":
            return Seq(self.ev(args[0], env, st)[1:])
        if op == "Append":
            return Seq((*self.ev(args[0], env, st), self.ev(args[1], env, st)))
        if op == "Cardinality":
            return len(self.ev(args[0], env, st))
        params, body = self.defs[op]
        return self.ev(body, dict(zip(params, (self.ev(a, env, st) for a in args), strict=True)), st)

    # ------------------------------------------------------------ actions
    def init(self) -> list[State]:
        _, body = self.defs["Init"]
        st: State = {}
        for item in body.arguments:
            eq = item.expression
            st[eq.arguments[0].operator] = self.ev(eq.arguments[1], {}, st)
        return [st]

    def next(self, st: State) -> list[State]:
        _, body = self.defs["Next"]
        out = []
        for partial in self._act(body, {}, st, {}):
            assert set(partial) == set(self.variables), f"unassigned: {set(self.variables) - set(partial)}"
            out.append(partial)
        return out

    def _act(self, node: Any, env: Env, st: State, nx: State) -> list[State]:
        kind = type(node).__name__
        if kind == "Parentheses":
            return self._act(node.expression, env, st, nx)
        if kind == "VerticalList" or (kind == "OperatorApplication" and node.operator in ("/\\", "\\/")
                                      and node.arguments is not None):
            items = [i.expression for i in node.arguments] if kind == "VerticalList" else node.arguments
            if node.operator == "\\/":
                return [r for i in items for r in self._act(i, env, st, nx)]
            results = [nx]
            for i in items:
                results = [r2 for r in results for r2 in self._act(i, env, st, r)]
            return results
        if kind == "Quantification" and node.quantifier == "\\E":
            return [r for b in self._bindings(node.declarations, env, st) for r in self._act(node.predicate, b, st, nx)]
        if kind == "Let":
            inner = dict(env)
            for d in node.definitions:
                inner[d.name] = self.ev(d.definiens, inner, st)
            return self._act(node.expression, inner, st, nx)
        if kind == "OperatorApplication":
            op, args = node.operator, node.arguments
            if op == "UNCHANGED":
                target = args[0]
                names = ([x.operator for x in target.items] if type(target).__name__ == "Tuple"
                         else [x.operator for x in self.defs[target.operator][1].items])
                return self._assign(nx, {n: st[n] for n in names})
            if op == "=" and type(args[0]).__name__ == "OperatorApplication" and args[0].operator == "'":
                var = args[0].arguments[0].operator
                return self._assign(nx, {var: self.ev(args[1], env, st)})
            if args is not None and op in self.defs and op.startswith("A_"):
                params, body = self.defs[op]
                return self._act(body, dict(zip(params, (self.ev(a, env, st) for a in args), strict=True)), st, nx)
            if args is None and op in self.defs and op not in env:
                params, body = self.defs[op]
                if not params and op != "Terminal":
                    return self._act(body, env, st, nx)
        return [nx] if self.ev(node, env, st) else []

    @staticmethod
    def _assign(nx: State, values: State) -> list[State]:
        out = dict(nx)
        for k, v in values.items():
            if k in out and out[k] != v:
                return []
            out[k] = v
        return [out]

    def holds(self, name: str, st: State) -> bool:
        params, body = self.defs[name]
        assert not params
        return bool(self.ev(body, {}, st))


def explore(mod: Module) -> tuple[set[tuple[Any, ...]], dict[tuple[Any, ...], set[tuple[Any, ...]]]]:
    """All reachable states (as tuples in variable order) and the successor sets (stutters removed)."""
    def key(s: State) -> tuple[Any, ...]:
        return tuple(s[v] for v in mod.variables)

    init = mod.init()
    seen = {key(s): s for s in init}
    graph: dict[tuple[Any, ...], set[tuple[Any, ...]]] = {}
    frontier = list(init)
    while frontier:
        nxt = []
        for s in frontier:
            k = key(s)
            succ = set()
            for t in mod.next(s):
                tk = key(t)
                if tk == k:
                    continue
                succ.add(tk)
                if tk not in seen:
                    seen[tk] = t
                    nxt.append(t)
            graph[k] = succ
        frontier = nxt
    return set(seen), graph
