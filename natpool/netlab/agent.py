"""``python -m natpool.netlab.agent``: one host's natpool process, run inside its namespace.

Started by the lab with ``ip netns exec <host-ns> python -m natpool.netlab.agent``
and driven over stdin/stdout with JSON lines: each request
``{"id": n, "cmd": "...", ...}`` gets exactly one reply ``{"id": n, "ok": true,
"result": {...}}`` (or ``"ok": false, "error": "..."``); requests run
concurrently, so a ``take`` can be in flight while ``status`` is asked. Logs go
to stderr; stdout carries nothing but replies. EOF on stdin ends the agent, so
it never outlives the test that started it.

The flow a test drives: ``bind`` a plain UDP socket, ``punch`` (simultaneous
sends to the peer's assumed public endpoint), ``drain`` stray punch datagrams,
``pool`` + ``add`` (the punched socket goes to :meth:`AsyncPairPool.add` as
``sock=``), ``serve`` / ``peer`` for the TCP reference signalling over the
side link, then ``take`` or a lease arriving as responder, ``send`` on the
lease, ``status`` at any time.

Times are the driver's clock, ``loop.time()`` = ``time.monotonic()``
(CLOCK_MONOTONIC is not namespaced), so the test can compare them with its
own readings and with the routers' conntrack tables. The agent runs plain
asyncio (no uvloop) for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import select
import socket
import sys
import time
import traceback
from typing import Any

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import TcpSignalling, TcpSignallingServer
from natpool.config import PairConfig
from natpool.core.entry import PairEntry, StateChanged
from natpool.core.lease import Lease
from natpool.endpoints import Endpoint, EndpointPair
from natpool.signalling import SignalChannel
from natpool.wire.frame import FRAME_SIZE

log = logging.getLogger("natpool.netlab.agent")

PUNCH = b"natpool-punch "  # + b"0" (not heard you yet) or b"1" (heard you): 15 bytes, never keepalive-shaped


def payload(size: int) -> bytes:
    """Application test data of ``size`` bytes; its 9th byte is never 0/1, so it never looks like a keepalive."""
    return (b"app!" * (size // 4 + 1))[:size]


def punch(sock: socket.socket, peer: tuple[str, int], timeout: float, interval: float) -> dict[str, Any]:
    """Simultaneous-open hole punch with plain sends; done once the peer says it heard us.

    Every ``interval`` we send ``PUNCH + heard-flag`` to the peer's assumed
    public endpoint; the first datagram from the peer is answered at once with
    the flag set, so each side sends at least one flagged datagram after both
    routers hold their mapping. Datagrams from any other address (a symmetric
    NAT picked another port) are recorded in ``seen_from`` but do not count.
    """
    started = time.monotonic()
    deadline = started + timeout
    heard = done = False
    sent = 0
    seen_from: list[list[Any]] = []
    next_send = started

    def send() -> None:
        nonlocal sent
        sock.sendto(PUNCH + (b"1" if heard else b"0"), peer)
        sent += 1

    while not done and (now := time.monotonic()) < deadline:
        if now >= next_send:
            send()
            next_send = now + interval
        ready, _, _ = select.select([sock], [], [], max(0.0, min(next_send, deadline) - time.monotonic()))
        if not ready:
            continue
        try:
            data, addr = sock.recvfrom(2048)
        except BlockingIOError:
            continue
        if not data.startswith(PUNCH):
            continue
        if (addr[0], addr[1]) != peer:
            if [addr[0], addr[1]] not in seen_from:
                seen_from.append([addr[0], addr[1]])
            continue
        if not heard:
            heard = True
            send()
        if data.endswith(b"1"):
            done = True
    return {"done": done, "heard": heard, "sent": sent, "seen_from": seen_from,
            "elapsed": time.monotonic() - started, "t": time.monotonic()}


class _LeaseProtocol(asyncio.DatagramProtocol):
    """The application on a leased socket: records every datagram (time, size, sender, intact?)."""

    def __init__(self, agent: AgentState) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.agent.lease_rx.append({"t": time.monotonic(), "size": len(data), "from": [addr[0], addr[1]],
                                    "intact": data == payload(len(data)),
                                    "keepalive_shaped": len(data) == FRAME_SIZE and data[-1] < 2})


class _DelayedChannel:
    """A signalling channel whose ``n``-th received message (1-based) is delivered ``delay`` s late.

    For the initiator, message 2 is TAKEN: holding it back keeps the
    initiator Locked while the responder, already InUse, starts sending, so
    the lab deterministically exercises "application data reaches a Locked
    entry" instead of leaving it to a race between TCP and UDP.
    """

    def __init__(self, inner: SignalChannel, n: int, delay: float) -> None:
        self.inner, self.n, self.delay, self.count = inner, n, delay, 0

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes:
        data = await self.inner.recv()
        self.count += 1
        if self.count == self.n:
            await asyncio.sleep(self.delay)  # the point of this wrapper: a slow signalling path
        return data

    async def close(self) -> None:
        await self.inner.close()


class _DelayedSignalling(TcpSignalling):
    def __init__(self, local_identity: str, peers: dict[str, tuple[str, int]], n: int, delay: float) -> None:
        super().__init__(local_identity, peers, allow_unauthenticated=True)  # a test rig in its own namespaces
        self.n, self.delay = n, delay

    async def open(self, peer: str) -> _DelayedChannel:  # type: ignore[override]
        return _DelayedChannel(await super().open(peer), self.n, self.delay)


class AgentState:
    """Everything one agent owns; every ``cmd_*`` method is a request the test can send."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pool: AsyncPairPool | None = None
        self.entries: dict[int, PairEntry] = {}
        self.wire: list[list[Any]] = []  # [t, "send"/"recv", entry state, size, from/to port]
        self.events: list[dict[str, Any]] = []
        self.lease: Lease | None = None
        self.lease_info: dict[str, Any] | None = None
        self.lease_rx: list[dict[str, Any]] = []
        self.server: TcpSignallingServer | None = None
        self.send_on_lease: list[int] = []

    # --- plain socket, before the pool -----------------------------------------------------------

    async def cmd_bind(self, host: str, port: int = 0) -> dict[str, Any]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        s.setblocking(False)
        self.sock = s
        return {"port": s.getsockname()[1]}

    def _raw(self) -> socket.socket:
        if self.sock is None:
            raise RuntimeError("no socket: bind first")
        return self.sock

    async def cmd_punch(self, peer: list[Any], timeout: float = 3.0, interval: float = 0.05) -> dict[str, Any]:
        return punch(self._raw(), (str(peer[0]), int(peer[1])), timeout, interval)

    async def cmd_drain(self) -> dict[str, Any]:
        s, n = self._raw(), 0
        while True:
            try:
                s.recvfrom(65536)
            except BlockingIOError:
                return {"drained": n}
            n += 1

    async def cmd_send_raw(self, peer: list[Any], size: int) -> dict[str, Any]:
        self._raw().sendto(payload(size), (str(peer[0]), int(peer[1])))
        return {"t": time.monotonic()}

    async def cmd_recv_raw(self, timeout: float) -> dict[str, Any]:
        s, got = self._raw(), []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    data, addr = s.recvfrom(65536)
                    got.append({"size": len(data), "from": [addr[0], addr[1]]})
        return {"received": got}

    # --- the pool ---------------------------------------------------------------------------------

    async def cmd_pool(self, identity: str, config: dict[str, Any]) -> dict[str, Any]:
        cfg = PairConfig(**config)
        self.pool = AsyncPairPool(identity, cfg, wire_observer=self._observe, on_lease=self._on_lease)
        self.pool.on_event(self._on_event)
        await self.pool.__aenter__()
        return {"config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}

    def _pool(self) -> AsyncPairPool:
        if self.pool is None:
            raise RuntimeError("no pool: send 'pool' first")
        return self.pool

    def _observe(self, direction: str, nonce: int, data: bytes, addr: tuple[str, int], state: str) -> None:
        self.wire.append([time.monotonic(), direction, state, len(data), addr[1]])

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, StateChanged):
            self.events.append({"t": ev.at, "nonce": ev.nonce, "source": ev.source, "target": ev.target,
                                "event": ev.event, "reason": ev.reason.value if ev.reason else None})

    async def cmd_add(self, pair: dict[str, Any], is_pinger: bool) -> dict[str, Any]:
        if self.sock is None:
            raise RuntimeError("no punched socket to hand over")
        p = EndpointPair(Endpoint(*pair["a"]), Endpoint(*pair["b"]), int(pair["nonce"]))
        entry = await self._pool().add(p, is_pinger, sock=self.sock)
        self.sock = None  # the pool owns it now
        self.entries[p.nonce] = entry
        return {"t": time.monotonic(), "state": str(entry.state)}

    # --- signalling and the handover ---------------------------------------------------------------

    async def cmd_serve(self, host: str, port: int = 0, send_on_lease: list[int] | None = None) -> dict[str, Any]:
        self.send_on_lease = list(send_on_lease or [])
        self.server = await TcpSignallingServer(self._pool().serve_handover, host=host, port=port,
                                                allow_unauthenticated=True).start()
        return {"address": list(self.server.address)}

    async def cmd_peer(self, identity: str, host: str, port: int, delay_recv: int = 0,
                       delay: float = 0.0) -> dict[str, Any]:
        """Dial ``identity``'s signalling at (host, port); optionally hold back received message ``delay_recv``."""
        pool = self._pool()
        peers = {identity: (host, port)}
        pool.signalling = (_DelayedSignalling(pool.local_identity, peers, delay_recv, delay) if delay_recv
                           else TcpSignalling(pool.local_identity, peers, allow_unauthenticated=True))
        return {}

    def _adopt(self, lease: Lease, sizes: list[int]) -> None:
        """Install the recording protocol and send ``sizes`` at once, from the leased socket to the peer."""
        self.lease = lease
        proto = _LeaseProtocol(self)
        lease.set_protocol(proto)  # replays what arrived since the entry went silent
        transport = lease.transport
        assert transport is not None
        sent = []
        for size in sizes:
            transport.sendto(payload(size), lease.remote_addr)
            sent.append({"t": time.monotonic(), "size": size})
        entry = lease.entry
        self.lease_info = {
            "t": time.monotonic(), "role": lease.role, "state": str(entry.state), "sent": sent,
            "last_seen": entry.last_seen,
            "last_inbound": lease.last_inbound,
            "mapping_deadline": lease.mapping_deadline,
            "local_addr": list(lease.local_addr), "remote_addr": list(lease.remote_addr),
            "max_size": getattr(transport, "max_size", None),
        }

    def _on_lease(self, lease: Lease) -> None:
        self._adopt(lease, self.send_on_lease)

    async def cmd_take(self, nonce: int, send: list[int] | None = None) -> dict[str, Any]:
        lease = await self._pool().take(int(nonce))
        self._adopt(lease, list(send or []))
        assert self.lease_info is not None
        return self.lease_info

    async def cmd_send(self, sizes: list[int]) -> dict[str, Any]:
        if self.lease is None or self.lease.transport is None:
            raise RuntimeError("no lease")
        for size in sizes:
            self.lease.transport.sendto(payload(size), self.lease.remote_addr)
        return {"t": time.monotonic()}

    async def cmd_status(self) -> dict[str, Any]:
        entries = []
        for e in self.entries.values():
            seen = getattr(e, "seen_from", None)
            entries.append({
                "nonce": e.nonce, "state": str(e.state), "last_seen": e.last_seen,
                "frames_sent": e.stats.sent, "frames_received": e.stats.received,
                "drops": {r.value: n for r, n in e.stats.drops.items()},
                "seen_from": list(seen) if seen is not None else None,
            })
        return {"now": time.monotonic(), "entries": entries, "events": self.events, "wire": self.wire,
                "lease": self.lease_info, "lease_rx": self.lease_rx,
                "handover_outcomes": dict(self.pool.handover_outcomes) if self.pool else {}}

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.lease is not None and self.lease.transport is not None:
            self.lease.transport.close()
        if self.pool is not None:
            await self.pool.close()
        if self.sock is not None:
            self.sock.close()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _handle(agent: AgentState, req: dict[str, Any]) -> None:
    rid = req.pop("id", None)
    cmd = str(req.pop("cmd", ""))
    try:
        method = getattr(agent, f"cmd_{cmd}", None)
        if method is None:
            raise RuntimeError(f"unknown command {cmd!r}")
        result = await method(**req)
        _emit({"id": rid, "ok": True, "result": result})
    except Exception as exc:
        _emit({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    agent = AgentState()
    tasks: set[asyncio.Task[None]] = set()
    _emit({"id": 0, "ok": True, "result": {"ready": True, "pid": os.getpid()}})
    try:
        while line := await reader.readline():
            req = json.loads(line)
            if req.get("cmd") == "quit":
                _emit({"id": req.get("id"), "ok": True, "result": {}})
                break
            task = asyncio.create_task(_handle(agent, req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.close()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("NATPOOL_AGENT_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
