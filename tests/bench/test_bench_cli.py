"""``natpool bench``: the sections this suite can afford (no timing assertions: benchmarks are not tests)."""

from __future__ import annotations

import json

import pytest

from natpool.bench.cli import Report, _print_table
from natpool.bench.handover import GAUGE_EVERY
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
    assert "the machine's own speed while they ran" in out and " ms in C (" in out
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


def test_bench_handover_reports_persistent_per_take_memory_and_keyed_takes_with_their_ratios(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--quick", "--json", "--only", "handover"]) == 0
    results = json.loads(capsys.readouterr().out)
    h = results["handover"]
    runs = ("handover_us", "handover_per_take_tcp_us", "handover_memory_signalling_us", "handover_keyed_us")
    for key in runs:
        assert h[key]["n"] == h["takes"] == 50  # --quick
        assert 0 < h[key]["p50"] <= h[key]["p99"]
    assert h["open_conn_2rt_us"]["n"] == 100
    for name in ("machine_probe_ms", "machine_probe_c_ms"):  # the machine's speed: pure Python, and C beside it
        probe = h[name]
        assert 0 < probe["min"] <= probe["median"] <= probe["max"] and probe["max_over_min"] >= 1.0
        # Before and after the raw exchange, after the takes, and during them every GAUGE_EVERY takes.
        assert probe["samples"] == 3 + h["takes"] // GAUGE_EVERY
    assert h["keyed_p50_vs_unkeyed"] == round(h["handover_keyed_us"]["p50"] / h["handover_us"]["p50"], 2)
    assert h["p50_vs_open_conn_2rt"] == round(h["handover_us"]["p50"] / h["open_conn_2rt_us"]["p50"], 1)
    # The deployed shape: the peer pool in a child process, against the raw exchange across the same boundary.
    assert h["handover_two_process_us"]["n"] == 50 and h["open_conn_2rt_two_process_us"]["n"] == 100
    assert 0 < h["handover_two_process_us"]["p50"] <= h["handover_two_process_us"]["p99"]
    assert h["two_process_p50_vs_open_conn_2rt"] == round(
        h["handover_two_process_us"]["p50"] / h["open_conn_2rt_two_process_us"]["p50"], 1)
    assert set(results["targets"]) == {"handover_p50_ms", "handover_p99_ms"}
    _print_table(Report(quick=True, results=results))  # the table prints the same figures (one run, not two)
    out = capsys.readouterr().out
    assert "keyed (signed)" in out and f"p50 {h['handover_keyed_us']['p50']:>9}" in out
    assert "two processes" in out and f"p50 {h['handover_two_process_us']['p50']:>9}" in out
    assert f"{h['machine_probe_c_ms']['min']}–{h['machine_probe_c_ms']['max']} ms in C" in out
