"""Handover signals (spec/handover.md): a strict, fixed-size binary codec.

Layout, big-endian, every field fixed so a decoder never allocates on
attacker-controlled lengths::

    0   1 byte   VERSION_BYTE (0x91: magic 0x9 in the high nibble, version 1)
    1   1 byte   type (SignalType)
    2   8 bytes  pair nonce (non-zero)
    10  16 bytes session id, chosen at random by the initiator (non-zero)
    26  4 bytes  sequence number of this message in its direction, from 1
    30  1 byte   ABORT only: reason (AbortReason)

LOCK/LOCKED/BUSY/TAKE/TAKEN are exactly 30 bytes, ABORT exactly 31. Inputs
longer than :data:`MAX_SIGNAL_SIZE` raise ``OVERSIZED`` before any parsing;
every other deviation raises ``MALFORMED``. The codec checks *form* only;
whether a well-formed signal is expected (state, session, nonce, sequence)
is the session's business. (A session accepts ABORT whatever its sequence
number: see spec/handover.md, "Sequence numbers, and why ABORT ignores them".)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from natpool.endpoints import NONCE_MAX
from natpool.errors import DropReason, RemoteProtocolError

VERSION_BYTE = 0x91
SID_SIZE = 16
SEQ_MAX = (1 << 32) - 1
_HEAD = struct.Struct("!BBQ16sI")
BASE_SIZE = _HEAD.size  # 30
ABORT_SIZE = BASE_SIZE + 1
MAX_SIGNAL_SIZE = 64  # anything longer is rejected unread


class SignalType(enum.IntEnum):
    LOCK = 1
    LOCKED = 2
    BUSY = 3
    TAKE = 4
    TAKEN = 5
    ABORT = 6


class AbortReason(enum.IntEnum):
    """Why a side gave up; tells the peer how to treat its entry (rule 6)."""

    UNKNOWN_PAIR = 1  # responder has no such nonce: the initiator expires its entry (PEER_GONE)
    TIMEOUT = 2  # lock_timeout elapsed
    PROTOCOL = 3  # the peer's signal was malformed, unexpected, replayed or mismatched
    CANCELLED = 4  # local close / shutdown
    ENTRY_GONE = 5  # the local entry expired (no inbound, send failures, removed)


#: Byte -> member, a dict lookup instead of the enum constructor's call chain (decoding is per signal).
_TYPES: dict[int, SignalType] = {int(t): t for t in SignalType}
_REASONS: dict[int, AbortReason] = {int(r): r for r in AbortReason}


@dataclass(frozen=True, slots=True)
class Signal:
    type: SignalType
    nonce: int
    sid: bytes
    seq: int
    reason: AbortReason | None = None

    def __post_init__(self) -> None:
        # Local construction errors are bugs, not remote input: fail loudly.
        if not 0 < self.nonce <= NONCE_MAX:
            raise ValueError(f"nonce {self.nonce} outside 1..2**64-1")
        if len(self.sid) != SID_SIZE or not any(self.sid):
            raise ValueError("session id must be 16 bytes, not all zero")
        if not 0 < self.seq <= SEQ_MAX:
            raise ValueError(f"sequence {self.seq} outside 1..2**32-1")
        if (self.type is SignalType.ABORT) != (self.reason is not None):
            raise ValueError("ABORT needs a reason; other signals must not carry one")

    def __repr__(self) -> str:
        extra = f", {self.reason.name}" if self.reason is not None else ""
        return f"{self.type.name}({self.nonce:#x}, sid={self.sid[:4].hex()}.., #{self.seq}{extra})"


def encode(sig: Signal) -> bytes:
    head = _HEAD.pack(VERSION_BYTE, sig.type, sig.nonce, sig.sid, sig.seq)
    return head if sig.reason is None else head + bytes((sig.reason,))


def decode(data: bytes) -> Signal:
    """Parse one signal; raise :class:`RemoteProtocolError` (OVERSIZED / MALFORMED) otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        # A user-written SignalChannel that delivers, say, str: dropped like any bad signal, not a TypeError.
        raise RemoteProtocolError(DropReason.MALFORMED, f"signal is {type(data).__name__}, not bytes")
    n = len(data)
    if n > MAX_SIGNAL_SIZE:
        raise RemoteProtocolError(DropReason.OVERSIZED, f"signal is {n} bytes, limit {MAX_SIGNAL_SIZE}")
    if n < BASE_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, f"signal is {n} bytes, minimum {BASE_SIZE}")
    version, type_byte, nonce, sid, seq = _HEAD.unpack_from(data)
    if version != VERSION_BYTE:
        raise RemoteProtocolError(DropReason.MALFORMED, f"version byte {version:#04x}, expected {VERSION_BYTE:#04x}")
    stype = _TYPES.get(type_byte)
    if stype is None:
        raise RemoteProtocolError(DropReason.MALFORMED, f"unknown signal type {type_byte}")
    expected = ABORT_SIZE if stype is SignalType.ABORT else BASE_SIZE
    if n != expected:
        raise RemoteProtocolError(DropReason.MALFORMED, f"{stype.name} is {n} bytes, expected {expected}")
    if nonce == 0:
        raise RemoteProtocolError(DropReason.MALFORMED, "zero nonce")
    if not any(sid):
        raise RemoteProtocolError(DropReason.MALFORMED, "zero session id")
    if seq == 0:
        raise RemoteProtocolError(DropReason.MALFORMED, "zero sequence number")
    reason: AbortReason | None = None
    if stype is SignalType.ABORT:
        reason = _REASONS.get(data[BASE_SIZE])
        if reason is None:
            raise RemoteProtocolError(DropReason.MALFORMED, f"unknown abort reason {data[BASE_SIZE]}")
    return Signal(stype, nonce, bytes(sid), seq, reason)
