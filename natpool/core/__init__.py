"""Sans-IO core: pair entries, the pool that registers them, the node that runs them with their handovers.

No sockets, clocks or loops here.
"""

from natpool.core.entry import (
    Drained,
    EntryObserver,
    EntryOutput,
    EntryStats,
    ExpiryReason,
    PairEntry,
    StateChanged,
)
from natpool.core.node import Node
from natpool.core.pool import PairPool

__all__ = [
    "Drained",
    "EntryObserver",
    "EntryOutput",
    "EntryStats",
    "ExpiryReason",
    "Node",
    "PairEntry",
    "PairPool",
    "StateChanged",
]
