"""``natpool bench``: the sections this suite can afford (no timing assertions: benchmarks are not tests)."""

from __future__ import annotations

import json

import pytest

from natpool.cli import main as cli_main


def test_bench_sim_section_reports_the_virtual_to_wall_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--quick", "--json", "--only", "sim"]) == 0
    sim = json.loads(capsys.readouterr().out)["sim"]["100"]
    assert sim["pairs"] == 100 and sim["virtual_s"] == 60.0
    assert sim["datagrams"] > 0 and sim["virtual_per_wall"] > 0


def test_bench_ops_reports_the_lock_hold_time_of_take_any(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--quick", "--only", "ops", "--only", "sim"]) == 0
    out = capsys.readouterr().out
    assert "take_any holds the pool lock" in out
    assert "x real time" in out
