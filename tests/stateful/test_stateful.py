"""Hypothesis stateful test: the real runtime against the spec's properties and transition tables.

Two simulated pools on a manual, faulty in-memory network with manual
signalling (see tests/support/stateful/). Bounds scale with the loaded hypothesis
profile: ``ci`` keeps the run short; ``thorough`` runs many more, longer
programs (see CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import ClassVar

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from natpool.machines.tables import TABLES
from tests.support.stateful.machine import HandoverMachine


def stateful_runs() -> tuple[settings, int]:
    """Settings for one run and how many runs, scaled from the loaded profile.

    ci (60, derandomized) -> one run of 480 programs of up to 50 steps (~20 s);
    thorough (2000) -> 4 runs of 2000 programs of up to 100 steps. Hypothesis
    keeps per-example data for a whole run (~0.4 MB per long program), so
    the thorough budget is split into runs to bound memory; splitting only
    makes sense when runs are random, so a derandomized profile gets one run.
    """
    base = settings.default
    assert base is not None
    if base.max_examples >= 1000:
        runs = 1 if base.derandomize else 4
        return settings(base, max_examples=base.max_examples * 4 // runs, stateful_step_count=100), runs
    return settings(base, max_examples=base.max_examples * 8, stateful_step_count=50), 1


#: Transitions the runtime cannot take by construction: a session fires its
#: first event (send_lock / accept / refuse) in its constructor.
UNREACHABLE = {("Initiator", "Start", "fail"), ("Responder", "Start", "fail")}
#: Rare ones (need a removal or expiry exactly during settle); reported, not required.
RARE = {("Initiator", "Settling", "fail"), ("Responder", "Settling", "fail"), ("Initiator", "Draining", "fail")}


class CoverageMachine(HandoverMachine):
    """Records which spec transitions the runtime took, so a blind run cannot pass silently."""

    seen: ClassVar[set[tuple[str, str, str]]] = set()
    programs: ClassVar[int] = 0
    transitions: ClassVar[int] = 0

    def teardown(self) -> None:
        super().teardown()
        CoverageMachine.seen.update((s.machine, s.source, s.event) for s in self.world.steps)
        CoverageMachine.programs += 1
        CoverageMachine.transitions += len(self.world.steps)


def test_runtime_satisfies_spec_properties() -> None:
    run_settings, runs = stateful_runs()
    CoverageMachine.seen = set()
    CoverageMachine.programs = CoverageMachine.transitions = 0
    every = {(m, src, ev) for m, table in TABLES.items() for (src, ev) in table.transitions}
    for _ in range(runs):
        run_state_machine_as_test(CoverageMachine, settings=run_settings)
    missing = every - CoverageMachine.seen - UNREACHABLE - RARE
    # A random profile (the default ``dev``) may miss a rare transition in one run: it gets up to three more
    # before the check fails, so the check stays a real one without making the plain `pytest` flaky. The
    # derandomized ``ci`` profile is deterministic: its one run must cover everything.
    extra = 0 if settings.default is None or settings.default.derandomize else 3
    while missing and extra:
        extra -= 1
        run_state_machine_as_test(CoverageMachine, settings=run_settings)
        missing = every - CoverageMachine.seen - UNREACHABLE - RARE
    # Shown with `pytest -s`: what a run covered (the thorough numbers go in reports).
    print(f"\nstateful: {CoverageMachine.programs} programs, {CoverageMachine.transitions} runtime transitions, "
          f"{len(CoverageMachine.seen)} distinct spec transitions")
    assert not missing, f"the stateful run never exercised {sorted(missing)}"
