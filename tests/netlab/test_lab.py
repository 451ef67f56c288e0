"""The lab's own hygiene: parsing, teardown after a failure, stale cleanup, parallel labs never collide."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from natpool.netlab import Lab, LabConfig, LabError
from natpool.netlab.agent import punch
from natpool.netlab.client import Agent
from natpool.netlab.lab import PREFIX, cleanup_stale, list_namespaces, parse_conntrack

SAMPLE = """\
udp      17 29 src=10.0.1.2 dst=198.19.0.2 sport=40000 dport=40001 [UNREPLIED] src=198.19.0.2 dst=198.18.0.1 \
sport=40001 dport=40000 mark=0 use=1
udp      17 117 src=10.0.1.2 dst=198.19.0.2 sport=40002 dport=40003 src=198.19.0.2 dst=198.18.0.1 sport=40003 \
dport=40002 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.1.1 sport=1 dport=2 src=10.0.1.1 dst=10.0.1.2 sport=2 dport=1
"""


def test_parse_conntrack_reads_tuples_timeouts_and_flags() -> None:
    """``conntrack -L`` lines: UDP only, both tuples, seconds left, UNREPLIED / ASSURED (no root needed)."""
    young, assured = parse_conntrack(SAMPLE)
    assert young.orig == ("10.0.1.2", "198.19.0.2", 40000, 40001)
    assert young.reply == ("198.19.0.2", "198.18.0.1", 40001, 40000)
    assert (young.timeout, young.unreplied, young.assured) == (29, True, False)
    assert (assured.timeout, assured.unreplied, assured.assured) == (117, False, True)


def _ours(lab: Lab) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(lab.prefix + "-")]


def test_teardown_runs_after_a_failure_and_leaves_nothing(make_lab: Callable[..., Lab]) -> None:
    """An exception inside ``with Lab()`` (with an agent running in it) still removes namespaces and processes."""
    lab = Lab(LabConfig())
    pid = 0
    with pytest.raises(RuntimeError, match="boom"), lab:
        assert len(_ours(lab)) == 4
        agent = Agent(lab, "a")  # deliberately not closed: teardown must kill it
        pid = agent.pid
        raise RuntimeError("boom")
    assert _ours(lab) == []
    assert agent.wait(5.0) == -signal.SIGKILL, f"agent {pid} was not killed by the teardown"
    lab.teardown()  # idempotent
    agent.close()


def test_stale_namespaces_of_dead_runs_are_removed_live_ones_kept(make_lab: Callable[..., Lab]) -> None:
    """A namespace tagged with a dead pid is cleaned up at the next start; a live lab's is never touched."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}n1-ha"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    live = make_lab(LabConfig())
    try:
        assert stale not in list_namespaces(), "setup did not clean the dead run's namespace"
        assert cleanup_stale() == []
        assert len(_ours(live)) == 4
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)


def test_two_labs_at_once_do_not_collide(make_lab: Callable[..., Lab]) -> None:
    """Names are unique per lab (pid + counter) and veths live only inside them, so labs coexist."""
    one, two = make_lab(LabConfig()), make_lab(LabConfig())
    assert one.prefix != two.prefix and len(_ours(one)) == len(_ours(two)) == 4
    # Same addresses in both; a datagram in lab one shows up only in lab one's router.
    send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.0.1.2', 40999)); "
            f"s.sendto(b'x', ('{one.public_addr('b')}', 40998))")
    one.exec("ha", sys.executable, "-c", send)
    assert one.mapping("a", 40999) is not None
    assert two.mapping("a", 40999) is None and two.conntrack("a") == []
    for lab in (one, two):
        assert lab.timeouts("a") == {"net.netfilter.nf_conntrack_udp_timeout": 6,
                                     "net.netfilter.nf_conntrack_udp_timeout_stream": 6}
    two.teardown()
    assert _ours(two) == [] and len(_ours(one)) == 4
    with pytest.raises(LabError):
        two.exec("ha", "true")


def test_punch_completes_between_two_loopback_sockets() -> None:
    """The agent's simultaneous-open punch on loopback (no NAT, no root): both sides done, nothing foreign seen."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        addrs = [s.getsockname() for s in socks]
        results: list[dict[str, Any]] = [{}, {}]

        def run(i: int) -> None:
            results[i] = punch(socks[i], addrs[1 - i], timeout=5.0, interval=0.02)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
        assert [r["done"] for r in results] == [True, True], results
        assert all(r["heard"] and r["seen_from"] == [] and r["sent"] >= 1 for r in results), results
    finally:
        for s in socks:
            s.close()
