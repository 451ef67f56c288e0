"""natpool check: model-check the handover protocol over the models (models/*.toml).

Examples:

    natpool check                         # every fast model (CI)
    natpool check --profile thorough
    natpool check my-model.toml --trace-json /tmp/cex.json
    natpool check --mutant no-drain       # a seeded bug: must be caught (exit 1)
    natpool check --all-mutants           # exit 0 iff every mutant is caught
    natpool check --list-mutants
    natpool check --tlc tla2tools.jar     # also run TLC on each model's TLA+ export; exit 1 if it disagrees

Each model's search runs to the end: when a property is violated, its first
(shortest) counterexample is kept, that property is dropped from the checks
and the search goes on, so every other property's verdict covers the whole
state space. With --first-violation (and with --mutant or --all-mutants, where
one catch is enough) the search stops at the first violation instead, and the
properties it had not yet violated are reported as "partial", not "ok".

Violations a model expects (it breaks an assumption on purpose, see its
`expect` and doc) are shown as EXPECTED, one line each; -v prints their
traces. With --tlc JAR, TLC checks each model's TLA+ export too (spec/tla/, copied
to a scratch directory): on a model without violations it must find no error and the same
number of distinct states (the search is then unreduced); on one with a
violation, a violation too (TLC stops at its first, so only verdicts are
compared). Exit status: 0 when every model holds what it claims (and TLC
agrees), 1 on an unexpected or missing violation or a TLC disagreement (or, with --mutant, when the mutant is
caught), 2 on a usage error (no spec, no models, a bad model file).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from natpool.check.compile import compile_system
from natpool.check.engine import Result, Search
from natpool.check.system import Model, System, list_models, load_model, load_mutants, load_system
from natpool.check.tlc import disagreement, export_paths, run_tlc
from natpool.check.trace import render, to_json, write_json
from natpool.resources import SpecNotFound, given_dir, models_dir, spec_dir
from natpool.spec.model import SpecError

ORDER = ["AtomicTake", "StrictSilence", "CleanHandover", "Symmetry", "NoLeak", "Deadlock", "TakeReturns",
         "LockEnds", "SessionEnds", "ReliableSuccess", "LeaseToPeers", "IdleExpires"]
SHORT = {"AtomicTake": "Atomic", "StrictSilence": "Silence", "CleanHandover": "Clean", "Symmetry": "Symm",
         "NoLeak": "NoLeak", "Deadlock": "Dlock", "TakeReturns": "TakeRet", "LockEnds": "LockEnd",
         "SessionEnds": "SessEnd", "ReliableSuccess": "Reliable",
         "LeaseToPeers": "Lease", "IdleExpires": "IdleExp"}


class UsageError(Exception):
    """A command-line mistake reported as ``error: ...`` with exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[1] if __doc__ else None
    parser.epilog = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("models", nargs="*", type=Path, help="model files (default: every model of --profile)")
    parser.add_argument("--profile", default="fast", choices=["fast", "thorough", "all"],
                        help="which models to run when none are named (default: %(default)s)")
    parser.add_argument("--spec-dir", type=Path, metavar="DIR",
                        help="read the spec (entry.toml, system.toml, ...) from DIR (default: the source "
                             "checkout's spec/, else the copy installed with natpool)")
    parser.add_argument("--models-dir", type=Path, metavar="DIR",
                        help="where --profile finds models (default: the checkout's models/, else the installed copy)")
    parser.add_argument("--mutant", help="apply a seeded bug from the spec's mutants.toml")
    parser.add_argument("--all-mutants", action="store_true", help="run every mutant; exit 0 iff each is caught")
    parser.add_argument("--list-mutants", action="store_true", help="list the seeded bugs and exit")
    parser.add_argument("--first-violation", action="store_true",
                        help="stop each model at its first violation (the rest is reported as partial)")
    parser.add_argument("--no-reduce", action="store_true", help="disable the taker-symmetry reduction")
    parser.add_argument("--no-liveness", action="store_true", help="safety only")
    parser.add_argument("--max-states", type=int, default=0, help="stop after this many states (0: no limit)")
    parser.add_argument("--trace-json", type=Path, help="write the (first) counterexample as JSON to this file")
    parser.add_argument("--trace-dir", type=Path, help="write every counterexample as JSON into this directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the traces of expected violations")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--dump-python", action="store_true", help="print the compiled Python of the first model")
    parser.add_argument("--tlc", type=Path, metavar="JAR",
                        help="also run TLC (tla2tools.jar; java on PATH) on each model's TLA+ export and fail when its "
                             "verdict or distinct-state count differs (e.g. --tlc \"$NATPOOL_TLC_JAR\")")


