"""Sub-keys of a pair's key, one per purpose (keyed BLAKE2b), so a MAC for one purpose never verifies for another.

The pair's key (``add(..., key=...)``) is secret material the traversal layer
shares with the peer; natpool never uses it directly. ``derive`` maps it to an
independent 32-byte key per purpose: keyed BLAKE2b with the key as the BLAKE2
key and the purpose as its personalisation string (RFC 7693's domain separation).
"""

from __future__ import annotations

import hashlib
from typing import Final

#: Purpose of the keepalive frames' MAC (natpool.wire.keepalive).
KEEPALIVE: Final = b"natpool-ka"
#: Purpose of the signals' MAC.
SIGNAL: Final = b"natpool-sig"


def derive(key: bytes, purpose: bytes) -> bytes:
    """The 32-byte sub-key of ``key`` for ``purpose`` (:data:`KEEPALIVE` or :data:`SIGNAL`)."""
    return hashlib.blake2b(key=key, person=purpose, digest_size=32).digest()
