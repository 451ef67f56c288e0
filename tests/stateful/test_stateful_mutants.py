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
from tests.support.stateful.world import A, B, Violation, World

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


def _locked_initiator_loses_its_channel(world: World) -> None:
    """A ponger initiator locks on LOCKED, sends TAKE, and its channel breaks before TAKEN.

    Since a pinger responder stays InLocking until TAKE (freshness, spec/handover.md
    "Authenticated signals"), the only Locked entries a failure can meet are
    initiators past LOCKED: a witness a few exact steps deep, which the
    derandomized budget does not reach. Each step is one the machine's rules take.
    """
    ref = world.punch(A)
    link = world.take(B, ref)
    assert link is not None
    world.deliver_signal(link, link.resp_node)  # LOCK: the pinger responder drains ...
    while world.sim.network.in_flight:
        world.deliver_datagram(0)
        world.check()
    world.deliver_signal(link, link.ini_node)  # ... answers LOCKED: the ponger initiator locks
    world.check()
    assert world.state(B, ref.nonce) == "Locked"
    world.break_link(link)
    world.check()


#: Known witnesses run first (as hypothesis' explicit phase would), through the same World.
EXPLICIT = {"resume-locked": _locked_initiator_loses_its_channel}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name: str) -> None:
    with MUTANTS[name](), pytest.raises(Violation) as caught:
        explicit = EXPLICIT.get(name)
        if explicit is not None:
            explicit(World(settle=False))
        run_state_machine_as_test(HandoverMachine, settings=mutant_settings())
    assert caught.value.prop in EXPECTED[name], str(caught.value)


@pytest.mark.parametrize("name", sorted(EXPLICIT))
def test_explicit_witnesses_hold_without_the_mutant(name: str) -> None:
    """The witness itself is an honest run: the unmutated runtime passes every check on it."""
    EXPLICIT[name](World(settle=False))
