"""The spec's named properties (spec/properties.toml) as predicates over runtime observations.

The model checker evaluates the formulas of ``spec/properties.toml`` over
its abstract state; the runtime tests (``tests/stateful/``) observe
real pools and sessions. Both must mean the same thing, so the per-pair,
per-step predicates live here, phrased over entry *state names* and counts
the runtime can observe, with the state sets taken from the generated
tables (never restated by hand).
"""

from __future__ import annotations

from typing import Final

from natpool.machines.tables import ENTRY, TABLES

#: Property names, exactly as declared in spec/properties.toml.
ATOMIC_TAKE: Final = "AtomicTake"
STRICT_SILENCE: Final = "StrictSilence"
CLEAN_HANDOVER: Final = "CleanHandover"
SYMMETRY: Final = "Symmetry"
NO_LEAK: Final = "NoLeak"
#: The bounded-liveness checks mirror these spec properties (TakeReturns,
#: LockEnds, SessionEnds); "Liveness" groups them as the issue does.
LIVENESS: Final = "Liveness"
LIVENESS_PARTS: Final = ("TakeReturns", "LockEnds", "SessionEnds")
#: Not a spec property: a runtime transition the spec's tables do not allow,
#: or a runtime state that differs from the last transition it recorded.
TRACE: Final = "SpecTrace"

SILENT: Final = ENTRY.sets["silent"]
#: A peer of an InUse side must be in one of these (or absent, i.e. Expired).
PEER_OF_IN_USE: Final = frozenset({"Locked", "InUse", "Expired"})
#: Claimed but not yet handed out: must always be owned by a live session.
HELD: Final = frozenset({"InLocking", "Locked"})
IN_USE: Final = "InUse"
ABSENT: Final = "Expired"  # an entry no longer in the pool counts as Expired (spec/system.toml)


def atomic_take(handed: int, holders: int) -> bool:
    """AtomicTake for one (node, pair): handed out at most once ever, at most one live holder now."""
    return handed <= 1 and holders <= 1


def strict_silence(sender_state: str | None) -> bool:
    """StrictSilence for one sent keepalive frame: its sender entry was not in a silent state.

    ``None`` means the datagram was injected by a test, not sent by an entry.
    """
    return sender_state is None or sender_state not in SILENT


def clean_handover(source: str, target: str, frames_in_flight: int) -> bool:
    """CleanHandover on one Entry step: entering InUse with no keepalive frame of the pair in flight."""
    return not (source != IN_USE and target == IN_USE) or frames_in_flight == 0


def symmetry(state: str | None, peer_state: str | None) -> bool:
    """Symmetry (state part): if this side is InUse, the peer is Locked, InUse or Expired/absent."""
    return state != IN_USE or (peer_state if peer_state is not None else ABSENT) in PEER_OF_IN_USE


def symmetry_step(before: str | None, after: str | None) -> bool:
    """Symmetry (action part): a Locked entry never becomes Idle."""
    return not (before == "Locked" and after == ENTRY.initial)


def no_leak(state: str | None, owned_by_live_session: bool) -> bool:
    """NoLeak: an InLocking/Locked entry is owned by a live session role on its node."""
    return state not in HELD or owned_by_live_session


def stuck(state: str | None) -> bool:
    """LockEnds at quiescence: after healing and running time on, nothing may stay InLocking/Locked."""
    return state in HELD


def spec_allows(machine: str, source: str, event: str, target: str) -> bool:
    """The spec's transition relation: ``machine`` may step ``source --event--> target``."""
    return TABLES[machine].step(source, event) == target
