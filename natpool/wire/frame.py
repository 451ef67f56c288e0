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
