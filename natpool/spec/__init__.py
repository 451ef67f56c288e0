"""The protocol spec as objects: ``spec/*.toml`` read into :class:`MachineSpec` values.

Its own package, below both users: the generator (:mod:`natpool.specgen`)
emits code from these objects, and the model checker (:mod:`natpool.check`)
builds its system from them; the TLA+ emitter needs the checker in turn. With
the loader inside ``specgen`` the two packages imported each other.
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
