"""Many handover sessions to one peer over one existing ordered connection.

natpool wants one ordered, reliable, message-framed channel per handover
session (:class:`natpool.SignalChannel`). An application that already keeps
one control connection to each peer does not need a connection per session:
:class:`natpool.Mux` carries every session to that peer on the one
connection (a session id and OPEN / DATA / CLOSE in each message; the frames
are :mod:`natpool.wire.mux`).

All the application writes is the *link*: its connection, seen as whole
messages with ``send`` / ``recv`` / ``close``. Here the connection is a plain
TCP stream and a message is a 2-byte length and the bytes; a WebSocket or a
relay stream already is message-framed and can be passed as it is.

Run: ``python examples/multiplexed_signalling.py``
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from loopback_pairs import add_pairs

from natpool import AsyncPairPool, ChannelBroken, Lease, Mux, PairConfig

LENGTH = struct.Struct("!H")


class StreamLink:
    """The application's existing TCP connection, as whole messages (the shape :class:`Mux` needs)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.peer_identity: str | None = None  # a plain TCP connection proves nobody's identity

    async def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ChannelBroken("the connection is closed")
        self.writer.write(LENGTH.pack(len(data)) + data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelBroken(f"the connection failed: {exc}") from exc

    async def recv(self) -> bytes:
        try:
            (length,) = LENGTH.unpack(await self.reader.readexactly(LENGTH.size))
            return await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise ChannelBroken("the connection ended") from exc

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def one_connection() -> tuple[StreamLink, StreamLink]:
    """The one connection the two nodes already have (here: TCP on loopback), seen from each end."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    dialled = StreamLink(*await asyncio.open_connection(*server.sockets[0].getsockname()[:2]))
    answered = StreamLink(*await accepted)
    server.close()
    return dialled, answered


async def main() -> None:
    cfg = PairConfig(ping_interval=0.05)  # fast pings, for the demo only
    async with AsyncPairPool("alice", cfg) as alice, AsyncPairPool("bob", cfg) as bob:
        alice_end, bob_end = await one_connection()
        # Each side: sessions it opens go out on the link; sessions the peer opens are served by its pool.
        alice_mux = Mux(alice_end, peer="bob", on_session=alice.serve_handover).start()
        bob_mux = Mux(bob_end, peer="alice", on_session=bob.serve_handover).start()
        alice.signalling, bob.signalling = alice_mux, bob_mux
        mine = await add_pairs(alice, bob, 4, first_nonce=1)  # alice pings these
        theirs = await add_pairs(bob, alice, 4, first_nonce=101)  # bob pings these

        # Eight handovers at once, four in each direction, all on the one connection. (With take_any on
        # both sides they could pick the same pair: then the pinger's session wins and the other gets PairBusy.)
        taken: list[Lease] = await asyncio.gather(*[alice.take(p.nonce) for p in mine],
                                                  *[bob.take(p.nonce) for p in theirs])
        accepted = [await bob.accept() for _ in range(4)] + [await alice.accept() for _ in range(4)]
        assert sorted(lease.nonce for lease in taken) == sorted(lease.nonce for lease in accepted)
        assert {lease.entry.state for lease in taken + accepted} == {"InUse"}
        print(f"{len(taken)} handovers over 1 connection: alice took {[le.nonce for le in taken[:4]]}, "
              f"bob took {[le.nonce for le in taken[4:]]}")
        print(f"sessions: alice opened {alice_mux.opened}, accepted {alice_mux.accepted}; "
              f"bob opened {bob_mux.opened}, accepted {bob_mux.accepted}; "
              f"drops: {dict(alice_mux.drops + bob_mux.drops)}")
        outcomes = alice.handover_outcomes + bob.handover_outcomes
        print(f"handover outcomes: {dict(outcomes)}")
        for lease in taken + accepted:
            lease.close()
        await alice_mux.close()
        await bob_mux.close()


if __name__ == "__main__":
    asyncio.run(main())
