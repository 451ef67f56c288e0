"""Read the protocol spec in ``spec/`` and emit everything derived from it.

The spec is the single source of truth: python-statemachine classes, the
transition tables the model checker explores, mermaid diagrams and the TLA+
module are all generated from it, and ``natpool spec generate --check`` fails
when any generated file is stale. The spec's objects and their loader live
in :mod:`natpool.spec` (shared with the model checker); they are re-exported
here as before.
"""

from natpool.spec.load import default_spec_dir, load_machine, load_machines
from natpool.spec.model import Guard, MachineSpec, SpecError, Transition

__all__ = [
    "Guard",
    "MachineSpec",
    "SpecError",
    "Transition",
    "default_spec_dir",
    "load_machine",
    "load_machines",
]
