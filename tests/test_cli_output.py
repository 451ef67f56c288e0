"""What the command line prints: progress, EXPECTED violations, one verdict line, plain help, errors on stderr."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from natpool.check.compile import compile_system
from natpool.check.engine import Search
from natpool.check.system import load_model, load_system
from natpool.cli import build_parser, main
from natpool.resources import models_dir

MODELS = models_dir().path
EARLY = MODELS / "fast-early-timeouts.toml"  # expects CleanHandover to fail (a broken assumption)


def test_expected_violations_are_folded_unless_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EARLY), str(MODELS / "fast-reliable.toml")]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    early = next(line for line in lines if line.startswith("[1/2] fast-early-timeouts:"))
    assert "EXPECTED CleanHandover violation" in early and "-v prints the trace" in early
    assert "step  node  action" not in out, "the expected trace is folded"
    assert any(line.startswith("[2/2] fast-reliable:") and line.endswith(": ok") for line in lines)
    assert lines[-1].startswith("verdict: OK: 2 models") and "CleanHandover in fast-early-timeouts" in lines[-1]
    assert sum(line.startswith("verdict:") for line in lines) == 1
    # progress (which model of how many) goes to stderr
    assert "[1/2] fast-early-timeouts ..." in err and "[2/2] fast-reliable ..." in err

    assert main(["check", str(EARLY), "-v", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "CleanHandover violated" in out and "step  node  action" in out and "resp_settle" in out
    assert err == ""


def test_an_unexpected_violation_prints_its_trace_and_fails(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # fast-early-timeouts without its `expect`: the same violation is now a failure.
    text = EARLY.read_text()
    assert 'expect = ["CleanHandover"]' in text
    broken = tmp_path / "unexpected.toml"
    broken.write_text(text.replace('expect = ["CleanHandover"]', "").replace('"fast-early-timeouts"', '"mine"'))
    assert main(["check", str(broken), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: CleanHandover violated" in out and "step  node  action" in out
    assert out.splitlines()[-1] == "verdict: FAIL: unexpected violation of CleanHandover in mine"


def test_a_caught_mutant_ends_with_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(MODELS / "fast-race.toml"), "--mutant", "no-drain", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "with mutant no-drain in model fast-race" in out and "caught: CleanHandover violated" in out
    assert "partial" in out, "a mutant run stops at its catch: the other properties are not proved"
    assert out.splitlines()[-1] == "verdict: mutant no-drain caught by CleanHandover (exit 1, as a seeded bug must)"


def _search(keep_going: bool) -> Search:
    system = load_system()
    s = Search(compile_system(system, load_model(EARLY, system), reduce=False), progress=None, keep_going=keep_going)
    return s


def test_a_search_past_its_first_violation_gives_every_other_property_a_full_verdict() -> None:
    full, stopped = _search(True), _search(False)
    rf, rs = full.run(), stopped.run()
    assert rf.verdicts["CleanHandover"] == rs.verdicts["CleanHandover"] == "FAIL"
    assert rs.states < rf.states, "the stopped search saw only part of the state space"
    # the same (shortest, BFS) counterexample either way
    assert [full.states[i] for i in rf.violations[0].path] == [stopped.states[i] for i in rs.violations[0].path]
    others = {p: v for p, v in rs.verdicts.items() if p != "CleanHandover" and v != "skip"}
    assert others and set(others.values()) == {"partial"}, "not 'ok': only part of the states was searched"
    assert rf.liveness_checked and {rf.verdicts[p] for p in others} == {"ok"}
    assert [v.prop for v in rf.violations] == ["CleanHandover"], "one counterexample per violated property"


def test_first_violation_flag_marks_the_rest_partial(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EARLY), "--first-violation", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "partial = not violated in the part of the state space searched" in out
    assert out.splitlines()[-1].endswith("searched only partly: fast-early-timeouts")


def test_all_mutants_ends_with_one_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    # fast-adversary catches the attack mutants (no-auth, no-peer-binding, no-freshness: issue 10)
    assert main(["check", str(MODELS / "fast-race.toml"),
                 str(MODELS / "fast-adversary.toml"), "--all-mutants", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("mutant ") for line in lines[:-1]) and "NOT CAUGHT" not in "\n".join(lines)
    assert lines[-1] == f"verdict: OK: all {len(lines) - 1} mutants caught"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out


def test_help_texts_carry_no_sphinx_markup() -> None:
    parsers = _parsers(build_parser())
    assert {p.prog for p in parsers} >= {"natpool", "natpool check", "natpool spec generate", "natpool bench"}
    for p in parsers:
        text = p.format_help()
        for markup in ("``", ":class:", ":mod:", ":func:", ":meth:"):
            assert markup not in text, f"{p.prog} --help shows {markup}"


def test_bench_reports_the_time_of_each_section(capsys: pytest.CaptureFixture[str]) -> None:
    """--quick promises a budget; each section's share is reported so a slow one is visible (never asserted)."""
    from natpool.bench.cli import QUICK_BUDGET_S

    assert f"under {QUICK_BUDGET_S} s" in " ".join(next(p for p in _parsers(build_parser())
                                                     if p.prog == "natpool bench").format_help().split())
    assert main(["bench", "--quick", "--json", "--only", "sim", "--only", "ops"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["section_s"]) == {"sim", "ops"} and all(v >= 0 for v in doc["section_s"].values())


def test_bench_runs_each_section_in_its_own_interpreter_and_keeps_its_notes(capsys: pytest.CaptureFixture[str]) -> None:
    """Two sections: each in a fresh process (its figures and notes merged), or all here with --in-process."""
    assert main(["bench", "--quick", "--json", "--only", "ops", "--only", "sim"]) == 0
    isolated = json.loads(capsys.readouterr().out)
    assert main(["bench", "--quick", "--json", "--in-process", "--only", "ops", "--only", "sim"]) == 0
    together = json.loads(capsys.readouterr().out)
    for doc in (isolated, together):
        assert doc["ops"]["pairs"] > 0 and doc["sim"]
        assert any(n.startswith("ops: take_any") for n in doc["notes"])
    assert set(isolated["ops"]) == set(together["ops"])
