"""Explicit-state search: BFS, invariants, action properties, deadlocks, fair-cycle liveness.

BFS makes every safety counterexample a shortest one. States are plain
tuples, deduplicated in a dict. Liveness uses the stored graph: for each
``stuck`` property instance, the strongly connected components of the
subgraph of stuck states are computed (iterative Tarjan); a component is a
counterexample iff every weakly fair action instance that is enabled in all
of its states is also taken on one of its internal edges (a fair behaviour can
then loop there forever), or a stuck state enables no fair action at all (the
behaviour may stutter there). This is the standard sound and complete check
for weak fairness (justice) on a finite graph. Liveness is only checked
without symmetry reduction (fairness labels are not permutation-invariant).
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from natpool.check.compile import Compiled, State, Succ


@dataclass
class Violation:
    prop: str
    kind: str  # invariant | action | deadlock | liveness
    instance: dict[str, Any]
    path: list[int]  # state ids from init
    loop_start: int | None = None  # index in path where the lasso's cycle starts (liveness)
    detail: str = ""


@dataclass
class Result:
    model: str
    states: int = 0
    transitions: int = 0
    depth: int = 0
    seconds: float = 0.0
    verdicts: dict[str, str] = field(default_factory=dict)  # property -> ok | FAIL | skip | n/a
    violations: list[Violation] = field(default_factory=list)
    complete: bool = True
    reduced: bool = False
    liveness_checked: bool = False

    @property
    def rate(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else float(self.states)


class Search:
    """One exploration of a compiled model; keeps the graph for traces and liveness."""

    def __init__(self, cs: Compiled, liveness: bool = True, max_states: int = 0,
                 progress: TextIO | None = sys.stderr, progress_every: float = 2.0, keep_going: bool = False) -> None:
        """By default the search stops at the first violation (enough to know a mutant is caught); the
        verdicts of the properties not yet violated are then ``partial``, as after ``max_states``. With
        ``keep_going`` (what ``natpool check`` does) it searches on without the violated property, so every
        other property gets a verdict over the whole state space."""
        self.cs = cs
        self.keep_going = keep_going
        self.liveness = liveness and bool(cs.stuck)
        self.max_states = max_states
        self.progress = progress
        self.progress_every = progress_every
        self.states: list[State] = []
        self.index: dict[State, int] = {}
        self.parent = array("i")
        self.plabel: list[tuple[int, tuple[Any, ...]] | None] = []
        self.depth = array("i")
        # graph (liveness only)
        self.off = array("q", [0])
        self.succ = array("i")
        self.grp = array("i")
        self.enabled: list[int] = []
        self.groups: dict[tuple[int, tuple[Any, ...]], int] = {}

    def group_of(self, aid: int, params: tuple[Any, ...]) -> int:
        pos = self.cs.fair_positions[aid]
        if pos is None:
            return -1
        key = (aid, tuple(params[k] for k in pos))
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = len(self.groups)
        return g

    def path_to(self, sid: int) -> list[int]:
        out = []
        while sid >= 0:
            out.append(sid)
            sid = self.parent[sid]
        return out[::-1]

    def _add(self, st: State, parent: int, label: tuple[int, tuple[Any, ...]] | None, depth: int) -> tuple[int, bool]:
        sid = self.index.get(st)
        if sid is not None:
            return sid, False
        sid = len(self.states)
        self.index[st] = sid
        self.states.append(st)
        self.parent.append(parent)
        self.plabel.append(label)
        self.depth.append(depth)
        return sid, True

    def run(self) -> Result:
        cs = self.cs
        res = Result(model=cs.model.name, reduced=cs.canon is not None)
        for p in cs.system.properties:
            res.verdicts[p.name] = "skip" if p.name in cs.skipped else "ok"
        res.verdicts["Deadlock"] = "ok"
        t0 = time.monotonic()
        last = t0
        canon = cs.canon
        actions = cs.actions
        invariants = cs.invariants
        aprops = cs.action_props
        terminal = cs.terminal
        live = self.liveness
        init = canon(cs.init) if canon else cs.init
        self._add(init, -1, None, 0)
        stop = False

        def fail(prop: str, kind: str, inst: tuple[Any, ...], sid: int, names: tuple[str, ...], detail: str = "",
                 extra: int | None = None) -> None:
            path = self.path_to(sid)
            if extra is not None:
                path.append(extra)
            res.verdicts[prop] = "FAIL"
            res.violations.append(Violation(prop, kind, dict(zip(names, inst, strict=False)), path, None, detail))

        # With keep_going, a violated property is dropped from the checks (its first, shortest counterexample
        # is kept) and the search goes on, so every other property gets a verdict over the whole state space.
        inv_live = list(invariants)
        act_live = list(aprops)
        check_deadlock = True
        keep = self.keep_going

        def drop(names: set[str]) -> None:
            nonlocal stop
            if not keep:
                stop = True
            inv_live[:] = [x for x in inv_live if x[0].name not in names]
            act_live[:] = [x for x in act_live if x[0].name not in names]

        failed: set[str] = set()
        for p, fn in inv_live:
            bad = fn(init)
            if bad is not None:
                fail(p.name, "invariant", bad, 0, tuple(n for n, _ in p.params))
                failed.add(p.name)
        if failed:
            drop(failed)
        i = 0
        transitions = 0
        while i < len(self.states) and not stop:
            st = self.states[i]
            d = self.depth[i] + 1
            out: list[Succ] = []
            for f in actions:
                f(st, out)
            mask = 0
            nonstutter = 0
            for aid, params, nx in out:
                if nx == st:
                    continue
                nonstutter += 1
                transitions += 1
                key = canon(nx) if canon else nx
                sid, new = self._add(key, i, (aid, params), d)
                failed = set()
                for p, afn in act_live:
                    bad = afn(st, nx)
                    if bad is not None:
                        fail(p.name, "action", bad, i, tuple(n for n, _ in p.params),
                             detail=f"violated by the step {cs.action_names[aid]}", extra=sid)
                        failed.add(p.name)
                if new:
                    for p, fn in inv_live:
                        if p.name in failed:
                            continue
                        bad = fn(key)
                        if bad is not None:
                            fail(p.name, "invariant", bad, sid, tuple(n for n, _ in p.params))
                            failed.add(p.name)
                if failed:
                    drop(failed)
                    if stop:
                        break
                if live:
                    g = self.group_of(aid, params)
                    self.succ.append(sid)
                    self.grp.append(g)
                    if g >= 0:
                        mask |= 1 << g
            if live:
                self.off.append(len(self.succ))
                self.enabled.append(mask)
            if nonstutter == 0 and check_deadlock and not stop and not terminal(st):
                fail("Deadlock", "deadlock", (), i, ())
                check_deadlock = False
                stop = not keep
            i += 1
            if self.max_states and len(self.states) >= self.max_states:
                res.complete = False
                break
            if self.progress is not None and i % 512 == 0:
                now = time.monotonic()
                if now - last >= self.progress_every:
                    last = now
                    n = len(self.states)
                    print(f"  [{cs.model.name}] {n} states, {n / (now - t0):,.0f} states/s, "
                          f"queue {n - i}, depth {self.depth[i - 1]}", file=self.progress, flush=True)
        res.states = len(self.states)
        res.transitions = transitions
        res.depth = max(self.depth) if self.depth else 0
        if not stop and res.complete and live:
            res.liveness_checked = True
            self._liveness(res)
        elif cs.stuck:
            # Liveness was not checked: by request (n/a), or because the search stopped early (partial).
            unchecked = "partial" if self.liveness and (stop or not res.complete) else "n/a"
            for p, _, _ in cs.stuck:
                if res.verdicts.get(p.name) == "ok":
                    res.verdicts[p.name] = unchecked
        if stop or not res.complete:
            # Only part of the state space was searched: "ok" would claim more than was shown.
            for k, v in res.verdicts.items():
                if v == "ok":
                    res.verdicts[k] = "partial"
        res.seconds = time.monotonic() - t0
        return res

    # ------------------------------------------------------------ liveness
    def _liveness(self, res: Result) -> None:
        n = len(self.states)
        for p, insts, fn in self.cs.stuck:
            if res.verdicts.get(p.name) == "FAIL":  # already violated by a safety part: one counterexample each
                continue
            flags = [fn(st) for st in self.states]
            for k, inst in enumerate(insts):
                stuck = bytearray(1 if flags[s][k] else 0 for s in range(n))
                if not any(stuck):
                    continue
                v = self._fair_scc(stuck)
                if v is not None:
                    path, loop_start, detail = v
                    res.verdicts[p.name] = "FAIL"
                    res.violations.append(Violation(p.name, "liveness",
                                                    dict(zip([x for x, _ in p.params], inst, strict=True)),
                                                    path, loop_start, detail))
                    break

    def _fair_scc(self, stuck: bytearray) -> tuple[list[int], int, str] | None:
        """Find a fair lasso inside ``stuck`` states; return (path, loop start, description)."""
        enabled = self.enabled
        off, succ = self.off, self.succ
        n = len(self.states)
        # a stuck state where no fair action is enabled: the behaviour may stutter forever
        best: tuple[list[int], int, str] | None = None
        for s in range(n):
            if stuck[s] and enabled[s] == 0:
                path = self.path_to(s)
                best = (path, len(path) - 1, "no fair action is enabled: the system may stay here forever")
                break
        index = [-1] * n
        low = [0] * n
        onstack = bytearray(n)
        stack: list[int] = []
        counter = 0
        for root in range(n):
            if not stuck[root] or index[root] >= 0:
                continue
            work: list[tuple[int, int]] = [(root, int(off[root]))]
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            onstack[root] = 1
            while work:
                v, e = work[-1]
                end = off[v + 1]
                advanced = False
                while e < end:
                    w = succ[e]
                    e += 1
                    if not stuck[w]:
                        continue
                    if index[w] < 0:
                        work[-1] = (v, e)
                        index[w] = low[w] = counter
                        counter += 1
                        stack.append(w)
                        onstack[w] = 1
                        work.append((w, int(off[w])))
                        advanced = True
                        break
                    if onstack[w] and index[w] < low[v]:
                        low[v] = index[w]
                if advanced:
                    continue
                work.pop()
                if work:
                    u = work[-1][0]
                    if low[v] < low[u]:
                        low[u] = low[v]
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        onstack[w] = 0
                        comp.append(w)
                        if w == v:
                            break
                    found = self._check_component(comp)
                    if found is not None and (best is None or len(found[0]) < len(best[0])):
                        best = found
        return best

    def _check_component(self, comp: list[int]) -> tuple[list[int], int, str] | None:
        members = set(comp)
        off, succ, grp, enabled = self.off, self.succ, self.grp, self.enabled
        always = -1
        taken = 0
        internal = False
        for v in comp:
            always &= enabled[v]
            for e in range(off[v], off[v + 1]):
                if succ[e] in members:
                    internal = True
                    if grp[e] >= 0:
                        taken |= 1 << grp[e]
        if not internal or always & ~taken:
            return None
        entry = min(comp)
        cycle = self._cycle(entry, members)
        prefix = self.path_to(entry)
        return prefix + cycle[1:], len(prefix) - 1, f"fair cycle through {len(comp)} stuck states"

    def _cycle(self, start: int, members: set[int]) -> list[int]:
        """Shortest path start -> ... -> start inside ``members`` (BFS)."""
        off, succ = self.off, self.succ
        prev: dict[int, int] = {}
        frontier = [start]
        while frontier:
            nxt = []
            for v in frontier:
                for e in range(off[v], off[v + 1]):
                    w = succ[e]
                    if w not in members:
                        continue
                    if w == start:
                        path = [start]
                        x = v
                        while x != start:
                            path.append(x)
                            x = prev[x]
                        path.append(start)
                        return [start, *path[1:-1][::-1], start] if len(path) > 2 else [start, start]
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        return [start]


def concretize(cs: Compiled, canonical_path: list[State]) -> list[tuple[tuple[int, tuple[Any, ...]] | None, State]]:
    """Re-run a (possibly symmetry-reduced) path from the real initial state.

    Returns ``(label, concrete state)`` per step, so traces and their JSON are
    replayable even when the search stored canonical representatives.
    """
    canon: Callable[[State], State] = cs.canon or (lambda s: s)
    cur = cs.init
    out: list[tuple[tuple[int, tuple[Any, ...]] | None, State]] = [(None, cur)]
    for target in canonical_path[1:]:
        succs: list[Succ] = []
        for f in cs.actions:
            f(cur, succs)
        for aid, params, nx in succs:
            if canon(nx) == target:
                out.append(((aid, params), nx))
                cur = nx
                break
        else:
            raise RuntimeError("trace could not be concretized (symmetry reduction inconsistent)")
    return out
