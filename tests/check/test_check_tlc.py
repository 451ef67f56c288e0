"""TLC and `natpool check` agree on the TLA+ export (issue 10).

The parser tests run everywhere. The TLC runs need the jar: set
NATPOOL_TLC_JAR to tla2tools.jar (CI points it at the shared copy) and have
java on PATH; without them they skip, saying why.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from natpool.check.compile import compile_system
from natpool.check.engine import Result, Search
from natpool.check.system import System, load_model, load_system
from natpool.check.tlc import JAR_ENV, TlcRun, disagreement, export_paths, jar_from_env, parse_output, run_tlc
from natpool.resources import models_dir, spec_dir

# Lines as TLC (tla2tools, commit cc6b616cf) prints them.
OK_OUT = """Model checking completed. No error has been found.
  Estimates of the probability that TLC did not check all reachable states
34453 states generated, 5744 distinct states found, 0 states left on queue.
The depth of the complete state graph search is 19.
"""
ACTION_OUT = """Error: Action property CleanHandover is violated.
Error: The behavior up to this point is:
State 1: <Initial predicate>
380 states generated, 146 distinct states found, 12 states left on queue.
"""
INVARIANT_OUT = "Error: Invariant AtomicTake is violated.\n12 states generated, 10 distinct states found, 1 states left"
TEMPORAL_OUT = "Error: Temporal properties were violated.\n\nError: The following behavior constitutes a counter"


def test_parse_tlc_verdicts_and_counts() -> None:
    ok = parse_output(OK_OUT)
    assert (ok.verdict, ok.distinct, ok.violated) == ("ok", 5744, None)
    act = parse_output(ACTION_OUT)
    assert (act.verdict, act.distinct, act.violated) == ("violated", 146, "CleanHandover")
    assert parse_output(INVARIANT_OUT).violated == "AtomicTake"
    assert parse_output(TEMPORAL_OUT).violated == "temporal"
    assert parse_output("Error: Deadlock reached.\n").violated == "Deadlock"
    assert parse_output("Exception in thread main: java.lang.NoClassDefFoundError").verdict == "error"


def _checked(name: str) -> tuple[Result, System]:
    system = load_system()
    model = load_model(models_dir().path / f"{name}.toml", system)
    result = Search(compile_system(system, model, reduce=False), liveness=True, progress=None, keep_going=True).run()
    return result, system


def test_disagreement_rules() -> None:
    """Same count and no error agree; a different count or verdict does not; a violation compares verdicts only."""
    result, system = _checked("fast-reliable")
    assert not result.violations
    agree = TlcRun("ok", result.states, None, 0.0, "")
    assert disagreement(system, result, agree) is None
    off = TlcRun("ok", result.states + 1, None, 0.0, "")
    assert "distinct states differ" in (disagreement(system, result, off) or "")
    bad = TlcRun("violated", 3, "AtomicTake", 0.0, "")
    assert disagreement(system, result, bad) is not None
    failed, system = _checked("fast-early-timeouts")
    assert {v.prop for v in failed.violations} == {"CleanHandover"}
    early = TlcRun("violated", 7, "CleanHandover", 0.0, "")  # TLC stops early: its count is not compared
    assert disagreement(system, failed, early) is None
    assert disagreement(system, failed, TlcRun("ok", failed.states, None, 0.0, "")) is not None


def _jar() -> Path:
    jar = jar_from_env()
    if jar is None:
        pytest.skip(f"TLC not available: set {JAR_ENV} to tla2tools.jar (e.g. ../shared/tools/tlc/tla2tools.jar)")
    if shutil.which("java") is None:
        pytest.skip("TLC not available: java is not on PATH")
    return jar


@pytest.mark.parametrize("name", ["fast-reliable", "fast-early-timeouts"])
def test_tlc_agrees_with_the_checker(name: str) -> None:
    """The two smallest fast models (one with an expected violation): seconds; `.ci/run` runs TLC on them all."""
    jar = _jar()
    result, system = _checked(name)
    model = load_model(models_dir().path / f"{name}.toml", system)
    tlc = run_tlc(jar, *export_paths(spec_dir().path, system, model))
    assert disagreement(system, result, tlc) is None, tlc.output[-2000:]
    if not result.violations:
        assert tlc.distinct == result.states
