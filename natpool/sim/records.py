"""What the simulator records: every datagram sent, and every one delivered to an owner.

Later properties (StrictSilence, CleanHandover) are checked against these
logs after a run, so each record carries the entry state *at that moment*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from natpool.errors import RemoteProtocolError
from natpool.wire.frame import Kind, decode
from natpool.wire.keepalive import KEYED_FRAME_SIZE, VERSION

Addr = tuple[str, int]
FrameKind = Literal["ping", "pong", "garbage"]

#: Sender of datagrams injected by a test rather than sent by a pool.
INJECTED = "<injected>"


_KIND_CACHE: dict[bytes, FrameKind] = {}
_KIND_CACHE_MAX = 1 << 16


def frame_kind(data: bytes) -> FrameKind:
    """Classify a datagram as the codec would: anything it rejects is garbage.

    A keyed frame (natpool.wire.keepalive) is classified by its shape alone
    (the log has no keys): a forged one counts as a ping/pong too, which is
    what CleanHandover's "no keepalive frame reaches a handed-over pair" needs.
    Memoised: a pair sends the same two 9-byte frames over and over, and the
    log classifies every one of them.
    """
    kind = _KIND_CACHE.get(data)
    if kind is not None:
        return kind
    if len(data) == KEYED_FRAME_SIZE and data[0] == VERSION and data[1] <= 1:
        kind = "ping" if data[1] == Kind.PING else "pong"
    else:
        try:
            frame = decode(data)
        except RemoteProtocolError:
            kind = "garbage"
        else:
            kind = "ping" if frame.kind is Kind.PING else "pong"
    if len(_KIND_CACHE) >= _KIND_CACHE_MAX:
        _KIND_CACHE.clear()
    _KIND_CACHE[bytes(data)] = kind
    return kind


@dataclass(frozen=True, slots=True)
class SentDatagram:
    """One datagram handed to the network.

    ``nonce`` is the sending entry's (0 for injected datagrams); ``state`` is
    the sending entry's lifecycle state right after it produced the datagram
    (None if injected). ``id`` matches :attr:`natpool.sim.network.InFlight.id`.
    """

    time: float
    sender: str
    nonce: int
    kind: FrameKind
    state: str | None
    src: Addr
    dst: Addr
    id: int


@dataclass(frozen=True, slots=True)
class DeliveredDatagram:
    """One datagram that reached a bound address; ``state`` is the receiving entry's state before it was handled."""

    time: float
    receiver: str
    nonce: int
    kind: FrameKind
    state: str | None
    src: Addr
    dst: Addr


@dataclass(frozen=True, slots=True)
class SentSignal:
    """One message handed to a signalling channel end (:attr:`natpool.sim.SimSignalling.log`).

    Logged as sent, before any :attr:`~natpool.sim.signalling.Channel.intercept`
    hook rewrites it, so tests can assert the protocol's own message
    sequence; ``accepted`` is False when the end or the channel was already
    closed (the message was lost at once). ``injected`` marks a message a test
    forged with :meth:`~natpool.sim.SimSignalling.inject`.
    """

    time: float
    channel: int
    sender: str
    data: bytes
    accepted: bool
    injected: bool = False
