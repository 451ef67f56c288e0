"""Handover signalling over WebSockets: one WebSocket connection per handover session.

natpool needs one ordered, reliable, message-framed channel per session
(:class:`natpool.SignalChannel`); a WebSocket is exactly that, with one
binary message per signal. The initiator's :class:`natpool.Signalling`
dials the peer's WebSocket URL for every ``take``; the peer's server hands
each connection to ``serve_handover``. The URL path names the caller.

Needs the ``websockets`` extra: ``pip install 'natpool[websockets]'``.
Run: ``python examples/websocket_signalling.py``
"""

from __future__ import annotations

import asyncio

from loopback_pairs import add_pairs
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from natpool import AsyncPairPool, ChannelBroken, PairConfig, SignalChannel

MAX_MESSAGE = 4096  # natpool signals are at most 64 bytes


class WebSocketChannel:
    """A :class:`natpool.SignalChannel` on one WebSocket connection (either end)."""

    def __init__(self, ws: ClientConnection | ServerConnection) -> None:
        self.ws = ws
        self.peer_identity: str | None = None  # nothing verified here (authenticate in your WebSocket layer)

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)  # bytes: one binary message
        except ConnectionClosed as exc:
            raise ChannelBroken(f"websocket closed: {exc}") from exc

    async def recv(self) -> bytes:
        try:
            message = await self.ws.recv()
        except ConnectionClosed as exc:
            raise ChannelBroken(f"websocket closed: {exc}") from exc
        # A text message is the peer's bad input: passed on as bytes, the session drops and counts it.
        return message if isinstance(message, bytes) else message.encode()

    async def close(self) -> None:
        await self.ws.close()


class WebSocketSignalling:
    """A :class:`natpool.Signalling`: dials ``urls[peer]`` once per handover session."""

    def __init__(self, local_identity: str, urls: dict[str, str]) -> None:
        self.local_identity, self.urls = local_identity, urls
        self.opened = 0

    async def open(self, peer_identity: str) -> SignalChannel:
        try:
            ws = await connect(f"{self.urls[peer_identity]}/{self.local_identity}", max_size=MAX_MESSAGE)
        except OSError as exc:
            raise ChannelBroken(f"cannot reach {peer_identity!r}: {exc}") from exc
        self.opened += 1
        return WebSocketChannel(ws)


async def main() -> None:
    cfg = PairConfig(ping_interval=0.05)  # fast pings, for the demo only
    async with AsyncPairPool("alice", cfg) as alice, AsyncPairPool("bob", cfg) as bob:
        callers: list[str] = []

        async def on_connect(ws: ServerConnection) -> None:  # bob's side: one connection = one session
            callers.append(ws.request.path if ws.request is not None else "?")
            await bob.serve_handover(WebSocketChannel(ws))

        async with serve(on_connect, "127.0.0.1", 0, max_size=MAX_MESSAGE) as server:
            host, port = next(iter(server.sockets)).getsockname()[:2]
            signalling = WebSocketSignalling("alice", {"bob": f"ws://{host}:{port}/natpool"})
            alice.signalling = signalling
            await add_pairs(alice, bob, 3)

            leases = await asyncio.gather(*[alice.take_any("bob") for _ in range(3)])
            peer_leases = [await bob.accept() for _ in leases]
            assert sorted(le.nonce for le in leases) == sorted(le.nonce for le in peer_leases)
            print(f"{len(leases)} handovers over {signalling.opened} websocket connections "
                  f"(bob saw {sorted(callers)}): pairs {sorted(le.nonce for le in leases)}, "
                  f"states {sorted({le.entry.state for le in leases + peer_leases})}")
            print(f"handover outcomes: alice {dict(alice.handover_outcomes)}, bob {dict(bob.handover_outcomes)}")
            for lease in leases + peer_leases:
                lease.close()


if __name__ == "__main__":
    asyncio.run(main())
