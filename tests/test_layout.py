"""Import graph and test layout: no cycles, the core imports no driver, tests/ mirrors natpool/ (issue 9, item 6).

The graph is read with :mod:`ast` from every module under ``natpool/``, not
by importing, so an import that only runs inside a function, under
``TYPE_CHECKING`` or through ``importlib.import_module("natpool....")`` is an
edge too: such an import exists to dodge a cycle at import time, and the
layering is just as tangled. Edges are kept by kind (module level vs inside a
function) so a failure says which import to look at.

The suite's own layout is checked the same way (by reading, not importing):
``tests/<sub>/`` holds the tests of ``natpool/<sub>/`` and each of them imports
it, helpers live in ``tests/support/`` only, and the top level keeps only the
tests of top-level modules (``test_config.py`` for ``natpool/config.py``) and
the cross-cutting ones listed below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import natpool

ROOT = Path(natpool.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
DRIVERS = ("natpool.aio", "natpool.sim", "natpool.cli", "natpool.bench", "natpool.netlab", "natpool.demo")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    kind: str  # "module" (runs at import) or "function" (inside a def: lazy)


def module_names(root: Path, package: str = "natpool") -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                  ast.Lambda)))


def import_edges(root: Path, package: str = "natpool") -> list[Edge]:
    """Every import of a module of ``package`` by a module of ``package`` (self-imports left out)."""
    modules = module_names(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # ``from a.b import name``: name is a module or an attribute
            name = name.rpartition(".")[0]
        return name or None

    edges: list[Edge] = []
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node, in_function in _walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            for name in names:
                if name != package and not name.startswith(package + "."):
                    continue
                target = resolve(name)
                if target is not None and target != mod:
                    edges.append(Edge(mod, target, getattr(node, "lineno", 0), "function" if in_function else "module"))
    return edges


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the graph, as its edges, or None (iterative DFS: white/grey/black)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        path: list[Edge] = []
        stack: list[tuple[str, Iterator[Edge]]] = [(start, iter(graph.get(start, ())))]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            edge = next(it, None)
            if edge is None:
                colour[node] = 2
                stack.pop()
                if path:
                    path.pop()
                continue
            state = colour.get(edge.target, 0)
            if state == 1:
                # Grey nodes are the ones on the stack: the sources of ``path``, and ``node`` itself.
                first = next((i for i, e in enumerate(path) if e.source == edge.target), len(path))
                return [*path[first:], edge]
            if state == 0:
                colour[edge.target] = 1
                path.append(edge)
                stack.append((edge.target, iter(graph.get(edge.target, ()))))
    return None


def _show(cycle: list[Edge]) -> str:
    return "\n".join(f"  {e.source} -> {e.target} (line {e.line}, {e.kind}-level import)" for e in cycle)


def test_the_graph_reader_sees_module_and_function_imports() -> None:
    edges = import_edges(ROOT)
    kinds = {(e.source, e.target): e.kind for e in edges}
    assert kinds[("natpool.core.pool", "natpool.core.handover")] == "module"
    assert kinds[("natpool.demo", "natpool.netlab.demo")] == "function"
    assert kinds[("natpool.check.system", "natpool.spec.load")] == "module"
    assert not any(e.source == e.target for e in edges)


def test_the_cycle_finder_counts_a_lazy_import_as_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "fake"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fake.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f() -> None:\n    from ..a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake import a\n")
    (pkg / "d.py").write_text("import importlib\n\ndef f() -> None:\n    importlib.import_module('fake.c')\n")
    edges = import_edges(pkg, "fake")
    cycle = find_cycle(edges)
    assert cycle is not None
    assert {(e.source, e.target, e.kind) for e in cycle} == {("fake.a", "fake.sub.b", "module"),
                                                              ("fake.sub.b", "fake.a", "function")}
    assert ("fake.c", "fake.a") in {(e.source, e.target) for e in edges}  # TYPE_CHECKING imports count too
    assert ("fake.d", "fake.c", "function") in {(e.source, e.target, e.kind) for e in edges}  # import_module too
    (pkg / "sub" / "b.py").write_text("import os\n")
    assert find_cycle(import_edges(pkg, "fake")) is None


def test_no_import_cycle_in_natpool() -> None:
    edges = import_edges(ROOT)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle in natpool/:\n" + _show(cycle or [])
    # Module-level imports alone are acyclic too (implied; said separately so a failure is easy to read).
    assert find_cycle([e for e in edges if e.kind == "module"]) is None


def subpackage(module: str) -> str:
    """``natpool.check.system`` -> ``natpool.check``; a top-level module (``natpool.config``) is its own node."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_subpackages() -> None:
    """Coarser than modules: ``check/`` and ``specgen/`` once imported each other through different modules."""
    edges = [Edge(subpackage(e.source), subpackage(e.target), e.line, e.kind) for e in import_edges(ROOT)]
    cycle = find_cycle([e for e in edges if e.source != e.target and e.source != "natpool"])
    assert cycle is None, "import cycle between natpool's subpackages:\n" + _show(cycle or [])


