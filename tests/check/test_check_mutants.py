"""Every seeded bug in spec/mutants.toml is caught by the property it names, with a readable trace."""

from __future__ import annotations

import pytest

from natpool.check.compile import compile_system
from natpool.check.engine import Search
from natpool.check.system import list_models, load_model, load_mutants, load_system
from natpool.check.trace import render, to_json

MUTANTS = load_mutants()


def test_the_required_mutants_exist() -> None:
    assert {"no-cas", "no-drain", "resume-locked", "no-tiebreak", "take-any-no-claim", "upstream"} <= set(MUTANTS)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name: str) -> None:
    system = load_system(mutant=name)
    caught: set[str] = set()
    for path in sorted(list_models("fast"), key=lambda p: p.stem != "fast-race"):  # the quickest catcher first
        model = load_model(path, system)
        if model.expect:
            continue
        search = Search(compile_system(system, model, reduce=True), liveness=False, progress=None)
        result = search.run()
        for v in result.violations:
            caught.add(v.prop)
            text = render(to_json(search, v), search.cs)
            assert f"{v.prop} violated" in text and f"mutant {name}" in text
        if caught:
            break
    assert caught, f"mutant {name} was not caught by any fast model"
    assert set(MUTANTS[name].expect) <= caught, f"{name}: expected {MUTANTS[name].expect}, got {caught}"
