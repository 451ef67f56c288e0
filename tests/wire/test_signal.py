"""The handover signal codec: round trip, strict rejection of everything else."""

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.errors import DropReason, RemoteProtocolError
from natpool.wire.keys import KEEPALIVE, SIGNAL, derive
from natpool.wire.signal import (
    ABORT_SIZE,
    BASE_SIZE,
    MAC_SIZE,
    MAX_SIGNAL_SIZE,
    RAND_SIZE,
    SEQ_MAX,
    SIGNED_ABORT_SIZE,
    SIGNED_SIZE,
    SIGNED_VERSION_BYTE,
    VERSION_BYTE,
    AbortReason,
    Signal,
    SignalType,
    check_sid,
    decode,
    encode,
    encode_fields,
    encode_signed,
    sign,
    verify,
)

nonces = st.integers(min_value=1, max_value=2**64 - 1)
sids = st.binary(min_size=16, max_size=16).filter(any)
seqs = st.integers(min_value=1, max_value=SEQ_MAX)


@st.composite
def signals(draw: st.DrawFn) -> Signal:
    stype = draw(st.sampled_from(SignalType))
    reason = draw(st.sampled_from(AbortReason)) if stype is SignalType.ABORT else None
    return Signal(stype, draw(nonces), draw(sids), draw(seqs), reason)


@given(signals())
def test_round_trip(sig: Signal) -> None:
    data = encode(sig)
    assert len(data) == (ABORT_SIZE if sig.type is SignalType.ABORT else BASE_SIZE)
    assert data[0] == VERSION_BYTE
    assert decode(data) == sig


@given(st.binary(max_size=MAX_SIGNAL_SIZE + 8))
def test_arbitrary_bytes_decode_or_raise(data: bytes) -> None:
    try:
        sig = decode(data)
    except RemoteProtocolError as exc:
        expected = DropReason.OVERSIZED if len(data) > MAX_SIGNAL_SIZE else DropReason.MALFORMED
        assert exc.reason is expected
    else:
        assert encode(sig) == data


@given(signals(), st.data())
def test_single_byte_mutation_never_escapes(sig: Signal, data: st.DataObject) -> None:
    """Flipping any byte gives either another valid signal or a MALFORMED error, never anything else."""
    raw = bytearray(encode(sig))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        other = decode(bytes(raw))
    except RemoteProtocolError as exc:
        assert exc.reason is DropReason.MALFORMED
    else:
        assert other != sig
        assert encode(other) == bytes(raw)


def _raw(version: int = VERSION_BYTE, stype: int = 1, nonce: int = 7, sid: bytes = b"\x01" * 16, seq: int = 1) -> bytes:
    return struct.pack("!BBQ16sI", version, stype, nonce, sid, seq)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _raw()[:-1],
        _raw() + b"\x00",
        _raw(version=0x92),
        _raw(version=0x00),
        _raw(stype=0),
        _raw(stype=7),
        _raw(nonce=0),
        _raw(sid=b"\x00" * 16),
        _raw(seq=0),
        _raw(stype=SignalType.ABORT),  # ABORT without its reason byte
        _raw(stype=SignalType.ABORT) + b"\x00",  # reason 0 is not defined
        _raw(stype=SignalType.ABORT) + b"\x09",
        _raw(stype=SignalType.ABORT) + b"\x01\x01",
    ],
    ids=["empty", "short", "trailing", "next-version", "no-magic", "type-0", "type-7", "zero-nonce",
         "zero-sid", "zero-seq", "abort-no-reason", "abort-reason-0", "abort-reason-9", "abort-trailing"],
)
def test_malformed_rejected(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    assert info.value.reason is DropReason.MALFORMED


@pytest.mark.parametrize("size", [MAX_SIGNAL_SIZE + 1, 4096, 1 << 20])
def test_oversized_rejected_before_parsing(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(_raw() + b"\x00" * (size - BASE_SIZE))
    assert info.value.reason is DropReason.OVERSIZED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": 0},
        {"sid": b"\x00" * 16},
        {"sid": b"\x01" * 8},
        {"seq": 0},
        {"seq": SEQ_MAX + 1},
        {"reason": AbortReason.TIMEOUT},
    ],
)
def test_local_construction_errors_raise(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"type": SignalType.LOCK, "nonce": 1, "sid": b"\x01" * 16, "seq": 1}
    base.update(kwargs)
    with pytest.raises(ValueError):
        Signal(**base)  # type: ignore[arg-type]


