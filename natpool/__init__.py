"""natpool: a pool of NAT-traversed UDP port pairs with a model-checked handover.

The public API, in layers:

* values — :class:`Endpoint`, :class:`EndpointPair`, :class:`PairConfig`;
* the sans-IO core — :class:`Node` (one per node: pairs, handover sessions,
  one timer, one event queue), :class:`PairPool`, :class:`PairEntry`, :class:`Lease`
  (time is an argument; datagrams, signals and timers are values);
* the asyncio driver — :class:`AsyncPairPool` (real UDP sockets, one scheduler)
  and what it hands out: :class:`Lease` (``set_protocol``, ``remote_addr``,
  ``mapping_deadline``, ``close``), :class:`LeasedProtocol`,
  :class:`EntrySnapshot`, :class:`DriverStats`, :class:`Subscription`;
* the signalling interface your transport implements — :class:`SignalChannel`,
  :class:`Signalling`;
* errors — :mod:`natpool.errors` (local misuse raises, remote bad input is counted).
"""

from natpool.aio.pool import AsyncPairPool, DriverStats, EntrySnapshot, LeasedProtocol, Subscription, WireObserver
from natpool.config import PairConfig
from natpool.core import (
    Drained,
    EntryObserver,
    EntryOutput,
    EntryStats,
    ExpiryReason,
    Node,
    PairEntry,
    PairPool,
    StateChanged,
)
from natpool.core.handover import EntryClaims, HandoverRegistry, InitiatorSession, ResponderSession, Session
from natpool.core.lease import Lease, LeaseBuffer, LeaseOwner, Role
from natpool.core.node import (
    ApplicationData,
    CloseChannel,
    LeaseReady,
    NodeEvent,
    OpenChannel,
    SessionEnded,
    SessionStarted,
)
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import (
    BindFailed,
    ChannelBroken,
    DropReason,
    DuplicateNonce,
    HandoverCancelled,
    HandoverError,
    HandoverTimeout,
    InvalidKey,
    InvalidPair,
    InvalidSocket,
    InvalidState,
    LocalError,
    NatPoolError,
    PairBusy,
    PeerRefused,
    PoolClosed,
    RemoteProtocolError,
    SessionLimit,
    SignalProtocolError,
    UnknownPair,
)
from natpool.machines.entry import EntryEvent, EntryState
from natpool.mux import Mux, MuxChannel
from natpool.signalling import SignalChannel, Signalling

__version__ = "0.1.0"

__all__ = [
    "ApplicationData",
    "AsyncPairPool",
    "BindFailed",
    "ChannelBroken",
    "CloseChannel",
    "Drained",
    "DriverStats",
    "DropReason",
    "DuplicateNonce",
    "Endpoint",
    "EndpointPair",
    "EntryClaims",
    "EntryEvent",
    "EntryObserver",
    "EntryOutput",
    "EntrySnapshot",
    "EntryState",
    "EntryStats",
    "ExpiryReason",
    "HandoverCancelled",
    "HandoverError",
    "HandoverRegistry",
    "HandoverTimeout",
    "InitiatorSession",
    "InvalidKey",
    "InvalidPair",
    "InvalidSocket",
    "InvalidState",
    "Lease",
    "LeaseBuffer",
    "LeaseOwner",
    "LeaseReady",
    "LeasedProtocol",
    "LocalError",
    "Mux",
    "MuxChannel",
    "NatPoolError",
    "Node",
    "NodeEvent",
    "OpenChannel",
    "PairBusy",
    "PairConfig",
    "PairEntry",
    "PairPool",
    "PeerRefused",
    "PoolClosed",
    "RemoteProtocolError",
    "ResponderSession",
    "Role",
    "Session",
    "SessionEnded",
    "SessionLimit",
    "SessionStarted",
    "SignalChannel",
    "SignalProtocolError",
    "Signalling",
    "StateChanged",
    "Subscription",
    "UnknownPair",
    "WireObserver",
]
