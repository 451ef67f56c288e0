"""The authenticated TCP hello codec and transcript MAC: round trip, strict rejection, what the MAC binds."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.errors import DropReason, InvalidKey, RemoteProtocolError
from natpool.wire import hello as auth

nonces = st.binary(min_size=auth.NONCE_SIZE, max_size=auth.NONCE_SIZE)
names = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)
modes = st.sampled_from([auth.MODE_SESSION, auth.MODE_MUX])
SECRET = b"0123456789abcdef0123456789abcdef"


@given(modes, nonces, names)
def test_hello_round_trips(mode: bytes, nonce: bytes, name: str) -> None:
    assert auth.decode_hello(auth.encode_hello(mode, nonce, name)) == auth.Hello(mode, nonce, name)


@given(nonces, st.binary(min_size=auth.MAC_SIZE, max_size=auth.MAC_SIZE), names)
def test_challenge_and_proof_round_trip(nonce: bytes, mac: bytes, name: str) -> None:
    assert auth.decode_challenge(auth.encode_challenge(nonce, mac, name)) == auth.Challenge(nonce, mac, name)
    assert auth.decode_proof(auth.encode_proof(mac)) == mac


@given(st.binary(max_size=120))
def test_decoders_raise_only_malformed_on_any_input(data: bytes) -> None:
    for decode in (auth.decode_hello, auth.decode_challenge, auth.decode_proof):
        try:
            decode(data)
        except RemoteProtocolError as exc:
            assert exc.reason is DropReason.MALFORMED


@given(st.binary(max_size=60))
def test_prefixed_garbage_is_malformed_or_a_hello(tail: bytes) -> None:
    try:
        h = auth.decode_hello(auth.AUTH_HELLO_PREFIX + tail)
    except RemoteProtocolError as exc:
        assert exc.reason is DropReason.MALFORMED
    else:
        assert h.mode in (auth.MODE_SESSION, auth.MODE_MUX) and len(h.nonce) == auth.NONCE_SIZE and h.identity


def test_specific_rejections() -> None:
    n = bytes(range(16))
    for bad in (auth.AUTH_HELLO_PREFIX + b"S" + n,  # no identity
                auth.AUTH_HELLO_PREFIX + b"X" + n + b"alice",  # unknown mode
                auth.AUTH_HELLO_PREFIX + b"M" + n + b"\xff\xfe",  # identity not UTF-8
                auth.AUTH_HELLO_PREFIX + b"M" + n[:5]):  # short
        with pytest.raises(RemoteProtocolError):
            auth.decode_hello(bad)
    with pytest.raises(RemoteProtocolError):
        auth.decode_proof(auth.PROOF + bytes(31))
    with pytest.raises(RemoteProtocolError):
        auth.decode_challenge(auth.PROOF + bytes(60))


def test_the_mac_binds_every_field_and_the_role() -> None:
    base = (SECRET, auth.ROLE_CLIENT, auth.MODE_MUX, "alice", "bob", b"a" * 16, b"b" * 16)
    mac = auth.transcript_mac(*base)
    variants = [
        (b"another secret, 16 bytes or more", *base[1:]),
        (base[0], auth.ROLE_SERVER, *base[2:]),  # a server's MAC is no client's
        (*base[:2], auth.MODE_SESSION, *base[3:]),
        (*base[:3], "mallory", *base[4:]),
        (*base[:4], "carol", *base[5:]),
        (*base[:3], "alic", "ebob", *base[5:]),  # same bytes, split differently: length-prefixed, so differs
        (*base[:5], b"c" * 16, base[6]),
        (*base[:6], b"c" * 16),
    ]
    for v in variants:
        assert not auth.mac_ok(mac, auth.transcript_mac(*v))
    assert auth.mac_ok(mac, auth.transcript_mac(*base))


def test_short_or_non_bytes_secrets_are_a_local_error() -> None:
    with pytest.raises(InvalidKey):
        auth.check_secret(b"x" * 15)
    with pytest.raises(InvalidKey):
        auth.check_secret("a string secret!!")
    assert auth.check_secret(bytearray(16)) == bytes(16)
