"""Write (or, with ``check=True``, verify) every file derived from ``spec/``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from natpool.spec.load import load_machines
from natpool.spec.model import MachineSpec
from natpool.specgen.emit_mermaid import emit_diagrams_doc, mermaid
from natpool.specgen.emit_python import emit_machine_module, emit_package_init, emit_tables_module, snake
from natpool.specgen.emit_tla import tla_outputs

Producer = Callable[[Path, dict[str, MachineSpec]], dict[Path, str]]


def _python_outputs(root: Path, machines: dict[str, MachineSpec]) -> dict[Path, str]:
    pkg = root / "natpool" / "machines"
    out = {pkg / f"{snake(m.name)}.py": emit_machine_module(m) for m in machines.values()}
    out[pkg / "tables.py"] = emit_tables_module(machines)
    out[pkg / "__init__.py"] = emit_package_init(machines)
    return out


def _replace_block(text: str, begin: str, end: str, block: str) -> str:
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        return text
    return text[:start] + block + text[stop + len(end) :]


def _diagram_outputs(root: Path, machines: dict[str, MachineSpec]) -> dict[Path, str]:
    out = {root / "spec" / "diagrams.md": emit_diagrams_doc(machines)}
    readme = root / "README.md"
    if readme.exists():
        text = readme.read_text()
        for m in machines.values():
            begin = f"<!-- BEGIN GENERATED: {m.name} diagram -->"
            end = f"<!-- END GENERATED: {m.name} diagram -->"
            block = f"{begin}\n```mermaid\n{mermaid(m).rstrip()}\n```\n{end}"
            text = _replace_block(text, begin, end, block)
        out[readme] = text
    return out


def _tla_outputs(root: Path, machines: dict[str, MachineSpec]) -> dict[Path, str]:
    # The TLA+ emitter also needs the checker's system model of spec/ (natpool.check, which reads the
    # spec through natpool.spec, never through this package: no import cycle, so no lazy import).
    return tla_outputs(root, machines)


PRODUCERS: list[Producer] = [_python_outputs, _diagram_outputs, _tla_outputs]


def expected_outputs(root: Path) -> dict[Path, str]:
    machines = load_machines(root / "spec")
    out: dict[Path, str] = {}
    for produce in PRODUCERS:
        out.update(produce(root, machines))
    return out


def generate(root: Path, check: bool = False) -> list[Path]:
    """Return the files that were (or, in check mode, would be) rewritten."""
    changed = []
    for path, content in expected_outputs(root).items():
        current = path.read_text() if path.exists() else None
        if current != content:
            changed.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
    return changed
