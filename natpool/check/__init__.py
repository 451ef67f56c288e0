"""``natpool check``: an explicit-state model checker over the protocol spec.

The system model (spec/system.toml), its properties (spec/properties.toml)
and seeded bugs (spec/mutants.toml) are declarative; :mod:`compile` turns
them into Python closures that step the machine tables of spec/*.toml, and
:mod:`natpool.specgen.emit_tla` turns the same declarations into TLA+.
"""
