"""Sans-IO core: pair entries and the pool that drives them. No sockets, clocks or loops here."""

from natpool.core.entry import (
    Drained,
    EntryObserver,
    EntryOutput,
    EntryStats,
    ExpiryReason,
    PairEntry,
    StateChanged,
)
from natpool.core.pool import PairPool

__all__ = [
    "Drained",
    "EntryObserver",
    "EntryOutput",
    "EntryStats",
    "ExpiryReason",
    "PairEntry",
    "PairPool",
    "StateChanged",
]
