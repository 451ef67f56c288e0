"""Seeded bugs applied to the RUNTIME (not to the spec): each must make the stateful test fail.

They mirror the model checker's mutants (spec/mutants.toml, same names): the
same protocol bugs, written as the code change a developer could plausibly make. Each is a
context manager that patches one runtime function and restores it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import ModuleType
from typing import Any, Final

from statemachine import State, StateMachine

import natpool.core.entry as entry_module
from natpool.core.entry import PairEntry
from natpool.core.handover import InitiatorSession, ResponderSession, Session
from natpool.core.pool import PairPool
from natpool.errors import PairBusy
from natpool.fsm import Compiled
from natpool.machines import EntryMachine
from natpool.machines.tables import ENTRY, Table


@contextmanager
def _patched(owner: type, name: str, value: object) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _entry_machine(table: Table) -> type[StateMachine]:
    """A python-statemachine class built from ``table`` - the generated EntryMachine, plus mutant rows."""
    states = {n: State(n, value=n, initial=n == table.initial, final=n in table.final) for n in table.states}
    attrs: dict[str, Any] = {f"s_{n.lower()}": s for n, s in states.items()}
    events: dict[str, Any] = {}
    for (src, event), (tgt, guard) in table.transitions.items():
        t = states[src].to(states[tgt], cond=guard) if guard else states[src].to(states[tgt])
        events[event] = events[event] | t if event in events else t
    attrs.update(events, allow_event_without_transition=False, catch_errors_as_events=False,
                 fire=EntryMachine.fire)
    return type("MutantEntryMachine", (StateMachine,), attrs)


@contextmanager
def _entry_rows(event: str, sources: tuple[str, ...], target: str) -> Iterator[None]:
    """Add transition rows to the Entry spec, as the checker's ``add_transition`` does.

    The shared table (the runtime's compiled steps *and* the trace validation) and
    the machine class the runtime runs with listeners bound both get the rows, so the runtime steps
    through them legally: only the properties can catch the bug.
    """
    rows = ENTRY.transitions
    saved = dict(rows)
    rows.update({(src, event): (target, "") for src in sources})
    try:
        with _patched_module(entry_module, "_MACHINE", Compiled(_entry_machine(ENTRY), ENTRY)):
            yield
    finally:
        rows.clear()
        rows.update(saved)


@contextmanager
def _patched_module(module: ModuleType, name: str, value: object) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def no_cas() -> AbstractContextManager[None]:
    """Lock without compare-and-swap: begin_lock also fires on an entry that is already claimed."""
    return _entry_rows("begin_lock", ("InLocking", "Locked", "InUse"), "InLocking")


def no_drain() -> AbstractContextManager[None]:
    """finish_lock without the drain: the pinger goes silent with pings still outstanding."""
    return _patched(PairEntry, "drained", property(lambda self: True))


@contextmanager
def resume_locked() -> Iterator[None]:
    """After a failed handover a Locked entry returns to Idle and resumes keepalive (Locked -> Idle)."""
    original = Session._release_entry

    def release(self: Session, now: float, gone: bool) -> None:
        entry = self.entry
        if entry is not None and entry.state == "Locked" and not gone:
            entry.abort_lock(now)  # the bug: "it is still a good pair, put it back"
            return
        original(self, now, gone)

    with _entry_rows("abort_lock", ("Locked",), "Idle"), _patched(Session, "_release_entry", release):
        yield


@contextmanager
def no_tiebreak() -> Iterator[None]:
    """No tie-break: on a LOCK for an entry its own initiator holds (still Locking), BOTH sides accept,
    and the local initiator carries on as if nothing happened."""
    accepting = False
    orig_accept = PairPool.accept_session
    orig_claim = PairPool._claim_locked

    def accept_session(self: PairPool, data: bytes, now: float, peer: str | None = None) -> ResponderSession:
        nonlocal accepting
        accepting = True
        try:
            return orig_accept(self, data, now, peer=peer)
        finally:
            accepting = False

    def claim_locked(self: PairPool, nonce: int, now: float) -> PairEntry:
        if accepting:
            entry = self._get(nonce)
            owner = self.handovers.owner(nonce)
            if entry.state == "InLocking" and isinstance(owner, InitiatorSession) and owner.state == "Locking":
                return entry  # the bug: "it is being locked anyway"
        return orig_claim(self, nonce, now)

    with ExitStack() as stack:
        stack.enter_context(_patched(PairPool, "accept_session", accept_session))
        stack.enter_context(_patched(PairPool, "_claim_locked", claim_locked))
        stack.enter_context(_patched(InitiatorSession, "lose_tie_break", lambda self, now: None))
        yield


def take_any_no_claim() -> AbstractContextManager[None]:
    """take_any that does not claim (upstream's race): two callers get the same pair.

    The checker's model lets the second caller take the still-Idle pair; in
    the runtime the first caller's session claims it at once, so the race
    shows as take_any handing out a pair that is already InLocking.
    """

    def claim_any(self: PairPool, peer: str, now: float) -> PairEntry:
        for entry in self._by_peer.get(peer, {}).values():
            if entry.state == "Idle":
                entry.begin_lock(now)
                return entry
            if entry.state == "InLocking":
                return entry  # looked Idle when we listed it
        raise PairBusy(f"no Idle pair with peer {peer!r}")

    return _patched(PairPool, "_claim_any_locked", claim_any)


def upstream() -> AbstractContextManager[None]:
    """Upstream's failure handling: a failed exchange leaves the entry as it is (claimed, owned by nobody).

    Only this part of the checker's "upstream" mutant (its NoLeak bug) is
    mirrored: the rest of that exchange (lock at once on LOCK, wait for ping
    timeouts, BUSY on both sides) is a different protocol, not a patch.
    """
    return _patched(Session, "_release_entry", lambda self, now, gone: None)


#: Mutant name (as in spec/mutants.toml, the model checker's) -> the runtime patch.
MUTANTS: Final[dict[str, Callable[[], AbstractContextManager[None]]]] = {
    "no-cas": no_cas,
    "no-drain": no_drain,
    "resume-locked": resume_locked,
    "no-tiebreak": no_tiebreak,
    "take-any-no-claim": take_any_no_claim,
    "upstream": upstream,
}
