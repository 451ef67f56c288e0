"""The authenticated hello of the reference TCP signalling (:mod:`natpool.aio.tcp`): frames and MACs.

A mutual challenge–response over a pre-shared secret, three frames, each one
length-prefixed TCP frame::

    client -> server  HELLO      b"natpool-auth/1 " | mode (1) | client nonce (16) | client identity (UTF-8)
    server -> client  CHALLENGE  b"C" | server nonce (16) | server MAC (32) | server identity (UTF-8)
    client -> server  PROOF      b"P" | client MAC (32)

``mode`` is ``S`` (one connection per handover session) or ``M`` (one
persistent, multiplexed connection). Both MACs are HMAC-SHA256 under the
secret the two nodes share, over the same transcript: a role label
(``server`` / ``client``), the mode, both identities (length-prefixed, so no
two pairs of names give the same bytes) and both nonces. Hence:

* the server proves it holds the secret for *this* client and names itself
  (the client checks that name is the peer it dialled), the client proves it
  holds the secret for *that* server: authentication is mutual;
* each side's MAC covers the other side's fresh random nonce, so a recorded
  hello, challenge or proof is worthless on any other connection (a replayed
  transcript fails the MAC check);
* the role label keeps a server's MAC from being reflected as a client's.

What it does not give: the stream after the hello is plain TCP, so an
attacker *on the path* can still relay a genuine handshake and then inject
into the connection. Against that, the per-pair signal MACs (issue 10,
``key=``) protect the handover itself, or the connections run over TLS
(``ssl=``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from natpool.errors import DropReason, InvalidKey, RemoteProtocolError

AUTH_HELLO_PREFIX = b"natpool-auth/1 "
NONCE_SIZE = 16
MAC_SIZE = 32
MIN_SECRET_SIZE = 16
MODE_SESSION = b"S"
MODE_MUX = b"M"
_MODES = (MODE_SESSION, MODE_MUX)
CHALLENGE = b"C"
PROOF = b"P"
ROLE_SERVER = b"server"
ROLE_CLIENT = b"client"
_LABEL = b"natpool-auth/1\x00"
_LEN16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Hello:
    mode: bytes
    nonce: bytes
    identity: str


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    mac: bytes
    identity: str


def check_secret(secret: object) -> bytes:
    """The secret as bytes; :class:`InvalidKey` if it is not bytes or shorter than 16 (a local mistake)."""
    if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_SIZE:
        raise InvalidKey(f"a signalling secret must be bytes of length >= {MIN_SECRET_SIZE}")
    return bytes(secret)


def _identity(data: bytes, what: str) -> str:
    if not data:
        raise RemoteProtocolError(DropReason.MALFORMED, f"{what} names no identity")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(DropReason.MALFORMED, f"{what} identity is not UTF-8") from None


def encode_hello(mode: bytes, nonce: bytes, identity: str) -> bytes:
    assert mode in _MODES and len(nonce) == NONCE_SIZE
    return AUTH_HELLO_PREFIX + mode + nonce + identity.encode()


def decode_hello(data: bytes) -> Hello:
    """Parse a HELLO (the caller checked the prefix); RemoteProtocolError(MALFORMED) if it is not one."""
    body = data[len(AUTH_HELLO_PREFIX):]
    if not data.startswith(AUTH_HELLO_PREFIX) or len(body) < 1 + NONCE_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, "short authenticated hello")
    mode = body[:1]
    if mode not in _MODES:
        raise RemoteProtocolError(DropReason.MALFORMED, f"unknown hello mode {mode!r}")
    return Hello(mode, body[1:1 + NONCE_SIZE], _identity(body[1 + NONCE_SIZE:], "hello"))


def encode_challenge(nonce: bytes, mac: bytes, identity: str) -> bytes:
    assert len(nonce) == NONCE_SIZE and len(mac) == MAC_SIZE
    return CHALLENGE + nonce + mac + identity.encode()


def decode_challenge(data: bytes) -> Challenge:
    if data[:1] != CHALLENGE or len(data) < 1 + NONCE_SIZE + MAC_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, "not a hello challenge")
    nonce, mac = data[1:1 + NONCE_SIZE], data[1 + NONCE_SIZE:1 + NONCE_SIZE + MAC_SIZE]
    return Challenge(nonce, mac, _identity(data[1 + NONCE_SIZE + MAC_SIZE:], "challenge"))


def encode_proof(mac: bytes) -> bytes:
    assert len(mac) == MAC_SIZE
    return PROOF + mac


def decode_proof(data: bytes) -> bytes:
    if data[:1] != PROOF or len(data) != 1 + MAC_SIZE:
        raise RemoteProtocolError(DropReason.MALFORMED, "not a hello proof")
    return data[1:]


def transcript_mac(secret: bytes, role: bytes, mode: bytes, client: str, server: str,
                   client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 of one side's view of the handshake (see the module docstring for what it binds)."""
    c, s = client.encode(), server.encode()
    msg = b"".join((_LABEL, role, b"\x00", mode, _LEN16.pack(len(c)), c, _LEN16.pack(len(s)), s,
                    client_nonce, server_nonce))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def mac_ok(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison (a timing side channel must not leak how much of a MAC was right)."""
    return hmac.compare_digest(expected, got)