def run_model(system: System, model: Model, args: argparse.Namespace, keep_going: bool = True) -> tuple[Result, Search]:
    want_live = not args.no_liveness
    # Liveness needs the unreduced graph (fairness labels are not permutation-invariant).
    reduce = model.reduce and not args.no_reduce and not want_live
    cs = compile_system(system, model, reduce=reduce)
    if args.dump_python:
        print(cs.source)
        args.dump_python = False
    search = Search(cs, liveness=want_live, max_states=args.max_states, progress=None if args.quiet else sys.stderr,
                    keep_going=keep_going and not getattr(args, "first_violation", False))
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
    if any("partial" in r.verdicts.values() for _, r, _ in results):
        table += ("\npartial = not violated in the part of the state space searched before the search stopped "
                  "(--first-violation or --max-states): not proved.")
    return table


def _err(msg: str) -> None:
    print(f"natpool check: error: {msg}", file=sys.stderr)


def _progress(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".") if text else ""


class Outcome:
    """What one ``_check`` run found, for the verdict line and the exit status."""

    def __init__(self) -> None:
        self.models = 0
        self.unexpected: list[str] = []  # "Prop in model"
        self.missing: list[str] = []  # expected violations that did not occur
        self.expected: list[str] = []
        self.partial: list[str] = []  # models whose search did not cover the whole state space
        self.caught: list[str] = []  # property names (mutant runs)
        self.tlc_disagrees: list[str] = []  # models where TLC's verdict or state count differs (--tlc)
        self.tlc_ran = False

    @property
    def bad(self) -> bool:
        return bool(self.unexpected or self.missing or self.tlc_disagrees)


def _check(args: argparse.Namespace, spec: Path, mutant: str | None, paths: list[Path], verbose: bool,
           first_catch: bool = False) -> Outcome:
    """Run ``paths`` and print one result line per model (tables and traces when ``verbose``).

    With a mutant, models that expect a violation (a deliberately broken
    assumption) are skipped: their failure would not be the mutant's.
    """
    system = load_system(spec, mutant=mutant)
    models = [load_model(path, system) for path in paths]
    if mutant:
        models = [m for m in models if not m.expect]
    results: list[tuple[str, Result, tuple[str, ...]]] = []
    out = Outcome()
    wrote_json = False
    for k, model in enumerate(models, 1):
        if first_catch and out.caught:
            break
        tag = f"[{k}/{len(models)}] {model.name}"
        _progress(args, f"{tag} ..." + (f" (mutant {mutant})" if mutant else ""))
        result, search = run_model(system, model, args, keep_going=mutant is None)
        out.models += 1
        expect = () if mutant else model.expect
        results.append((model.name, result, expect))
        notes: list[str] = []
        for v in result.violations:
            out.caught.append(v.prop)
            doc = to_json(search, v)
            steps = len(doc["steps"]) - 1
            if v.prop in expect:
                out.expected.append(f"{v.prop} in {model.name}")
                notes.append(f"EXPECTED {v.prop} violation ({steps} steps): {_first_sentence(model.doc)}"
                             + ("" if args.verbose else "; -v prints the trace"))
                show = args.verbose
            else:
                if not mutant:
                    out.unexpected.append(f"{v.prop} in {model.name}")
                notes.append(f"{'caught' if mutant else 'FAIL'}: {v.prop} violated ({steps} steps), trace below")
                show = True
            if verbose and show:
                print(render(doc, search.cs))
                print()
            if args.trace_json is not None and not wrote_json:
                write_json(args.trace_json, doc)
                wrote_json = True
            if args.trace_dir is not None:
                prefix = f"{mutant}-" if mutant else ""
                write_json(args.trace_dir / f"{prefix}{model.name}-{v.prop}.json", doc)
        for p in expect:
            if result.verdicts.get(p) != "FAIL":
                out.missing.append(f"{p} in {model.name}")
                notes.append(f"MISSED: expected {p} to be violated, but it was not")
        if not result.complete:
            out.partial.append(model.name)
            notes.append(f"stopped at --max-states {args.max_states}: the result is partial")
        elif "partial" in result.verdicts.values():
            out.partial.append(model.name)
        if not notes:
            notes.append("ok" if not any(v == "partial" for v in result.verdicts.values()) else "ok so far (partial)")
        if getattr(args, "tlc", None) is not None:
            notes.append(_tlc_note(args, system, model, result, out))
        if verbose:
            print(f"{tag}: {result.states:,} states, {result.seconds:.1f}s: {notes[0]}")
            for n in notes[1:]:
                print(f"{' ' * len(tag)}  {n}")
    if verbose:
        print()
        print(_table(results))
    return out


