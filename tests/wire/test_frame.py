"""The 9-byte keepalive frame codec: round trip, and rejection of everything else."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.errors import DropReason, RemoteProtocolError
from natpool.wire.frame import FRAME_SIZE, Frame, Kind, decode, encode

nonces = st.integers(min_value=1, max_value=2**64 - 1)


@given(nonces, st.sampled_from(Kind))
def test_round_trip(nonce: int, kind: Kind) -> None:
    data = encode(Frame(nonce, kind))
    assert len(data) == FRAME_SIZE
    assert data[:8] == nonce.to_bytes(8, "big")
    assert decode(data) == Frame(nonce, kind)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_malformed(data: bytes) -> None:
    try:
        frame = decode(data)
    except RemoteProtocolError as exc:
        assert exc.reason is DropReason.MALFORMED
    else:
        assert encode(frame) == data


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 8, b"\x00" * 10, (5).to_bytes(8, "big") + b"\x02", (0).to_bytes(8, "big") + b"\x00"],
    ids=["empty", "short", "long", "bad-flag", "zero-nonce"],
)
def test_malformed_frames_rejected(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    assert info.value.reason is DropReason.MALFORMED
