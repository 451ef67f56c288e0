"""The model checker: fast models pass, tables are the only source of transitions, liveness and traces work."""

from __future__ import annotations

import argparse
import ast
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from natpool.check import cli
from natpool.check.compile import Succ, compile_system
from natpool.check.dsl import Scope, Translator, parse_expr, step_conditions
from natpool.check.engine import Result, Search, concretize
from natpool.check.system import System, list_models, load_model, load_system
from natpool.check.trace import FORMAT, render, to_json
from natpool.resources import models_dir, spec_dir
from natpool.spec.model import SpecError
from tests.support import COUNTEREXAMPLES

FAST = list_models("fast")
MODELS = models_dir().path  # the checkout's models/, or the installed copy
SPEC = spec_dir().path


def run(system: System, path: Path, liveness: bool = True, reduce: bool = False,
        keep_going: bool = False) -> tuple[Result, Search]:
    model = load_model(path, system)
    search = Search(compile_system(system, model, reduce=reduce), liveness=liveness, progress=None,
                    keep_going=keep_going)
    return search.run(), search


def test_fast_profile_exists_and_covers_the_scenarios() -> None:
    names = {p.stem for p in FAST}
    assert {"fast-race", "fast-reliable", "fast-dup", "fast-any"} <= names


@pytest.mark.parametrize("path", FAST, ids=lambda p: p.stem)
def test_fast_model_verdicts(path: Path) -> None:
    system = load_system()
    model = load_model(path, system)
    result, _ = run(system, path, keep_going=True)  # past an expected violation: full verdicts for the rest
    assert result.complete
    for prop, verdict in result.verdicts.items():
        if prop in model.expect:
            assert verdict == "FAIL", f"{model.name}: {prop} was expected to fail (broken assumption)"
        else:
            assert verdict in ("ok", "skip", "n/a"), f"{model.name}: {prop} {verdict}"
    if not model.expect:
        assert result.liveness_checked
        assert all(result.verdicts[p] == "ok" for p in ("TakeReturns", "LockEnds", "SessionEnds"))


def test_reliable_model_proves_success_on_both_sides() -> None:
    result, _ = run(load_system(), MODELS / "fast-reliable.toml")
    assert result.verdicts["ReliableSuccess"] == "ok"


def test_missing_table_transition_disables_the_action() -> None:
    """Drop Responder Start --accept--> from the loaded table: the take can no longer succeed."""
    system = load_system()
    info = system.machines["Responder"]
    system.machines["Responder"] = replace(info, table={k: v for k, v in info.table.items() if k[1] != "accept"})
    result, search = run(system, MODELS / "fast-reliable.toml")
    assert result.verdicts["ReliableSuccess"] == "FAIL" or result.verdicts["Deadlock"] == "FAIL"
    assert all(ini != "Done" for st in search.states for ini in st[search.cs.variables.index("ini")])


def test_liveness_counterexample_is_a_fair_lasso(tmp_path: Path) -> None:
    """Responder stuck in Start while pair 1 keeps pinging: a fair cycle, TakeReturns fails."""
    system = load_system()
    info = system.machines["Responder"]
    system.machines["Responder"] = replace(info, table={k: v for k, v in info.table.items() if k[1] != "accept"})
    model_file = tmp_path / "two.toml"
    text = (MODELS / "fast-reliable.toml").read_text().replace("K = 1", "K = 2")
    model_file.write_text(text)
    result, search = run(system, model_file)
    assert result.verdicts["TakeReturns"] == "FAIL"
    v = next(x for x in result.violations if x.prop == "TakeReturns")
    assert v.kind == "liveness" and v.loop_start is not None
    assert v.path[v.loop_start] == v.path[-1], "the lasso closes on its loop start"
    doc = to_json(search, v)
    assert doc["loop_start"] == v.loop_start
    assert "repeat forever" in render(doc, search.cs)


def test_symmetry_reduction_is_sound_and_reduces(tmp_path: Path) -> None:
    system = load_system()
    path = tmp_path / "three-takers.toml"
    text = (MODELS / "fast-race.toml").read_text()
    text = text.replace("T0 = 1", "T0 = 2").replace("B = 2", "B = 1").replace("remove = true", "remove = false")
    path.write_text(text)
    full, _ = run(system, path, liveness=False, reduce=False)
    red, _ = run(system, path, liveness=False, reduce=True)
    assert red.reduced and red.states < full.states
    assert red.verdicts == full.verdicts


