"""``natpool check``: model-check the handover protocol over ``models/*.toml``.

Examples::

    natpool check                         # every fast model (CI)
    natpool check --profile thorough
    natpool check models/fast-race.toml --trace-json /tmp/cex.json
    natpool check --mutant no-drain       # a seeded bug: must be caught (exit 1)
    natpool check --all-mutants           # exit 0 iff every mutant is caught
    natpool check --list-mutants
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from natpool.check.compile import compile_system
from natpool.check.engine import Result, Search
from natpool.check.system import Model, System, list_models, load_model, load_mutants, load_system
from natpool.check.trace import render, to_json, write_json
from natpool.specgen.model import SpecError

ORDER = ["AtomicTake", "StrictSilence", "CleanHandover", "Symmetry", "NoLeak", "Deadlock", "TakeReturns",
         "LockEnds", "SessionEnds", "ReliableSuccess"]
SHORT = {"AtomicTake": "Atomic", "StrictSilence": "Silence", "CleanHandover": "Clean", "Symmetry": "Symm",
         "NoLeak": "NoLeak", "Deadlock": "Dlock", "TakeReturns": "TakeRet", "LockEnds": "LockEnd",
         "SessionEnds": "SessEnd", "ReliableSuccess": "Reliable"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", type=Path, help="model files (default: every model of --profile)")
    parser.add_argument("--profile", default="fast", choices=["fast", "thorough", "all"],
                        help="which models/ to run when none are named (default: %(default)s)")
    parser.add_argument("--mutant", help="apply a seeded bug from spec/mutants.toml")
    parser.add_argument("--all-mutants", action="store_true", help="run every mutant; exit 0 iff each is caught")
    parser.add_argument("--list-mutants", action="store_true", help="list the seeded bugs and exit")
    parser.add_argument("--no-reduce", action="store_true", help="disable the taker-symmetry reduction")
    parser.add_argument("--no-liveness", action="store_true", help="safety only")
    parser.add_argument("--max-states", type=int, default=0, help="stop after this many states (0: no limit)")
    parser.add_argument("--trace-json", type=Path, help="write the (first) counterexample as JSON to this file")
    parser.add_argument("--trace-dir", type=Path, help="write every counterexample as JSON into this directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--dump-python", action="store_true", help="print the compiled Python of the first model")


def run_model(system: System, model: Model, args: argparse.Namespace) -> tuple[Result, Search]:
    want_live = not args.no_liveness
    # Liveness needs the unreduced graph (fairness labels are not permutation-invariant).
    reduce = model.reduce and not args.no_reduce and not want_live
    cs = compile_system(system, model, reduce=reduce)
    if args.dump_python:
        print(cs.source)
        args.dump_python = False
    search = Search(cs, liveness=want_live, max_states=args.max_states, progress=None if args.quiet else sys.stderr)
    return search.run(), search


def _table(results: list[tuple[str, Result, tuple[str, ...]]]) -> str:
    props = [p for p in ORDER if any(p in r.verdicts for _, r, _ in results)]
    head = ["model", "states", "trans", "depth", "time", "states/s", *[SHORT.get(p, p) for p in props]]
    rows = [head]
    for name, r, expect in results:
        cells = [name, f"{r.states:,}", f"{r.transitions:,}", str(r.depth), f"{r.seconds:.1f}s", f"{r.rate:,.0f}"]
        for p in props:
            v = r.verdicts.get(p, "-")
            if p in expect:
                v = "fail*" if v == "FAIL" else "MISSED"
            cells.append(v)
        rows.append(cells)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    table = "\n".join("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths, strict=True)))
                      for r in rows)
    if any(expect for _, _, expect in results):
        table += ("\nfail* = a violation the model expects: it breaks an assumption on purpose (its `expect` and doc"
                  " say which), to show the assumption is needed. MISSED = an expected violation did not occur.")
    return table


def _check(args: argparse.Namespace, mutant: str | None, paths: list[Path], verbose: bool,
           first_catch: bool = False) -> tuple[bool, list[str]]:
    """Run ``paths``; return (any unexpected violation, caught-by property names).

    With a mutant, models that expect a violation (a deliberately broken
    assumption) are skipped: their failure would not be the mutant's.
    """
    system = load_system(mutant=mutant)
    results: list[tuple[str, Result, tuple[str, ...]]] = []
    bad = False
    caught: list[str] = []
    wrote_json = False
    for path in paths:
        model = load_model(path, system)
        if mutant and model.expect:
            continue
        if first_catch and caught:
            break
        result, search = run_model(system, model, args)
        expect = () if mutant else model.expect
        results.append((model.name, result, expect))
        for v in result.violations:
            caught.append(v.prop)
            doc = to_json(search, v)
            if verbose:
                print(render(doc, search.cs))
                print()
            if args.trace_json is not None and not wrote_json:
                write_json(args.trace_json, doc)
                wrote_json = True
            if args.trace_dir is not None:
                tag = f"{mutant}-" if mutant else ""
                write_json(args.trace_dir / f"{tag}{model.name}-{v.prop}.json", doc)
            if v.prop not in expect:
                bad = True
        for p in expect:
            if result.verdicts.get(p) != "FAIL":
                print(f"{model.name}: expected {p} to be violated, but it was not")
                bad = True
        if not result.complete:
            print(f"{model.name}: stopped at --max-states {args.max_states}: the result is partial")
    if verbose:
        print(_table(results))
    return bad, caught


def run(args: argparse.Namespace) -> int:
    try:
        if args.list_mutants:
            for name, m in load_mutants().items():
                print(f"{name:20} {m.doc}")
            return 0
        paths = list(args.models) or list_models(None if args.profile == "all" else args.profile)
        if not paths:
            print("no models found")
            return 2
        if args.all_mutants:
            missed = []
            for name in load_mutants():
                args.quiet = True
                _, caught = _check(args, name, paths, verbose=False, first_catch=True)
                status = f"caught by {', '.join(sorted(set(caught)))}" if caught else "NOT CAUGHT"
                print(f"mutant {name:20} {status}")
                if not caught:
                    missed.append(name)
            return 1 if missed else 0
        bad, caught = _check(args, args.mutant, paths, verbose=True)
        if args.mutant:
            print(f"mutant {args.mutant}: " + (f"caught by {', '.join(sorted(set(caught)))}" if caught
                                               else "NOT caught"))
        return 1 if bad else 0
    except SpecError as exc:
        print(f"error: {exc}")
        return 2
