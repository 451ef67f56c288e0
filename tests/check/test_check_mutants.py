"""Every seeded bug in spec/mutants.toml is caught by the property it names, with a readable trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from natpool.check.compile import compile_system
from natpool.check.engine import Search
from natpool.check.system import list_models, load_model, load_mutants, load_system
from natpool.check.trace import render, to_json

MUTANTS = load_mutants()


def test_the_required_mutants_exist() -> None:
    assert {"no-cas", "no-drain", "resume-locked", "no-tiebreak", "take-any-no-claim", "upstream",
            "no-auth", "no-peer-binding", "no-freshness"} <= set(MUTANTS)


def _order(path: Path) -> tuple[bool, bool, str]:
    """The quickest catchers first: fast-race for the protocol mutants, the adversary models for the attacks."""
    return (path.stem != "fast-race", not path.stem.startswith("fast-adversary"), path.stem)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name: str) -> None:
    """Every property the mutant names is violated in some fast model (liveness ones need the unreduced graph)."""
    system = load_system(mutant=name)
    stuck = {p.name for p in system.properties if p.stuck is not None}
    expect = set(MUTANTS[name].expect)
    live = bool(expect & stuck)
    caught: set[str] = set()
    for path in sorted(list_models("fast"), key=_order):
        model = load_model(path, system)
        if model.expect:
            continue
        search = Search(compile_system(system, model, reduce=not live), liveness=live, progress=None,
                        keep_going=live)
        result = search.run()
        for v in result.violations:
            caught.add(v.prop)
            text = render(to_json(search, v), search.cs)
            assert f"{v.prop} violated" in text and f"mutant {name}" in text
            if v.kind == "liveness":
                assert "repeat forever under weak fairness" in text
        if caught and (not live or expect <= caught):
            break
    assert caught, f"mutant {name} was not caught by any fast model"
    assert set(MUTANTS[name].expect) <= caught, f"{name}: expected {MUTANTS[name].expect}, got {caught}"