def test_the_core_imports_no_driver() -> None:
    edges = import_edges(ROOT)
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    core = [m for m in module_names(ROOT) if m == "natpool.core" or m.startswith("natpool.core.")]
    assert "natpool.core.pool" in core and "natpool.core.handover" in core
    for start in core:  # transitively: the core must not reach a driver through a helper module either
        seen = {start}
        todo: list[tuple[str, list[Edge]]] = [(start, [])]
        while todo:
            mod, via = todo.pop()
            for e in graph.get(mod, ()):
                if e.target in seen:
                    continue
                chain = [*via, e]
                assert not any(e.target == d or e.target.startswith(d + ".") for d in DRIVERS), (
                    f"{start} reaches the driver {e.target}:\n{_show(chain)}")
                seen.add(e.target)
                todo.append((e.target, chain))


# Tests at tests/ top level that are about the whole package rather than one subpackage.
CROSS_CUTTING = {"test_readme.py", "test_public_api.py", "test_packaging.py", "test_cli_output.py", "test_layout.py",
                 "test_examples.py"}
# Directories of tests/ that mirror no subpackage, and what they hold instead.
NOT_MIRRORS = {"support": "helpers shared by the tests", "stateful": "the stateful test of the whole runtime",
               "counterexamples": "the checker's saved traces (data)"}


def natpool_subpackages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")}


def subdirectories(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "__pycache__")


def imported_natpool_subpackages(path: Path) -> set[str]:
    """``natpool.<sub>`` reached by the module: imported (at any depth), or run as ``natpool <sub>`` via the CLI."""
    tree = ast.parse(path.read_text(), str(path))
    subs: set[str] = set()
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    for name in names:
        parts = name.split(".")
        if parts[0] == "natpool" and len(parts) > 1:
            subs.add(parts[1])
    if "cli" in subs:  # cli_main(["bench", ...]) drives natpool.bench through its command
        subs |= {node.elts[0].value for node in ast.walk(tree)
                 if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant)
                 and isinstance(node.elts[0].value, str)}
    return subs


def test_no_test_module_sits_at_the_top_level_unless_cross_cutting_or_of_a_top_level_module() -> None:
    top_modules = {p.stem for p in ROOT.glob("*.py")}
    stray = [p.name for p in sorted(TESTS.glob("test_*.py"))
             if p.name not in CROSS_CUTTING and p.stem.removeprefix("test_") not in top_modules]
    assert not stray, f"move these into the tests/<sub>/ of the natpool subpackage they test: {stray}"
    assert (TESTS / "test_config.py").is_file() and "config" in top_modules  # the rule's second half is in use


def test_every_test_directory_mirrors_a_subpackage_and_is_a_package() -> None:
    subs = natpool_subpackages()
    assert {"core", "aio", "sim", "check", "wire"} <= subs
    for d in subdirectories(TESTS):
        assert d.name in subs or d.name in NOT_MIRRORS, f"tests/{d.name}/ mirrors no natpool subpackage"
        if d.name != "counterexamples":
            # Packages all the way down: pytest's prepend mode then names tests.core.test_x and tests.aio.test_x
            # apart, and ``tests.support`` imports resolve the same way for pytest, mypy and a copy of tests/.
            missing = [str(p.relative_to(TESTS)) for p in [d, *d.rglob("*")]
                       if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").is_file()]
            assert not missing, f"not packages: {missing}"
    assert (TESTS / "__init__.py").is_file()
    assert any((TESTS / "counterexamples").rglob("*.json"))


def test_every_test_module_in_a_mirror_directory_imports_its_subpackage() -> None:
    subs = natpool_subpackages()
    checked = 0
    for d in subdirectories(TESTS):
        for path in sorted(d.rglob("test_*.py")):
            reached = imported_natpool_subpackages(path)
            if d.name in subs:
                assert d.name in reached, (f"{path.relative_to(TESTS)} does not import natpool.{d.name}; "
                                           f"it imports {sorted(reached)}: move it to where it belongs")
            else:
                assert d.name == "stateful", f"{path.relative_to(TESTS)}: no tests under tests/{d.name}/"
            checked += 1
    assert checked >= 30


def test_helpers_live_in_tests_support_only() -> None:
    helpers = [str(p.relative_to(TESTS)) for p in sorted(TESTS.rglob("*.py"))
               if not p.name.startswith("test_") and p.name not in ("__init__.py", "conftest.py")
               and p.relative_to(TESTS).parts[0] != "support"]
    assert not helpers, f"move these helpers into tests/support/: {helpers}"
    assert not list((TESTS / "support").rglob("test_*.py")), "tests/support/ holds helpers, not tests"


def test_the_layout_reader_sees_imports_and_commands(tmp_path: Path) -> None:
    mod = tmp_path / "test_x.py"
    mod.write_text("import natpool.sim.clock\nfrom natpool.core import entry\nfrom natpool.cli import main\n\n"
                   "def test() -> None:\n    from natpool import wire\n    main([\"bench\", \"--quick\"])\n")
    assert imported_natpool_subpackages(mod) == {"sim", "core", "cli", "wire", "bench"}
    mod.write_text("from tests.support.aio import run\nX = ['bench']\n")
    assert imported_natpool_subpackages(mod) == set()