def test_abort_requires_reason() -> None:
    with pytest.raises(ValueError):
        Signal(SignalType.ABORT, 1, b"\x01" * 16, 1)


@pytest.mark.parametrize("data", ["\x91" * 30, None, 30, [0x91] * 30], ids=lambda d: type(d).__name__)
def test_non_bytes_input_is_malformed_not_a_type_error(data: object) -> None:
    """A user-written channel that hands over str/None must cost a counted drop, not a TypeError."""
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)  # type: ignore[arg-type]
    assert info.value.reason is DropReason.MALFORMED


# --- version 2: signed signals (issue 10) ---------------------------------------------------

SIG_KEY = derive(bytes(range(16)), SIGNAL)
rands = st.binary(min_size=RAND_SIZE, max_size=RAND_SIZE)
nonzero_rands = rands.filter(any)


@st.composite
def signed_signals(draw: st.DrawFn) -> tuple[Signal, bool]:
    stype = draw(st.sampled_from(SignalType))
    reason = draw(st.sampled_from(AbortReason)) if stype is SignalType.ABORT else None
    unsigned = Signal(stype, draw(nonces), draw(sids), draw(seqs), reason, draw(nonzero_rands), draw(rands), b"")
    by_responder = draw(st.booleans())
    return sign(unsigned, SIG_KEY, by_responder), by_responder


@given(signed_signals())
def test_signed_round_trip_and_verify(case: tuple[Signal, bool]) -> None:
    sig, by_responder = case
    data = encode(sig)
    assert data[0] == SIGNED_VERSION_BYTE and len(data) <= MAX_SIGNAL_SIZE
    assert len(data) == (SIGNED_ABORT_SIZE if sig.type is SignalType.ABORT else SIGNED_SIZE)
    back = decode(data)
    assert back == sig and back.signed
    assert verify(back, SIG_KEY, by_responder)
    assert not verify(back, SIG_KEY, not by_responder)  # direction is bound: no reflection
    assert not verify(back, derive(bytes(range(1, 17)), SIGNAL), by_responder)
    assert not verify(Signal(sig.type, sig.nonce, sig.sid, sig.seq, sig.reason), SIG_KEY, by_responder)


@given(signed_signals(), st.data())
def test_signed_single_byte_mutation_never_verifies(case: tuple[Signal, bool], data: st.DataObject) -> None:
    """Any changed byte (header, randoms, reason or MAC) either fails to parse or fails the MAC."""
    sig, by_responder = case
    raw = bytearray(encode(sig))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        other = decode(bytes(raw))
    except RemoteProtocolError as exc:
        assert exc.reason is DropReason.MALFORMED
    else:
        assert other != sig and not verify(other, SIG_KEY, by_responder)
        if other.signed:
            assert encode(other) == bytes(raw)


@given(st.binary(min_size=SIGNED_SIZE - 1, max_size=SIGNED_ABORT_SIZE), st.booleans())
def test_arbitrary_signed_looking_bytes_never_verify(tail: bytes, by_responder: bool) -> None:
    data = bytes([SIGNED_VERSION_BYTE]) + tail
    try:
        sig = decode(data)
    except RemoteProtocolError as exc:
        assert exc.reason is DropReason.MALFORMED
    else:
        assert sig.signed and encode(sig) == data
        assert not verify(sig, SIG_KEY, by_responder)


