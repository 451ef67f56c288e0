"""asyncio driver: real UDP sockets and TCP signalling around the sans-IO core.

Import :class:`natpool.aio.pool.AsyncPairPool` and
:mod:`natpool.aio.tcp` directly; this package module stays import-light so
``natpool --help`` does not pull in the event-loop machinery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_available() -> bool:
    """True when the optional ``uvloop`` package is importable."""
    try:
        import uvloop  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run`` on uvloop when it is installed and wanted (it is never required)."""
    if use_uvloop and uvloop_available():
        import uvloop

        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)
