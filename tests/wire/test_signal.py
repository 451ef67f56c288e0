"""The handover signal codec: round trip, strict rejection of everything else."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.errors import DropReason, RemoteProtocolError
from natpool.wire.signal import (
    ABORT_SIZE,
    BASE_SIZE,
    MAX_SIGNAL_SIZE,
    SEQ_MAX,
    VERSION_BYTE,
    AbortReason,
    Signal,
    SignalType,
    decode,
    encode,
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
