"""Per-pair sub-keys (issue 10): one function, so every keyed codec derives them alike.

The per-pair key comes from the traversal layer; each use (keepalive frames,
handover signals) gets its own sub-key, so a MAC valid in one protocol is
never valid in the other. Keyed BLAKE2b with the purpose in ``person``.
"""

from __future__ import annotations

import hashlib


def derive(key: bytes, purpose: str) -> bytes:
    """32-byte sub-key of ``key`` for ``purpose`` ("ka" keepalives, "sig" signals)."""
    return hashlib.blake2b(key=key, person=b"natpool-" + purpose.encode(), digest_size=32).digest()
