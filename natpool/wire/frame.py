"""The upstream-compatible 9-byte keepalive frame.

Layout: 8-byte big-endian nonce, then one byte: 0 = ping, 1 = pong. Anything
else — another length, another flag value, a zero nonce — is malformed and
raises :class:`RemoteProtocolError`, which the entry turns into a counted drop.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from natpool.errors import DropReason, RemoteProtocolError

FRAME_SIZE = 9
_STRUCT = struct.Struct("!QB")


class Kind(enum.IntEnum):
    PING = 0
    PONG = 1


@dataclass(frozen=True, slots=True)
class Frame:
    nonce: int
    kind: Kind

    def __repr__(self) -> str:
        return f"{self.kind.name.lower()}({self.nonce:#x})"


def encode(frame: Frame) -> bytes:
    return _STRUCT.pack(frame.nonce, frame.kind)


def decode(data: bytes) -> Frame:
    """Parse one datagram; raise ``RemoteProtocolError(MALFORMED)`` unless it is a valid frame."""
    if len(data) != FRAME_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, f"frame is {len(data)} bytes, expected {FRAME_SIZE}")
    nonce, flag = _STRUCT.unpack(data)
    if nonce == 0:
        raise RemoteProtocolError(DropReason.MALFORMED, "zero nonce")
    if flag > 1:
        raise RemoteProtocolError(DropReason.MALFORMED, f"flag byte {flag} is neither ping (0) nor pong (1)")
    return Frame(nonce, Kind(flag))


# --- the entry's hot path ---------------------------------------------------------------------
# One pair's frames are recognised and built without Frame objects; ``decode`` stays the
# authority for everything else (tests/core/test_entry_hotpath.py checks they agree on every input).

_PING = int(Kind.PING)
_PONG = int(Kind.PONG)


def is_ping_for(data: bytes, nonce: int) -> bool:
    """True for a ping, False for a pong carrying ``nonce`` (never 0); raises ``RemoteProtocolError``.

    MALFORMED for anything ``decode`` rejects, WRONG_NONCE for a valid frame of another pair.
    """
    if len(data) == FRAME_SIZE and data[8] <= _PONG and int.from_bytes(data[:8], "big") == nonce:
        return data[8] == _PING
    frame = decode(data)
    if frame.nonce != nonce:
        raise RemoteProtocolError(DropReason.WRONG_NONCE, f"frame for {frame.nonce:#x}, expected {nonce:#x}")
    return frame.kind is Kind.PING  # pragma: no cover - the fast path takes every valid frame of ``nonce``


def ping_bytes(nonce: int) -> bytes:
    """``encode(Frame(nonce, Kind.PING))`` without the Frame."""
    return _STRUCT.pack(nonce, _PING)


def pong_bytes(nonce: int) -> bytes:
    """``encode(Frame(nonce, Kind.PONG))`` without the Frame."""
    return _STRUCT.pack(nonce, _PONG)
