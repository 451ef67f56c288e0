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

Version 2 (``SIGNED_VERSION_BYTE`` 0x92), for a pair with a key (issue 10),
appends two session randoms and a MAC to the same header::

    30  8 bytes  initiator's random (non-zero; chosen per session, sent in LOCK)
    38  8 bytes  responder's random (zero in LOCK and in an ABORT the initiator
                 sent before any answer; non-zero in everything else)
    46  1 byte   ABORT only: reason
    46/47 16 bytes  MAC: keyed BLAKE2b-128 under ``derive(key, SIGNAL)`` over a
                 direction byte (who sent it) and every byte before the MAC

62 bytes, ABORT 63: still within :data:`MAX_SIGNAL_SIZE`. The MAC binds the
pair nonce, the session id, the sequence number and both randoms; each side
checks that the randoms are its session's, so a signal recorded in an
earlier session never verifies in a later one (the responder's random is
fresh per session: until the initiator has echoed it, the responder has no
proof the session is live, see spec/handover.md "Authenticated signals").
Without a key the version-1 format above stays (legacy, unauthenticated).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass, replace

from natpool.endpoints import NONCE_MAX
from natpool.errors import DropReason, RemoteProtocolError

VERSION_BYTE = 0x91
SID_SIZE = 16
SEQ_MAX = (1 << 32) - 1
_HEAD = struct.Struct("!BBQ16sI")
BASE_SIZE = _HEAD.size  # 30
ABORT_SIZE = BASE_SIZE + 1
MAX_SIGNAL_SIZE = 64  # anything longer is rejected unread
SIGNED_VERSION_BYTE = 0x92
RAND_SIZE = 8
MAC_SIZE = 16
_RANDS = struct.Struct("!8s8s")
SIGNED_SIZE = BASE_SIZE + _RANDS.size + MAC_SIZE  # 62
SIGNED_ABORT_SIZE = SIGNED_SIZE + 1
NO_RAND = bytes(RAND_SIZE)


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
    #: Version 2 only (None in a legacy signal): the initiator's and the responder's session randoms,
    #: and the MAC (``b""`` until :func:`sign` fills it in).
    ri: bytes | None = None
    rr: bytes | None = None
    mac: bytes | None = None

    @property
    def signed(self) -> bool:
        return self.ri is not None

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
        if (self.ri is None) != (self.rr is None) or (self.ri is None) != (self.mac is None):
            raise ValueError("a signed signal carries ri, rr and mac; a legacy one none of them")
        if self.ri is not None:
            if len(self.ri) != RAND_SIZE or not any(self.ri):
                raise ValueError("initiator random must be 8 bytes, not all zero")
            if self.rr is None or len(self.rr) != RAND_SIZE:
                raise ValueError("responder random must be 8 bytes")
            if self.mac is None or len(self.mac) not in (0, MAC_SIZE):
                raise ValueError("mac must be 16 bytes (or empty before signing)")

    def __repr__(self) -> str:
        extra = f", {self.reason.name}" if self.reason is not None else ""
        if self.ri is not None and self.rr is not None:
            extra += f", ri={self.ri[:2].hex()}.., rr={self.rr[:2].hex()}.."
        return f"{self.type.name}({self.nonce:#x}, sid={self.sid[:4].hex()}.., #{self.seq}{extra})"


_new_object = object.__new__
_set_field = object.__setattr__  # how a frozen dataclass's own __init__ writes its fields


def _checked(stype: SignalType, nonce: int, sid: bytes, seq: int, reason: AbortReason | None = None,
             ri: bytes | None = None, rr: bytes | None = None, mac: bytes | None = None) -> Signal:
    """A :class:`Signal` whose fields the caller has already checked: no ``__post_init__``.

    For :func:`decode` (its checks cover every one of ``__post_init__``'s)
    and the senders below, which build from a session's own state: a take
    makes eight signals, and the dataclass's validating constructor was a
    tenth of the Python calls of a take. Equal, hashable and printable like
    any other Signal (it is one).
    """
    sig: Signal = _new_object(Signal)
    _set_field(sig, "type", stype)
    _set_field(sig, "nonce", nonce)
    _set_field(sig, "sid", sid)
    _set_field(sig, "seq", seq)
    _set_field(sig, "reason", reason)
    _set_field(sig, "ri", ri)
    _set_field(sig, "rr", rr)
    _set_field(sig, "mac", mac)
    return sig


def check_sid(sid: bytes) -> None:
    """``ValueError`` unless ``sid`` is a valid session id (16 bytes, not all zero): ``Signal``'s own rule."""
    if not isinstance(sid, bytes) or len(sid) != SID_SIZE or not any(sid):
        raise ValueError("session id must be 16 bytes, not all zero")


def encode_fields(stype: SignalType, nonce: int, sid: bytes, seq: int,
                  reason: AbortReason | None) -> tuple[Signal, bytes]:
    """Build and encode a version-1 signal in one go (the sender's per-signal path): the signal and its bytes.

    The caller guarantees the fields (a session's nonce, its checked session
    id, its own sequence counter, a reason exactly on ABORT): range errors
    are not re-checked here.
    """
    head = _HEAD.pack(VERSION_BYTE, stype, nonce, sid, seq)
    return _checked(stype, nonce, sid, seq, reason), (head if reason is None else head + bytes((reason,)))


