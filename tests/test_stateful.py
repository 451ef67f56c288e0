"""Hypothesis stateful test: the real runtime against the spec's properties and transition tables.

Two simulated pools on a manual, faulty in-memory network with manual
signalling (see tests/stateful/). Bounds scale with the loaded hypothesis
profile: ``ci`` keeps the run short; ``thorough`` runs many more, longer
programs (see CONTRIBUTING.md).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from stateful.machine import HandoverMachine


def stateful_settings() -> settings:
    """Examples and program length scaled from the loaded profile.

    ci (60) -> 480 programs of up to 50 steps (~15 s on one core);
    thorough (2000) -> 4000 programs of up to 100 steps (several minutes).
    """
    base = settings.default
    assert base is not None
    thorough = base.max_examples >= 1000
    return settings(base, max_examples=base.max_examples * (2 if thorough else 8),
                    stateful_step_count=100 if thorough else 50)


def test_runtime_satisfies_spec_properties() -> None:
    run_state_machine_as_test(HandoverMachine, settings=stateful_settings())
