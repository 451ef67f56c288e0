"""The TLA+ export is fresh, parses, and names every checker action and property."""

from __future__ import annotations

from pathlib import Path

import pytest

from natpool.check.compile import compile_system
from natpool.check.engine import Search
from natpool.check.system import list_models, load_model, load_system
from natpool.resources import spec_dir
from natpool.specgen import load_machines
from natpool.specgen.emit_tla import MODULE, action_op, property_ops, tla_outputs

# The directory holding spec/ and models/: the checkout, or natpool/_data of an installed wheel (which ships the
# committed spec/tla/ too, so the freshness test compares the same files either way).
ROOT = spec_dir().path.parent


@pytest.fixture(scope="module")
def outputs() -> dict[Path, str]:
    return tla_outputs(ROOT, load_machines(ROOT / "spec"))


def test_module_is_committed_and_fresh(outputs: dict[Path, str]) -> None:
    for path, text in outputs.items():
        assert path.read_text() == text, f"{path} is stale: run `natpool spec generate`"


def test_module_extends_only_standard_modules(outputs: dict[Path, str]) -> None:
    text = outputs[ROOT / "spec" / "tla" / f"{MODULE}.tla"]
    extends = next(line for line in text.splitlines() if line.startswith("EXTENDS"))
    assert set(extends.removeprefix("EXTENDS ").split(", ")) <= {"Integers", "Naturals", "Sequences", "FiniteSets",
                                                                "TLC"}


def test_module_parses_as_tla(outputs: dict[Path, str]) -> None:
    tla = pytest.importorskip("tla")
    tla.parse(outputs[ROOT / "spec" / "tla" / f"{MODULE}.tla"])


def test_every_action_and_property_is_exported(outputs: dict[Path, str]) -> None:
    text = outputs[ROOT / "spec" / "tla" / f"{MODULE}.tla"]
    system = load_system()
    next_block = text[text.index("Next ==") : text.index("Fairness ==")]
    for a in system.actions:
        assert f"\n{action_op(a)}" in text
        assert action_op(a) in next_block
        if a.is_fair:
            assert "WF_vars(" in text and f"{action_op(a)}(" in text[text.index("Fairness ==") :]
    for p in system.properties:
        for op in property_ops(p).values():
            assert f"\n{op} ==" in text


def test_one_cfg_per_model_with_its_applicable_properties(outputs: dict[Path, str]) -> None:
    system = load_system()
    for path in list_models(None):
        model = load_model(path, system)
        cfg = outputs[ROOT / "spec" / "tla" / f"{model.name}.cfg"]
        assert "SPECIFICATION Spec" in cfg and "CHECK_DEADLOCK TRUE" in cfg
        for k, v in model.constants.items():
            assert f"{k} = {('TRUE' if v else 'FALSE') if isinstance(v, bool) else v}" in cfg
        assert "AtomicTake" in cfg and "StrictSilence" in cfg
        assert ("ReliableSuccess" in cfg) == (model.name == "fast-reliable")


EQUIV_MODELS = {
    # (base model, replacements): small enough for the slow reference interpreter
    "reliable": ("fast-reliable.toml", {}),
    "dup-breaks-timeouts": ("fast-dup.toml", {"T1 = 1": "T1 = 0", "breaks = false": "breaks = true",
                                              "lock_timeouts = false": "lock_timeouts = true", "B = 3": "B = 2"}),
    "race-no-loss": ("fast-race.toml", {"B = 2": "B = 1", "loss = true": "loss = false",
                                        "remove = true": "remove = false"}),
    # the adversary (auth on): rogue sessions, the expiry timer, recorded signals
    "adversary": ("fast-adversary.toml", {"B = 2": "B = 1", "loss = true": "loss = false",
                                          "breaks = true": "breaks = false"}),
}


@pytest.mark.parametrize("name", sorted(EQUIV_MODELS))
def test_tla_module_explores_the_same_graph_as_the_checker(name: str, tmp_path: Path,
                                                          outputs: dict[Path, str]) -> None:
    """Independent path: generated TLA+ text -> `tla` parser -> tests/support/tla_mini.py evaluator.

    Same reachable states, same successors of every state, same invariant and
    Terminal values: the exported module is the model `natpool check` explores
    (with reductions off, TLC must report the same number of distinct states).
    """
    pytest.importorskip("tla")
    from tests.support.tla_mini import Module, explore

    base, repl = EQUIV_MODELS[name]
    text = (ROOT / "models" / base).read_text()
    for old, new in repl.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    system = load_system()
    model = load_model(path, system)
    search = Search(compile_system(system, model, reduce=False), liveness=True, progress=None)
    result = search.run()
    assert result.complete and not result.violations
    mod = Module(outputs[ROOT / "spec" / "tla" / f"{MODULE}.tla"], dict(model.constants))
    states, graph = explore(mod)
    assert states == set(search.states)
    assert len(states) == result.states
    for i, st in enumerate(search.states):
        succ = {search.states[j] for j in search.succ[search.off[i]:search.off[i + 1]]}
        assert graph[st] == succ
    cs = search.cs
    for st in search.states[:: max(1, len(search.states) // 200)]:
        env = dict(zip(cs.variables, st, strict=True))
        assert mod.holds("Terminal", env) == cs.terminal(st)
        for p, fn in cs.invariants:
            assert mod.holds(p.name, env) == (fn(st) is None)


def test_operators_are_defined_before_use(outputs: dict[Path, str]) -> None:
    """SANY rejects a forward reference, which a parser alone does not."""
    tla = pytest.importorskip("tla")
    tree = tla.parse(outputs[ROOT / "spec" / "tla" / f"{MODULE}.tla"])
    units = [u for u in tree.units if type(u).__name__ == "OperatorDefinition"]
    names = {u.name for u in units}
    defined: set[str] = set()

    def used(node: object, out: set[str]) -> None:
        if hasattr(node, "_fields"):
            if type(node).__name__ == "OperatorApplication":
                out.add(node.operator)  # type: ignore[attr-defined]
            for f in node._fields:
                used(getattr(node, f), out)
        elif isinstance(node, list | tuple):
            for x in node:
                used(x, out)

    for u in units:
        refs: set[str] = set()
        used(u.definiens, refs)
        forward = (refs & names) - defined - {u.name}
        assert not forward, f"{u.name} uses {sorted(forward)} before their definition"
        defined.add(u.name)