def encode(sig: Signal) -> bytes:
    """Serialize exactly what ``sig`` holds: version 1, or version 2 with its (signed) MAC."""
    if sig.ri is None:
        head = _HEAD.pack(VERSION_BYTE, sig.type, sig.nonce, sig.sid, sig.seq)
        return head if sig.reason is None else head + bytes((sig.reason,))
    if not sig.mac:
        raise ValueError("a version-2 signal must be signed (sign()) before it is encoded")
    return _signed_body(sig) + sig.mac


def _signed_body(sig: Signal) -> bytes:
    """Everything of a version-2 signal before its MAC."""
    assert sig.ri is not None and sig.rr is not None
    body = _HEAD.pack(SIGNED_VERSION_BYTE, sig.type, sig.nonce, sig.sid, sig.seq) + _RANDS.pack(sig.ri, sig.rr)
    return body if sig.reason is None else body + bytes((sig.reason,))


def _mac(key: bytes, by_responder: bool, body: bytes) -> bytes:
    h = hashlib.blake2b(key=key, digest_size=MAC_SIZE)
    h.update(b"R" if by_responder else b"I")  # ABORT goes both ways: bind the direction too (no reflection)
    h.update(body)
    return h.digest()


def sign(sig: Signal, key: bytes, by_responder: bool) -> Signal:
    """``sig`` (version 2) with its MAC under ``key`` (the pair's ``derive(key, SIGNAL)``)."""
    if sig.ri is None:
        raise ValueError("only a version-2 signal (ri/rr set) can be signed")
    return replace(sig, mac=_mac(key, by_responder, _signed_body(sig)))


def encode_signed(stype: SignalType, nonce: int, sid: bytes, seq: int, reason: AbortReason | None,
                  ri: bytes, rr: bytes, key: bytes, by_responder: bool) -> tuple[Signal, bytes]:
    """Build, sign and encode in one go (the sender's per-signal path): the signal and its bytes."""
    body = _HEAD.pack(SIGNED_VERSION_BYTE, stype, nonce, sid, seq) + _RANDS.pack(ri, rr)
    if reason is not None:
        body += bytes((reason,))
    mac = _mac(key, by_responder, body)
    return _checked(stype, nonce, sid, seq, reason, ri, rr, mac), body + mac


def verify(sig: Signal, key: bytes, by_responder: bool) -> bool:
    """True if ``sig`` is version 2 and its MAC is valid under ``key`` for that direction (constant time)."""
    if sig.ri is None or not sig.mac:
        return False
    return hmac.compare_digest(sig.mac, _mac(key, by_responder, _signed_body(sig)))


def decode(data: bytes) -> Signal:
    """Parse one signal of either version; raise :class:`RemoteProtocolError` (OVERSIZED / MALFORMED) otherwise.

    Form only: a version-2 signal's MAC is checked by the session (:func:`verify`),
    which knows the pair's key and which direction the signal must come from.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        # A user-written SignalChannel that delivers, say, str: dropped like any bad signal, not a TypeError.
        raise RemoteProtocolError(DropReason.MALFORMED, f"signal is {type(data).__name__}, not bytes")
    n = len(data)
    if n > MAX_SIGNAL_SIZE:
        raise RemoteProtocolError(DropReason.OVERSIZED, f"signal is {n} bytes, limit {MAX_SIGNAL_SIZE}")
    if n < BASE_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, f"signal is {n} bytes, minimum {BASE_SIZE}")
    version, type_byte, nonce, sid, seq = _HEAD.unpack_from(data)
    if version != VERSION_BYTE and version != SIGNED_VERSION_BYTE:
        raise RemoteProtocolError(DropReason.MALFORMED, f"version byte {version:#04x}, expected {VERSION_BYTE:#04x}"
                                  f" or {SIGNED_VERSION_BYTE:#04x}")
    stype = _TYPES.get(type_byte)
    if stype is None:
        raise RemoteProtocolError(DropReason.MALFORMED, f"unknown signal type {type_byte}")
    signed = version == SIGNED_VERSION_BYTE
    if signed:
        expected = SIGNED_ABORT_SIZE if stype is SignalType.ABORT else SIGNED_SIZE
    else:
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
    at = SIGNED_SIZE - MAC_SIZE if signed else BASE_SIZE  # where an ABORT's reason byte is
    if stype is SignalType.ABORT:
        reason = _REASONS.get(data[at])
        if reason is None:
            raise RemoteProtocolError(DropReason.MALFORMED, f"unknown abort reason {data[at]}")
    # Every field is checked above (what Signal.__post_init__ would check, and more): build it unchecked.
    if not signed:
        return _checked(stype, nonce, sid, seq, reason)
    ri, rr = _RANDS.unpack_from(data, BASE_SIZE)
    if not any(ri):
        raise RemoteProtocolError(DropReason.MALFORMED, "zero initiator random")
    return _checked(stype, nonce, sid, seq, reason, ri, rr, bytes(data[n - MAC_SIZE:]))
