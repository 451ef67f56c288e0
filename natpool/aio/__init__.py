"""asyncio driver: real UDP sockets and TCP signalling around the sans-IO core.

Import :class:`natpool.aio.pool.AsyncPairPool` and :mod:`natpool.aio.tcp`
directly; this package module stays import-light so ``natpool --help`` does
not pull in the event-loop machinery. A node, in short::

    pool = AsyncPairPool("alice", PairConfig())
    server = await TcpSignallingServer(pool.serve_handover, host="0.0.0.0", port=7000,
                                       identity="alice", secrets={"bob": k_ab}).start()   # k_ab: >= 16 bytes
    pool.signalling = TcpSignalling("alice", {"bob": ("198.51.100.7", 7000)}, secrets={"bob": k_ab})
    await pool.add(pair, is_pinger=True, sock=punched_socket)   # kept alive from now on
    lease = await pool.take_any("bob")       # or, when bob took: lease = await pool.accept()
    async with lease:                        # closes the lease (its socket, its entry) on exit
        lease.set_protocol(MyProtocol())     # replays what the peer sent before; the socket is still bound
        lease.transport.sendto(b"hi", lease.remote_addr)   # before lease.mapping_deadline, and often
    await server.close(); await pool.close()

``natpool demo`` (:mod:`natpool.aio.demo`) runs exactly this for two nodes
in one process.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_available() -> bool:
    """True when the optional ``uvloop`` package is importable."""
    return importlib.util.find_spec("uvloop") is not None


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run`` on uvloop when it is installed and wanted (it is never required)."""
    if use_uvloop and uvloop_available():
        uvloop: Any = importlib.import_module("uvloop")  # optional, untyped here on purpose
        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)
