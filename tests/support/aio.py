"""Shared helpers for the loopback asyncio tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import Any


def run(coro: Awaitable[Any], bound: float = 10.0) -> Any:
    """Run bounded; any exception the loop swallowed (e.g. in a protocol callback) fails the test.

    ``bound`` is a failure bound, never a timing assertion.
    """
    errors: list[dict[str, Any]] = []

    async def bounded() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        return await asyncio.wait_for(coro, bound)

    result = asyncio.run(bounded())
    assert errors == []
    return result


def bound_socket() -> socket.socket:
    """A UDP socket bound to an ephemeral loopback port (stands in for a hole-punched one)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s