def _tlc_note(args: argparse.Namespace, system: System, model: Model, result: Result, out: Outcome) -> str:
    _progress(args, f"  TLC on {model.name} ...")
    tlc = run_tlc(args.tlc, *export_paths(_spec(args), system, model))
    out.tlc_ran = True
    why = disagreement(system, result, tlc) if result.complete else "the checker's search was partial"
    seen = f"{tlc.distinct:,} distinct states" if tlc.distinct is not None else "no state count"
    said = "no error" if tlc.verdict == "ok" else (f"{tlc.violated} violated" if tlc.violated else tlc.verdict)
    if why is None:
        return f"TLC agrees: {seen}, {said} ({tlc.seconds:.1f}s)"
    out.tlc_disagrees.append(model.name)
    return f"TLC DISAGREES ({tlc.seconds:.1f}s): {why}"


def _verdict(out: Outcome) -> str:
    if out.bad:
        parts = []
        if out.unexpected:
            parts.append("unexpected violation of " + ", ".join(out.unexpected))
        if out.missing:
            parts.append("expected violation missing: " + ", ".join(out.missing))
        if out.tlc_disagrees:
            parts.append("TLC disagrees on " + ", ".join(out.tlc_disagrees))
        return "verdict: FAIL: " + "; ".join(parts)
    text = f"verdict: OK: {out.models} model{'s' if out.models != 1 else ''}, no unexpected violation"
    if out.expected:
        text += f", {len(out.expected)} expected ({', '.join(out.expected)})"
    if out.partial:
        text += f"; searched only partly: {', '.join(out.partial)}"
    if out.tlc_ran:
        text += f"; TLC agrees on all {out.models}"
    return text


def _spec(args: argparse.Namespace) -> Path:
    return given_dir(args.spec_dir, "spec").path if args.spec_dir else spec_dir().path


def _paths(args: argparse.Namespace) -> list[Path]:
    if args.models:
        return list(args.models)
    base = given_dir(args.models_dir, "models").path if args.models_dir else models_dir().path
    paths = list_models(None if args.profile == "all" else args.profile, base)
    if not paths:
        raise UsageError(f"no models of profile {args.profile!r} in {base}")
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        spec = _spec(args)
        if args.list_mutants:
            mutants = load_mutants(spec)
            if not mutants:
                raise UsageError(f"no mutants found: {spec / 'mutants.toml'} is missing or empty")
            for name, m in mutants.items():
                print(f"{name:20} {m.doc}")
            return 0
        paths = _paths(args)
        if args.tlc is not None:
            if args.mutant or args.all_mutants:
                raise UsageError("--tlc checks the spec itself; mutants are checker-only (not exported to TLA+)")
            if args.no_liveness or args.max_states or args.first_violation:
                raise UsageError("--tlc compares whole searches: drop --no-liveness, --max-states, --first-violation")
            if not args.tlc.is_file():
                raise UsageError(f"--tlc: no TLC jar at {args.tlc}")
            if shutil.which("java") is None:
                raise UsageError("--tlc: java is not on PATH")
            args.no_reduce = True  # TLC's distinct states are those of the unreduced graph
        if args.all_mutants:
            mutants = load_mutants(spec)
            if not mutants:
                raise UsageError(f"no mutants found: {spec / 'mutants.toml'} is missing or empty")
            missed = []
            for k, name in enumerate(mutants, 1):
                _progress(args, f"[{k}/{len(mutants)}] mutant {name} ...")
                quiet, args.quiet = args.quiet, True
                outcome = _check(args, spec, name, paths, verbose=False, first_catch=True)
                args.quiet = quiet
                status = f"caught by {', '.join(sorted(set(outcome.caught)))}" if outcome.caught else "NOT CAUGHT"
                print(f"mutant {name:20} {status}")
                if not outcome.caught:
                    missed.append(name)
            if missed:
                print(f"verdict: FAIL: {len(missed)} of {len(mutants)} mutants not caught: {', '.join(missed)}")
                return 1
            print(f"verdict: OK: all {len(mutants)} mutants caught")
            return 0
        outcome = _check(args, spec, args.mutant, paths, verbose=True)
        if args.mutant:
            caught = sorted(set(outcome.caught))
            if caught:
                print(f"verdict: mutant {args.mutant} caught by {', '.join(caught)} (exit 1, as a seeded bug must)")
                return 1
            print(f"verdict: mutant {args.mutant} NOT caught by {outcome.models} models (exit 0: no violation found)")
            return 0
        print(_verdict(outcome))
        return 1 if outcome.bad else 0
    except (SpecError, SpecNotFound, UsageError) as exc:
        _err(str(exc))
        return 2
