"""In-memory form of a machine declared in ``spec/<machine>.toml``."""

from __future__ import annotations

from dataclasses import dataclass, field


class SpecError(ValueError):
    """The spec is inconsistent (unknown state, missing guard, ...)."""


@dataclass(frozen=True)
class Guard:
    name: str
    formula: str
    why: str


@dataclass(frozen=True)
class Transition:
    event: str
    source: tuple[str, ...]
    target: str
    guard: str  # "" when unguarded
    why: str


@dataclass(frozen=True)
class MachineSpec:
    name: str
    doc: str
    states: tuple[str, ...]
    initial: str
    final: frozenset[str]
    sets: dict[str, frozenset[str]]
    transitions: tuple[Transition, ...]
    guards: dict[str, Guard]
    source_file: str = ""
    source_sha256: str = ""
    _table: dict[tuple[str, str], Transition] = field(default_factory=dict, repr=False)

    @property
    def events(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for t in self.transitions:
            seen.setdefault(t.event, None)
        return tuple(seen)

    def table(self) -> dict[tuple[str, str], Transition]:
        """``(source_state, event) -> Transition``; the relation the checker explores."""
        if not self._table:
            for t in self.transitions:
                for s in t.source:
                    self._table[(s, t.event)] = t
        return self._table

    def step(self, state: str, event: str) -> str | None:
        """Target of ``event`` in ``state``, or None when the spec forbids it."""
        t = self.table().get((state, event))
        return None if t is None else t.target
