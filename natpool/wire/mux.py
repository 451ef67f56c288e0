"""Multiplexing frames: many sessions' messages on one ordered link (see :mod:`natpool.mux`).

Layout, big-endian; one link message is one frame::

    0   1 byte   0xA0 | OPENER (0x08) | kind (1 OPEN, 2 DATA, 3 CLOSE)
    1   4 bytes  session id (non-zero), numbered by the session's opener
    5   ...      payload, at most ``max_payload`` bytes: DATA's message (never
                 empty), OPEN's optional first message, CLOSE none

``OPENER`` is set when the frame's *sender* opened the session. Each side
numbers the sessions it opens itself (1, 2, 3, ...), so two ends never need a
role ("client" / "server") agreed out of band to pick ids, and a frame names
its session unambiguously as (who opened it, id): an application that already
has one control connection per peer hands that connection over as it is.
An OPEN may carry the session's first message (a sender may fold them, so
opening costs no message of its own; a receiver must accept both forms).

Strict, like :mod:`natpool.wire.signal`: an input longer than the header plus
``max_payload`` is ``OVERSIZED`` before anything is parsed; a wrong magic,
kind or zero id, an OPEN not sent by its opener, a payload on CLOSE, or a
DATA without one are ``MALFORMED``. Decoding never allocates beyond the
payload slice.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from natpool.errors import DropReason, RemoteProtocolError

MAGIC = 0xA0
OPENER = 0x08
_KIND_MASK = 0x07
_HEAD = struct.Struct("!BI")
HEAD_SIZE = _HEAD.size  # 5
SID_MAX = (1 << 32) - 1
DEFAULT_MAX_PAYLOAD = 4096


class FrameKind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3


@dataclass(frozen=True, slots=True)
class MuxFrame:
    kind: FrameKind
    sid: int
    opener: bool  # True: the frame's sender opened this session
    payload: bytes = b""


def encode(frame: MuxFrame) -> bytes:
    """Encode one frame; ``ValueError`` for a frame :func:`decode` would refuse (local misuse)."""
    if not 0 < frame.sid <= SID_MAX:
        raise ValueError(f"session id {frame.sid} out of range")
    if frame.kind is FrameKind.DATA and not frame.payload:
        raise ValueError("DATA carries a payload")
    if frame.kind is FrameKind.CLOSE and frame.payload:
        raise ValueError("CLOSE carries no payload")
    if frame.kind is FrameKind.OPEN and not frame.opener:
        raise ValueError("only a session's opener sends OPEN")
    return _HEAD.pack(MAGIC | (OPENER if frame.opener else 0) | frame.kind, frame.sid) + frame.payload


def encode_data(sid: int, opener: bool, payload: bytes) -> bytes:
    """The hot path's DATA encoder: no frame object (the caller checked ``sid`` and the payload size)."""
    return _HEAD.pack(MAGIC | OPENER | 2 if opener else MAGIC | 2, sid) + payload


def encode_open(sid: int, payload: bytes = b"") -> bytes:
    """OPEN, with the session's first message if there is one (the caller checked ``sid`` and the size)."""
    return _HEAD.pack(MAGIC | OPENER | 1, sid) + payload


_KINDS: dict[int, FrameKind] = {int(k): k for k in FrameKind}
_DATA = MAGIC | 2


def decode_data(data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[int, int, bytes] | None:
    """The hot path's decoder: ``(sid, opener bit, payload)`` for a valid DATA frame, None for anything else.

    Most link messages are DATA; this skips the frame object and the checks
    that only other kinds need. None says nothing about validity: the caller
    then runs :func:`decode`, which refuses or parses it exactly.
    """
    n = len(data)
    if HEAD_SIZE < n <= HEAD_SIZE + max_payload:
        flags, sid = _HEAD.unpack_from(data)
        if flags & ~OPENER == _DATA and sid:
            return sid, flags >> 3 & 1, data[HEAD_SIZE:]
    return None


def encode_close(sid: int, opener: bool) -> bytes:
    """CLOSE without a frame object (the caller's ``sid`` is one of its live sessions: in range)."""
    return _HEAD.pack(MAGIC | OPENER | 3 if opener else MAGIC | 3, sid)


def decode(data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> MuxFrame:
    """Parse one link message; raise :class:`RemoteProtocolError` (OVERSIZED / MALFORMED) unless valid."""
    return MuxFrame(*decode_fields(data, max_payload))


def decode_fields(data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[FrameKind, int, bool, bytes]:
    """:func:`decode` as the tuple ``(kind, sid, opener, payload)``: the mux's reader needs no frame object."""
    n = len(data)
    if n > HEAD_SIZE + max_payload:
        raise RemoteProtocolError(DropReason.OVERSIZED, f"{n} bytes")
    if n < HEAD_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, f"{n} bytes, shorter than a header")
    flags, sid = _HEAD.unpack_from(data)
    if flags & 0xF0 != MAGIC:
        raise RemoteProtocolError(DropReason.MALFORMED, f"bad magic {flags:#x}")
    k = flags & _KIND_MASK
    if not 1 <= k <= 3:
        raise RemoteProtocolError(DropReason.MALFORMED, f"bad kind {k}")
    if sid == 0:
        raise RemoteProtocolError(DropReason.MALFORMED, "session id 0")
    kind = _KINDS[k]  # a dict lookup, not the enum constructor's call chain (one decode per link message)
    opener = bool(flags & OPENER)
    if kind is FrameKind.DATA:
        if n == HEAD_SIZE:
            raise RemoteProtocolError(DropReason.MALFORMED, "DATA without payload")
    elif kind is FrameKind.CLOSE:
        if n != HEAD_SIZE:
            raise RemoteProtocolError(DropReason.MALFORMED, "CLOSE with a payload")
    elif not opener:
        raise RemoteProtocolError(DropReason.MALFORMED, "OPEN not sent by the session's opener")
    return kind, sid, opener, bytes(data[HEAD_SIZE:])
