"""Fixtures and policy for the real-NAT lab tests (``tests/netlab``).

* Outside CI, without root / netns / nft / conntrack, every lab test skips
  with the reason :func:`natpool.netlab.lab_unavailable_reason` gives.
* With ``CI=true`` a skipped lab test is turned into a failure (hook below):
  CI installs the tools and runs as root, so a skip there means the lab
  silently stopped testing anything.
* The slow test against the kernel's default timeouts (30 s / 120 s) with the
  default ``PairConfig`` runs only with ``NATPOOL_SLOW_NETLAB=1``; otherwise it
  is *deselected* (not skipped), so CI neither waits minutes nor counts it.
* Every lab and agent a test creates is torn down by a finalizer, whatever
  the test did (failure, timeout, KeyboardInterrupt in the body).
* Measured figures are collected with the ``figures`` fixture and printed in
  the terminal summary, so the CI log carries them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from natpool.netlab import Lab, LabConfig, lab_unavailable_reason
from natpool.netlab.client import Agent

HERE = Path(__file__).parent
SLOW_ENV = "NATPOOL_SLOW_NETLAB"
FIGURES: list[str] = []
_WALL: dict[str, float] = {}


def _in_lab(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SLOW_ENV) == "1":
        return
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (dropped if _in_lab(item) and item.get_closest_marker("slow") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (os.environ.get("CI") == "true" and _in_lab(item) and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"netlab test skipped under CI=true, which counts as a failure: {reason}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _in_lab(item) and "lab_start" not in _WALL:
        _WALL["lab_start"] = time.monotonic()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _in_lab(item):
        _WALL["lab_end"] = time.monotonic()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("netlab: measured figures")
    for line in FIGURES:
        terminalreporter.write_line(line)
    if "lab_start" in _WALL and "lab_end" in _WALL:
        terminalreporter.write_line(f"lab wall time (first lab test setup .. last teardown): "
                                    f"{_WALL['lab_end'] - _WALL['lab_start']:.1f}s")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``figures("...")`` records one measured line under the test's name for the terminal summary."""
    name = request.node.name

    def record(line: str) -> None:
        FIGURES.append(f"{name}: {line}")

    return record


@pytest.fixture
def make_lab(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Factory: ``make_lab(LabConfig(...))`` builds a lab that is always torn down after the test."""
    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(config: LabConfig | None = None) -> Lab:
        lab = Lab(config)
        labs.append(lab)
        lab.setup()
        return lab

    yield make
    errors = []
    for lab in reversed(labs):
        try:
            lab.teardown()
        except Exception as exc:
            errors.append(exc)
    assert not errors, errors


@pytest.fixture
def make_agent(make_lab: Callable[..., Lab]) -> Iterator[Callable[[Lab, str], Agent]]:
    """Factory: ``make_agent(lab, "a")`` starts an agent in host a; every agent is ended after the test.

    It depends on ``make_lab``, so agents always end before their namespaces are deleted.
    """
    agents: list[Agent] = []

    def make(lab: Lab, host: str) -> Agent:
        agent = Agent(lab, host)
        agents.append(agent)
        return agent

    yield make
    for agent in reversed(agents):
        agent.close()