def test_reduced_counterexample_replays_concretely() -> None:
    system = load_system(mutant="no-cas")
    result, search = run(system, MODELS / "fast-any.toml", liveness=False, reduce=True)
    v = result.violations[0]
    steps = concretize(search.cs, [search.states[s] for s in v.path])
    for (_, prev), (label, nxt) in itertools.pairwise(steps):
        assert label is not None
        out: list[Succ] = []
        search.cs.actions[label[0]](prev, out)
        assert any(nx == nxt and params == label[1] for _, params, nx in out)


def test_trace_json_format() -> None:
    system = load_system(mutant="no-drain")
    result, search = run(system, MODELS / "fast-race.toml", liveness=False)
    doc = to_json(search, result.violations[0])
    assert doc["format"] == FORMAT and doc["property"] == "CleanHandover" and doc["mutant"] == "no-drain"
    assert doc["steps"][0]["action"] == "init"
    assert set(doc["steps"][-1]["state"]) == set(search.cs.variables)
    assert json.loads(json.dumps(doc)) == doc
    text = render(doc, search.cs)
    assert "CleanHandover violated" in text and "take(" in text


@pytest.mark.parametrize("path", sorted(COUNTEREXAMPLES.rglob("*.json")),
                         ids=lambda p: p.stem)
def test_saved_counterexamples_are_well_formed(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert doc["steps"] and doc["steps"][0]["action"] == "init"
    assert {"entry", "ini", "resp", "pings", "pongs"} <= set(doc["steps"][0]["state"])


def test_dsl_rejects_what_it_cannot_translate() -> None:
    for bad in ["x[1:2]", "lambda: 1", "a < b < c", "[x for x in D]", "f(x=1)", "1.5"]:
        with pytest.raises(SpecError):
            parse_expr(bad, "test")


def test_dsl_translates_to_python_and_tla() -> None:
    system = load_system()
    scope = Scope(variables=tuple(system.variables), constants={"K": 2}, domains=("Pairs",), defines={},
                  machines=system.machines, locals=frozenset({"p"}))
    e = parse_expr('implies(entry[0][p] in Entry.silent, len(toini[p]) == 0) and pings\'[p] >= K', "t")
    py = Translator(scope, tla=False).expr(e)
    tla = Translator(scope, tla=True).expr(e)
    assert "SET_Entry_silent" in py and "x_pings" in py and "2" in py
    assert "\\in Entry_silent" in tla and "pings'[p]" in tla and "Len(toini[p])" in tla and "=>" in tla


def test_step_in_a_branch_guards_only_that_branch() -> None:
    e = parse_expr('step(Entry, x, "finish_lock") if x == "InLocking" else x', "t")
    conds = step_conditions(e)
    assert len(conds) == 1 and "implies" in ast.dump(conds[0])


def test_guard_names_must_be_modelled(tmp_path: Path) -> None:
    """Stepping finish_lock (spec guard `drained`) from an action that ignores `drained` is a spec error."""
    spec = tmp_path / "spec"
    spec.mkdir()
    for f in SPEC.glob("*.toml"):
        (spec / f.name).write_text(f.read_text())
    text = (spec / "system.toml").read_text()
    text = text.replace("guard = 'ini[s] == \"Draining\" and entry[n][p] == \"InLocking\" and drained(n, p)'",
                        "guard = 'ini[s] == \"Draining\" and entry[n][p] == \"InLocking\"'")
    (spec / "system.toml").write_text(text)
    with pytest.raises(SpecError, match="drained"):
        load_system(spec)


def test_cli_runs_a_model_and_lists_mutants(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([str(MODELS / "fast-reliable.toml"), "--quiet"])) == 0
    out = capsys.readouterr().out
    assert "fast-reliable" in out and "states/s" in out
    assert cli.run(parser.parse_args(["--list-mutants"])) == 0
    assert "no-drain" in capsys.readouterr().out


def test_cli_violation_exits_nonzero_and_writes_json(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    target = tmp_path / "cex.json"
    args = parser.parse_args([str(MODELS / "fast-race.toml"), "--mutant", "no-drain", "--quiet",
                              "--no-liveness", "--trace-json", str(target)])
    assert cli.run(args) == 1
    assert json.loads(target.read_text())["property"] == "CleanHandover"
