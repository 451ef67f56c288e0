"""Seeded bugs applied to the RUNTIME (not to the spec): each must make the stateful test fail.

They mirror the model checker's mutants (issue 3): the same protocol bugs,
written as the code change a developer could plausibly make. Each is a
context manager that patches one runtime function and restores it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final

from natpool.core.entry import PairEntry
from natpool.core.handover import InitiatorSession, Session
from natpool.core.pool import PairPool
from natpool.errors import PairBusy


@contextmanager
def _patched(owner: type, name: str, value: object) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def no_cas() -> AbstractContextManager[None]:
    """Lock without compare-and-swap: begin_lock claims whatever state the entry is in."""
    original = PairEntry.begin_lock

    def begin_lock(self: PairEntry, now: float) -> bool:
        if self.state in ("InLocking", "Locked"):
            return True  # "already being locked - fine, go ahead"
        return original(self, now)

    return _patched(PairEntry, "begin_lock", begin_lock)


def no_drain() -> AbstractContextManager[None]:
    """finish_lock without the drain: the pinger goes silent with pings still outstanding."""
    return _patched(PairEntry, "drained", property(lambda self: True))


def locked_to_idle() -> AbstractContextManager[None]:
    """Resume keepalive on a Locked pair after a failed handover (Locked -> Idle, around the machine)."""
    original = Session._release_entry

    def release(self: Session, now: float, gone: bool) -> None:
        entry = self.entry
        if entry is not None and entry.state == "Locked" and not gone:
            entry.state = "Idle"  # the bug: "it is still a good pair, put it back"
            entry.last_seen = now
            entry.handle_timer(now)
            return
        original(self, now, gone)

    return _patched(Session, "_release_entry", release)


def no_tie_break() -> AbstractContextManager[None]:
    """No tie-break on simultaneous takes: the local initiator keeps going while the responder takes over."""
    return _patched(InitiatorSession, "lose_tie_break", lambda self, now: None)


def take_any_no_claim() -> AbstractContextManager[None]:
    """take_any that does not claim (the upstream race): it returns a pair another taker already claimed."""

    def claim_any(self: PairPool, peer: str, now: float) -> PairEntry:
        for entry in self._by_peer.get(peer, {}).values():
            if entry.state == "Idle":
                entry.begin_lock(now)
                return entry
            if entry.state == "InLocking":
                return entry  # looked Idle when we listed it
        raise PairBusy(f"no Idle pair with peer {peer!r}")

    return _patched(PairPool, "_claim_any_locked", claim_any)


#: Mutant name (as in the model checker, issue 3) -> the runtime patch.
MUTANTS: Final[dict[str, Callable[[], AbstractContextManager[None]]]] = {
    "no-cas": no_cas,
    "no-drain": no_drain,
    "locked-to-idle": locked_to_idle,
    "no-tie-break": no_tie_break,
    "take-any-no-claim": take_any_no_claim,
}
