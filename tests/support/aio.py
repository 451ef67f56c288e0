"""Shared helpers for the loopback asyncio tests."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from natpool.aio.pool import AsyncPairPool
    from natpool.endpoints import EndpointPair


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


async def wait_for(pool: AsyncPairPool, cond: Callable[[], bool]) -> None:
    """Wait (on the pool's own change notifications, no polling sleep) until ``cond()`` holds."""
    while not cond():
        await pool.wait_changed()


async def bind_when_free(addr: tuple[str, int]) -> socket.socket:
    """Bind a dead peer's port as soon as its socket is closed: the attacker then sends from its exact address."""
    for _ in range(400):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(addr)
        except OSError as exc:
            s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            await asyncio.sleep(0.005)
            continue
        s.setblocking(False)
        return s
    raise AssertionError(f"{addr} never became free")


def loopback_pair(nonce: int) -> tuple[EndpointPair, socket.socket, socket.socket]:
    """A pair alice<->bob on two freshly bound loopback sockets (bound first: no port races)."""
    from natpool.endpoints import Endpoint, EndpointPair

    sa, sb = bound_socket(), bound_socket()
    pair = EndpointPair(Endpoint("alice", "127.0.0.1", sa.getsockname()[1]),
                        Endpoint("bob", "127.0.0.1", sb.getsockname()[1]), nonce)
    return pair, sa, sb
