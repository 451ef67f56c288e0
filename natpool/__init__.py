"""natpool: a pool of NAT-traversed UDP port pairs with a model-checked handover.

The public API, in layers:

* values — :class:`Endpoint`, :class:`EndpointPair`, :class:`PairConfig`;
* the sans-IO core — :class:`PairPool`, :class:`PairEntry`, :class:`Lease`
  (time is an argument; datagrams, signals and timers are values);
* the asyncio driver — :class:`AsyncPairPool` (real UDP sockets, one scheduler);
* the signalling interface your transport implements — :class:`SignalChannel`,
  :class:`Signalling`;
* errors — :mod:`natpool.errors` (local misuse raises, remote bad input is counted).
"""

from natpool.aio.pool import AsyncPairPool
from natpool.config import PairConfig
from natpool.core import Drained, ExpiryReason, PairEntry, PairPool, StateChanged
from natpool.core.lease import Lease
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import (
    ChannelBroken,
    DropReason,
    DuplicateNonce,
    HandoverCancelled,
    HandoverError,
    HandoverTimeout,
    InvalidPair,
    InvalidSocket,
    InvalidState,
    LocalError,
    NatPoolError,
    PairBusy,
    PeerRefused,
    RemoteProtocolError,
    SignalProtocolError,
    UnknownPair,
)
from natpool.signalling import SignalChannel, Signalling

__version__ = "0.1.0"

__all__ = [
    "AsyncPairPool",
    "ChannelBroken",
    "Drained",
    "DropReason",
    "DuplicateNonce",
    "Endpoint",
    "EndpointPair",
    "ExpiryReason",
    "HandoverCancelled",
    "HandoverError",
    "HandoverTimeout",
    "InvalidPair",
    "InvalidSocket",
    "InvalidState",
    "Lease",
    "LocalError",
    "NatPoolError",
    "PairBusy",
    "PairConfig",
    "PairEntry",
    "PairPool",
    "PeerRefused",
    "RemoteProtocolError",
    "SignalChannel",
    "SignalProtocolError",
    "Signalling",
    "StateChanged",
    "UnknownPair",
]
