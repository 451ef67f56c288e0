"""Every script in examples/ runs as a user runs it (``python examples/x.py``) and shows what it claims.

Each example checks its own outcome (asserts, exit code); these tests add
that the printed summary is the one the docs describe. An example whose
optional extra is not installed is skipped, not failed: CI installs the
extras, so there they run.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HELPERS = {"loopback_pairs.py"}  # imported by the examples, not one itself
HANG_GUARD = 60.0  # seconds; a hung example fails instead of stalling CI (not a timing assertion)

pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="no examples/ here (tests run outside a checkout)")


def run_example(name: str) -> str:
    """Run it; it must exit 0 and print nothing on stderr: no log line, no unclosed socket or transport."""
    cmd = [sys.executable, "-W", "always::ResourceWarning", str(EXAMPLES / name)]
    result = subprocess.run(cmd, cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=HANG_GUARD, check=False)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr
    return result.stdout


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (its natpool extra is optional)")


def test_every_example_has_a_test() -> None:
    tested = {"quic_over_lease.py", "websocket_signalling.py", "multiplexed_signalling.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} - HELPERS == tested


def test_quic_over_a_leased_pair_echoes_both_streams() -> None:
    need("aioquic")
    out = run_example("quic_over_lease.py")
    echoed = re.findall(r"QUIC stream echoed ([\d,]+) bytes between \('127\.0\.0\.1', (\d+)\) and "
                        r"\('127\.0\.0\.1', (\d+)\)", out)
    assert [int(n.replace(",", "")) for n, _, _ in echoed] == [28, 256 * 64]
    assert len({(a, b) for _, a, b in echoed}) == 1, "both streams ran on the one leased pair"
    assert "alice initiator, bob responder" in out


def test_websocket_signalling_uses_one_connection_per_session() -> None:
    need("websockets")
    out = run_example("websocket_signalling.py")
    m = re.search(r"(\d+) handovers over (\d+) websocket connections \(bob saw (\[.*?\])\): pairs \[1, 2, 3\], "
                  r"states \['InUse'\]", out)
    assert m is not None, out
    assert m.group(1) == m.group(2) == "3"
    assert m.group(3) == str(["/natpool/alice"] * 3)
    assert "alice {'lease': 3}, bob {'lease': 3}" in out


def test_multiplexed_signalling_runs_every_session_over_one_connection() -> None:
    out = run_example("multiplexed_signalling.py")
    assert "8 handovers over 1 connection: alice took [1, 2, 3, 4], bob took [101, 102, 103, 104]" in out
    # Each side opened its own four sessions and served the peer's four, all on the one link.
    assert "sessions: alice opened 4, accepted 4; bob opened 4, accepted 4; drops: {}" in out
    assert "handover outcomes: {'lease': 16}" in out  # 8 sessions, each counted on both sides
