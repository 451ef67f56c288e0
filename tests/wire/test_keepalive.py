"""The keyed keepalive codec (natpool.wire.keepalive): round trip, and every forgery or damage rejected."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.errors import DropReason, RemoteProtocolError
from natpool.wire.frame import FRAME_SIZE, Frame, Kind, encode
from natpool.wire.keepalive import (
    HEADER_SIZE,
    KEYED_FRAME_SIZE,
    MAC_SIZE,
    VERSION,
    KeepaliveKey,
    looks_keyed,
)
from natpool.wire.keys import KEEPALIVE, SIGNAL, derive

nonces = st.integers(min_value=1, max_value=2**64 - 1)
ids = st.integers(min_value=1, max_value=2**64 - 1)
keys = st.binary(min_size=16, max_size=64)
kinds = st.sampled_from(Kind)


@given(keys, kinds, nonces, ids)
def test_round_trip(key: bytes, kind: Kind, nonce: int, ping_id: int) -> None:
    ka = KeepaliveKey(key)
    data = ka.seal(kind, nonce, ping_id)
    assert len(data) == KEYED_FRAME_SIZE == 34
    assert data[0] == VERSION and data[1] == kind
    assert data[2:10] == nonce.to_bytes(8, "big") and data[10:18] == ping_id.to_bytes(8, "big")
    assert ka.open(data, nonce) == (kind is Kind.PING, ping_id)
    assert looks_keyed(data, nonce) and ka.verify(data)
    assert KeepaliveKey(key).open(data, nonce) == (kind is Kind.PING, ping_id)  # the other end's key object


@given(keys, kinds, nonces, ids, st.data())
def test_any_bit_flip_is_rejected(key: bytes, kind: Kind, nonce: int, ping_id: int, data: st.DataObject) -> None:
    ka = KeepaliveKey(key)
    frame = bytearray(ka.seal(kind, nonce, ping_id))
    bit = data.draw(st.integers(min_value=0, max_value=8 * len(frame) - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RemoteProtocolError) as info:
        ka.open(bytes(frame), nonce)
    # A flipped MAC, id or kind-within-range fails the MAC; a flipped version/kind/nonce is caught first.
    assert info.value.reason in (DropReason.BAD_MAC, DropReason.MALFORMED, DropReason.WRONG_NONCE)
    if bit // 8 >= 10:  # ping id or MAC: only the MAC can tell
        assert info.value.reason is DropReason.BAD_MAC
    assert not ka.verify(bytes(frame))


@given(keys, kinds, nonces, ids, st.data())
def test_truncated_or_extended_frames_are_malformed(key: bytes, kind: Kind, nonce: int, ping_id: int,
                                                    data: st.DataObject) -> None:
    ka = KeepaliveKey(key)
    frame = ka.seal(kind, nonce, ping_id)
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    for damaged in (frame[:cut], frame + data.draw(st.binary(min_size=1, max_size=8))):
        with pytest.raises(RemoteProtocolError) as info:
            ka.open(damaged, nonce)
        assert info.value.reason is DropReason.MALFORMED
        assert not ka.verify(damaged)


@given(keys, keys, kinds, nonces, ids)
def test_wrong_key_is_bad_mac(key: bytes, other: bytes, kind: Kind, nonce: int, ping_id: int) -> None:
    if derive(key, KEEPALIVE) == derive(other, KEEPALIVE):
        return  # the same key (hypothesis may draw it twice)
    frame = KeepaliveKey(other).seal(kind, nonce, ping_id)
    with pytest.raises(RemoteProtocolError) as info:
        KeepaliveKey(key).open(frame, nonce)
    assert info.value.reason is DropReason.BAD_MAC
    assert looks_keyed(frame, nonce) and not KeepaliveKey(key).verify(frame)


@given(keys, kinds, nonces, nonces, ids)
def test_wrong_nonce_is_refused(key: bytes, kind: Kind, nonce: int, other: int, ping_id: int) -> None:
    if nonce == other:
        return
    ka = KeepaliveKey(key)
    frame = ka.seal(kind, other, ping_id)
    with pytest.raises(RemoteProtocolError) as info:
        ka.open(frame, nonce)
    assert info.value.reason is DropReason.WRONG_NONCE
    assert not looks_keyed(frame, nonce)
    # Rewriting the nonce field to ours (it travels in clear) breaks the MAC.
    moved = frame[:2] + nonce.to_bytes(8, "big") + frame[10:]
    with pytest.raises(RemoteProtocolError) as info:
        ka.open(moved, nonce)
    assert info.value.reason is DropReason.BAD_MAC


@given(keys, nonces, ids)
def test_a_ping_cannot_be_turned_into_a_pong(key: bytes, nonce: int, ping_id: int) -> None:
    ka = KeepaliveKey(key)
    ping = ka.ping(nonce, ping_id)
    as_pong = ping[:1] + bytes([Kind.PONG]) + ping[2:]
    with pytest.raises(RemoteProtocolError) as info:
        ka.open(as_pong, nonce)
    assert info.value.reason is DropReason.BAD_MAC


@given(keys, st.binary(max_size=48), nonces)
def test_arbitrary_bytes_never_open_and_never_raise_anything_else(key: bytes, data: bytes, nonce: int) -> None:
    ka = KeepaliveKey(key)
    with pytest.raises(RemoteProtocolError):
        ka.open(data, nonce)


def test_the_mac_is_keyed_blake2b_128_over_the_header_under_the_keepalive_subkey() -> None:
    key = bytes(range(32))
    frame = KeepaliveKey(key).ping(0x1234, 7)
    expected = hashlib.blake2b(frame[:HEADER_SIZE], key=derive(key, KEEPALIVE), digest_size=MAC_SIZE).digest()
    assert frame[HEADER_SIZE:] == expected
    assert derive(key, KEEPALIVE) != derive(key, SIGNAL)  # domain separation of the two purposes
    assert derive(key, KEEPALIVE) == hashlib.blake2b(key=key, person=b"natpool-ka", digest_size=32).digest()


@pytest.mark.parametrize("bad", [b"\x02", b"\xff"], ids=["version-2", "version-255"])
def test_other_versions_are_malformed_even_with_a_valid_mac(bad: bytes) -> None:
    key = b"k" * 16
    ka = KeepaliveKey(key)
    head = bad + ka.ping(9, 1)[1:HEADER_SIZE]
    frame = head + hashlib.blake2b(head, key=derive(key, KEEPALIVE), digest_size=MAC_SIZE).digest()
    with pytest.raises(RemoteProtocolError) as info:
        ka.open(frame, 9)
    assert info.value.reason is DropReason.MALFORMED


def test_zero_ping_id_is_malformed_even_when_sealed() -> None:
    ka = KeepaliveKey(b"k" * 16)
    with pytest.raises(RemoteProtocolError) as info:
        ka.open(ka.pong(9, 0), 9)
    assert info.value.reason is DropReason.MALFORMED


def test_legacy_and_keyed_frames_are_told_apart_by_shape() -> None:
    legacy = encode(Frame(5, Kind.PING))
    assert len(legacy) == FRAME_SIZE and not looks_keyed(legacy, 5)
    assert looks_keyed(KeepaliveKey(b"k" * 16).ping(5, 1), 5)


def _outcome(fn: object, *args: object) -> object:
    assert callable(fn)
    try:
        return fn(*args)
    except RemoteProtocolError as exc:
        return exc.reason


@st.composite
def candidate_frames(draw: st.DrawFn, key: bytes, nonce: int) -> bytes:
    """Valid frames of the pair (any id, 0 included), damaged ones, other pairs', and noise of every length."""
    ka = KeepaliveKey(draw(st.sampled_from([key, b"another key, 16+"])))
    frame = ka.seal(draw(st.sampled_from(Kind)), draw(st.sampled_from([nonce, nonce ^ 1])),
                    draw(st.integers(min_value=0, max_value=2**64 - 1)))
    how = draw(st.sampled_from(["as-is", "flip", "cut", "noise"]))
    if how == "flip":
        buf = bytearray(frame)
        bit = draw(st.integers(min_value=0, max_value=8 * len(buf) - 1))
        buf[bit // 8] ^= 1 << (bit % 8)
        return bytes(buf)
    if how == "cut":
        return frame[:draw(st.integers(min_value=0, max_value=len(frame)))]
    if how == "noise":
        return draw(st.binary(max_size=40))
    return frame


@given(keys, nonces, st.data())
def test_the_pair_codec_gives_the_generic_codecs_verdict_on_every_input(key: bytes, nonce: int,
                                                                        data: st.DataObject) -> None:
    """PairKeepalive (the entry's fast path) and KeepaliveKey.open agree: same result or same DropReason."""
    generic = KeepaliveKey(key)
    pair = generic.for_pair(nonce)
    frame = data.draw(candidate_frames(key, nonce))
    assert _outcome(pair.open, frame) == _outcome(generic.open, frame, nonce)
    assert pair.verify(frame) == (looks_keyed(frame, nonce) and generic.verify(frame))
    ping_id = data.draw(ids)
    assert pair.ping(ping_id) == generic.ping(nonce, ping_id) and pair.pong(ping_id) == generic.pong(nonce, ping_id)