def test_signed_layout_is_the_documented_one() -> None:
    sig = sign(Signal(SignalType.ABORT, 7, b"\x01" * 16, 3, AbortReason.TIMEOUT, b"\x02" * 8, bytes(8), b""),
               SIG_KEY, by_responder=False)
    data = encode(sig)
    assert data[:46] == struct.pack("!BBQ16sI8s8s", 0x92, 6, 7, b"\x01" * 16, 3, b"\x02" * 8, bytes(8))
    assert data[46] == AbortReason.TIMEOUT and data[47:] == sig.mac and len(sig.mac or b"") == MAC_SIZE
    assert sig.mac == hashlib.blake2b(b"I" + data[:47], key=SIG_KEY, digest_size=16).digest()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ri": bytes(8), "rr": bytes(8), "mac": b""},  # zero initiator random
        {"ri": b"\x01" * 7, "rr": bytes(8), "mac": b""},
        {"ri": b"\x01" * 8, "rr": bytes(9), "mac": b""},
        {"ri": b"\x01" * 8, "rr": bytes(8), "mac": b"\x01" * 5},
        {"ri": b"\x01" * 8},  # half a signed signal
    ],
)
def test_signed_construction_errors_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Signal(SignalType.LOCK, 1, b"\x01" * 16, 1, **kwargs)  # type: ignore[arg-type]


def test_unsigned_v2_cannot_be_encoded_and_v1_cannot_be_signed() -> None:
    with pytest.raises(ValueError):
        encode(Signal(SignalType.LOCK, 1, b"\x01" * 16, 1, None, b"\x01" * 8, bytes(8), b""))
    with pytest.raises(ValueError):
        sign(Signal(SignalType.LOCK, 1, b"\x01" * 16, 1), SIG_KEY, by_responder=False)


def test_derive_gives_distinct_sub_keys() -> None:
    key = bytes(range(32))
    assert derive(key, SIGNAL) == hashlib.blake2b(key=key, person=b"natpool-sig", digest_size=32).digest()
    assert derive(key, KEEPALIVE) == hashlib.blake2b(key=key, person=b"natpool-ka", digest_size=32).digest()
    assert derive(key, SIGNAL) != derive(key, KEEPALIVE) != derive(key[::-1], KEEPALIVE)


@given(signals())
def test_the_unchecked_builders_make_the_signals_the_validating_constructor_makes(sig: Signal) -> None:
    """encode_fields and decode skip __post_init__ (the fields are checked already): same signal, same bytes."""
    built, data = encode_fields(sig.type, sig.nonce, sig.sid, sig.seq, sig.reason)
    assert built == sig and hash(built) == hash(sig) and repr(built) == repr(sig)
    assert data == encode(sig)
    back = decode(data)
    assert back == sig and type(back) is Signal and type(back.sid) is bytes
    with pytest.raises(AttributeError):  # frozen like any Signal
        back.seq = 2  # type: ignore[misc]


@given(signed_signals())
def test_encode_signed_builds_the_signal_sign_builds(case: tuple[Signal, bool]) -> None:
    """encode_signed is sign then encode in one go: the same signal, the same bytes, and they decode back."""
    sig, by_responder = case
    assert sig.ri is not None and sig.rr is not None
    built, data = encode_signed(sig.type, sig.nonce, sig.sid, sig.seq, sig.reason, sig.ri, sig.rr, SIG_KEY,
                                by_responder)
    assert built == sig and data == encode(sig) and decode(data) == sig


@pytest.mark.parametrize("sid", [b"", b"\x01" * 15, b"\x01" * 17, bytes(16)])
def test_check_sid_refuses_what_signal_refuses(sid: bytes) -> None:
    with pytest.raises(ValueError, match="session id"):
        check_sid(sid)
    with pytest.raises(ValueError, match="session id"):
        Signal(SignalType.LOCK, 1, sid, 1)


def test_check_sid_accepts_a_valid_id() -> None:
    check_sid(b"\x00" * 15 + b"\x01")  # no exception
