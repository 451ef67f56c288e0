"""Every script in examples/ runs as a user runs it (``python examples/x.py``) and shows what it claims.

Each example checks its own outcome (asserts, exit code); these tests add
that the printed summary is the one the docs describe. An example whose
optional extra is not installed is skipped, not failed: CI installs the
extras, so there they run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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
    # Session ids: the dialling side odd, the other even, so both open sessions at once without colliding.
    assert "alice opened [1, 3, 5, 7], bob opened [2, 4, 6, 8]" in out
    assert "drops: {}" in out
    assert "handover outcomes: {'lease': 16}" in out  # 8 sessions, each counted on both sides


def load_example(name: str) -> ModuleType:
    """Import an example as a module (examples/ is not a package; its helpers import by bare name)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def test_the_mux_drops_and_counts_bad_frames_and_opens_sessions_whatever_order_their_first_signals_take() -> None:
    mux_example = load_example("multiplexed_signalling")
    header = mux_example.HEADER
    OPEN, DATA, CLOSE = mux_example.OPEN, mux_example.DATA, mux_example.CLOSE

    async def scenario() -> tuple[dict[str, int], list[tuple[int, bytes]]]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        _, peer = await asyncio.open_connection(sock=theirs)
        served: list[tuple[int, bytes]] = []

        async def on_incoming(channel: Any) -> None:
            served.append((channel.sid, await channel.recv()))

        mux = mux_example.Mux(reader, writer, "peer", dialled=False, on_incoming=on_incoming)  # we open evens
        frames = [
            (1, OPEN, b""), (3, OPEN, b""),
            (3, DATA, b"first signal of session 3"), (1, DATA, b"first signal of session 1"),  # out of order
            (1, OPEN, b""),  # replayed OPEN: not a new session
            (2, OPEN, b""),  # an id of our own parity
            (9, DATA, b"no such session"), (7, CLOSE, b""),  # DATA is counted; a stray CLOSE is normal
            (3, 7, b""),  # unknown kind
            (3, DATA, b"x" * (mux_example.MAX_PAYLOAD + 1)),  # oversized
        ]
        peer.write(b"".join(header.pack(sid, kind, len(p)) + p for sid, kind, p in frames))
        async with asyncio.timeout(HANG_GUARD):
            while mux.frames["received"] < len(frames) or len(served) < 2:
                await asyncio.sleep(0.001)
        drops = dict(mux.drops)
        await mux.close()
        peer.close()
        return drops, served

    drops, served = asyncio.run(scenario())
    assert sorted(served) == [(1, b"first signal of session 1"), (3, b"first signal of session 3")]
    assert drops == {"frame for no open session, or malformed": 5}  # replayed OPEN, own-parity OPEN, DATA, kind, size
