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


def test_bench_survival_section_reports_alive_fractions_against_the_old_defaults(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--quick", "--json", "--only", "survival"]) == 0
    fig = json.loads(capsys.readouterr().out)["survival"]
    assert fig["seeds"] == 10 and fig["virtual_s"] == 180.0  # --quick
    assert set(fig["configs"]) == {"defaults", "baseline"}
    for row in fig["configs"].values():
        assert list(row["by_loss"]) == ["0.1", "0.3", "0.5"]
        for cell in row["by_loss"].values():
            assert 0 <= cell["alive"] <= cell["seeds"] == 10
            assert (cell["first_expiry_median_s"] is None) == (cell["alive"] == cell["seeds"])
    at30 = {name: row["by_loss"]["0.3"]["alive"] for name, row in fig["configs"].items()}
    assert at30["defaults"] > at30["baseline"]
    assert fig["target"]["met"] == (fig["target"]["value"] >= 0.99)
    assert cli_main(["bench", "--quick", "--only", "survival"]) == 0
    assert "keepalive survival under random loss" in capsys.readouterr().out
