"""Mutation sanity check: with a seeded runtime bug, the stateful test must fail.

Each mutant from tests/support/stateful/mutants.py is applied to the runtime and the
same state machine runs derandomized (so CI is reproducible) under the
loaded profile's example budget, without shrinking (only *that* it fails
matters here, and shrinking is the slow part). The property that caught
it is checked, so a mutant cannot pass by crashing the harness.
"""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from natpool.resources import spec_dir
from tests.support.stateful.machine import HandoverMachine
from tests.support.stateful.mutants import MUTANTS
from tests.support.stateful.world import Violation

#: Which properties may report each mutant (the first violated one wins); the
#: checker's `expect` (spec/mutants.toml) is always among them.
EXPECTED = {
    "no-cas": {"AtomicTake"},
    "no-drain": {"CleanHandover"},
    "resume-locked": {"Symmetry"},
    "no-tiebreak": {"AtomicTake"},
    "take-any-no-claim": {"AtomicTake"},
    "upstream": {"NoLeak"},
}


def mutant_settings() -> settings:
    base = settings.default
    assert base is not None
    return settings(base, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                    max_examples=max(base.max_examples, 1000), stateful_step_count=30, print_blob=False)


def test_mutants_mirror_the_checkers() -> None:
    """Names from spec/mutants.toml, and the checker's expected property is one we accept.

    (Subset, not equality: a new checker mutant does not break CI before it is mirrored here.)
    """
    spec = tomllib.loads((spec_dir().path / "mutants.toml").read_text())
    checker = {m["name"]: set(m.get("expect", [])) for m in spec["mutant"]}
    assert set(MUTANTS) == set(EXPECTED)
    assert set(MUTANTS) <= set(checker)
    for name in MUTANTS:
        assert checker[name] <= EXPECTED[name], name


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name: str) -> None:
    with MUTANTS[name](), pytest.raises(Violation) as caught:
        run_state_machine_as_test(HandoverMachine, settings=mutant_settings())
    assert caught.value.prop in EXPECTED[name], str(caught.value)
