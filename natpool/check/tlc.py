"""Cross-check ``natpool check`` against TLC on the TLA+ export of the same model.

The checker and the TLA+ module are generated from one parsed spec, so TLC,
an independent implementation of the same semantics, must agree with the
checker: on a model that holds everything, the same number of distinct
states (the checker's unreduced graph: the TLA+ state is exactly the declared
variables) and "no error"; on a model with a violation, a violation too. TLC
stops at its first violation and its search order differs, so then only the
verdicts are compared (and, where TLC names the property, that the checker
found the same one violated). ``natpool check --tlc JAR`` does this per model
and CI runs it on the fast profile (issue 10).

TLC runs on the committed export (``spec/tla/``) copied to a scratch
directory (module, .cfg and ``-metadir`` there), so nothing lands in the
checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from natpool.check.engine import Result
from natpool.check.system import Model, System

JAR_ENV = "NATPOOL_TLC_JAR"
_DISTINCT = re.compile(r"([\d,]+) distinct states found")
_NAMED = re.compile(r"Error: (?:Invariant|Action property) (\w+) is violated")


@dataclass
class TlcRun:
    """What TLC reported for one model."""

    verdict: str  # "ok" | "violated" | "error" (TLC failed to run or to finish)
    distinct: int | None  # distinct states found (the last count TLC printed)
    violated: str | None  # the property TLC names: an invariant or action property, "Deadlock" or "temporal"
    seconds: float
    output: str


def jar_from_env() -> Path | None:
    """The TLC jar named by ``NATPOOL_TLC_JAR``, if it is set and exists."""
    value = os.environ.get(JAR_ENV)
    if not value:
        return None
    path = Path(value)
    return path if path.is_file() else None


def parse_output(text: str, seconds: float = 0.0) -> TlcRun:
    """Read TLC's verdict and distinct-state count from its standard output."""
    counts = _DISTINCT.findall(text)
    distinct = int(counts[-1].replace(",", "")) if counts else None
    named = _NAMED.search(text)
    if "Model checking completed. No error has been found." in text:
        return TlcRun("ok", distinct, None, seconds, text)
    if named:
        return TlcRun("violated", distinct, named.group(1), seconds, text)
    if "Error: Deadlock reached." in text:
        return TlcRun("violated", distinct, "Deadlock", seconds, text)
    if "Error: Temporal properties were violated." in text:
        return TlcRun("violated", distinct, "temporal", seconds, text)
    return TlcRun("error", distinct, None, seconds, text)


def export_paths(spec: Path, system: System, model: Model) -> tuple[Path, Path]:
    """The committed TLA+ export of ``model`` (``spec/tla/``, written by ``natpool spec generate``)."""
    return spec / "tla" / f"{system.name}.tla", spec / "tla" / f"{model.name}.cfg"


def run_tlc(jar: Path, module: Path, cfg: Path, workers: int = 1, timeout: float = 900.0) -> TlcRun:
    """Copy the module and the .cfg to a scratch directory and run TLC there.

    The export is read, not generated here (``natpool.check`` never imports
    the generator); ``natpool spec generate --check`` keeps it fresh, and a
    stale export shows up as a disagreement.
    """
    java = shutil.which("java")
    if java is None:
        return TlcRun("error", None, None, 0.0, "java not found on PATH")
    for path in (module, cfg):
        if not path.is_file():
            return TlcRun("error", None, None, 0.0, f"no TLA+ export at {path}: run `natpool spec generate`")
    with tempfile.TemporaryDirectory(prefix="natpool-tlc-") as tmp:
        scratch = Path(tmp)
        shutil.copy(module, scratch / module.name)
        shutil.copy(cfg, scratch / cfg.name)
        # -lncheck final: check liveness once, on the whole graph (TLC's periodic checks cost ~2x here).
        cmd = [java, "-XX:+UseParallelGC", "-cp", str(jar), "tlc2.TLC", "-workers", str(workers), "-lncheck", "final",
               "-metadir", str(scratch / "meta"), "-config", str(scratch / cfg.name), str(scratch / module.name)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=timeout,  # noqa: S603
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else ""
            return TlcRun("error", None, None, time.monotonic() - t0, out + f"\nTLC timed out after {timeout:.0f}s")
        return parse_output(proc.stdout + proc.stderr, time.monotonic() - t0)


def _checker_name(system: System, tla_name: str) -> str:
    """Map a TLA+ property operator back to the property (``SymmetryStep`` is Symmetry's action part)."""
    names = {p.name for p in system.properties}
    if tla_name in names:
        return tla_name
    base = tla_name.removesuffix("Step")
    return base if base in names else tla_name


def disagreement(system: System, result: Result, tlc: TlcRun) -> str | None:
    """Why TLC's answer differs from the checker's, or None when they agree.

    The checker's result must be complete (no --max-states) and unreduced for
    the state counts to be comparable.
    """
    if tlc.verdict == "error":
        tail = "\n".join(tlc.output.strip().splitlines()[-8:])
        return f"TLC did not finish:\n{tail}"
    failed = {v.prop for v in result.violations}
    if not failed:
        if tlc.verdict != "ok":
            return f"TLC reports a violation ({tlc.violated}), natpool check none"
        if tlc.distinct != result.states:
            return f"distinct states differ: TLC {tlc.distinct}, natpool check {result.states}"
        return None
    if tlc.verdict == "ok":
        return f"natpool check reports {', '.join(sorted(failed))} violated, TLC no error"
    if tlc.violated == "temporal":
        if not any(v.kind == "liveness" for v in result.violations):
            return "TLC reports a temporal property violated, natpool check no liveness violation"
        return None
    name = _checker_name(system, tlc.violated or "")
    if name not in failed:
        return f"TLC reports {name} violated, natpool check {', '.join(sorted(failed))}"
    return None
