"""Many handover sessions to one peer over one existing ordered connection.

natpool wants one ordered, reliable, message-framed channel per handover
session (:class:`natpool.SignalChannel`). An application that already keeps
one control connection to each peer does not need a connection per session:
this example multiplexes every session over that one stream by tagging each
message with a session id, the way HTTP/2 tags frames with a stream id.

Frame: ``session id (4 bytes) | kind (1 byte: OPEN, DATA or CLOSE) | length (2) | payload``.
The side that dialled the connection numbers its sessions 1, 3, 5, …, the
other 2, 4, 6, …, so both can open sessions at once without colliding.
OPEN starts a session; it is written in the same step that allocates the
id, so OPENs arrive in increasing id order and one for an id not above the
last is a replay (whereas the sessions' first signals may leave in any
order). CLOSE ends one session the way EOF ends a TCP connection: messages
already queued are still delivered first. A frame for no open session is
late remote input: dropped and counted, never raised.

Run: ``python examples/multiplexed_signalling.py``
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from loopback_pairs import add_pairs

from natpool import AsyncPairPool, ChannelBroken, Lease, LocalError, PairConfig, SignalChannel

HEADER = struct.Struct("!IBH")
OPEN, DATA, CLOSE = 0, 1, 2
MAX_PAYLOAD = 1024  # natpool signals are at most 64 bytes


class MuxChannel:
    """One session's :class:`natpool.SignalChannel` on a shared :class:`Mux`."""

    def __init__(self, mux: Mux, sid: int) -> None:
        self.mux, self.sid = mux, sid
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the peer closed (or the stream ended)
        self.closed = self.peer_closed = False

    async def send(self, data: bytes) -> None:
        if self.closed or self.peer_closed:
            raise ChannelBroken(f"session {self.sid} is closed")
        await self.mux.write(self.sid, DATA, data)

    async def recv(self) -> bytes:
        if self.closed or self.peer_closed:
            raise ChannelBroken(f"session {self.sid} is closed")
        data = await self.inbox.get()
        if data is None:
            self.peer_closed = True
            raise ChannelBroken(f"session {self.sid} closed")
        return data

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inbox.put_nowait(None)  # wake our own pending recv
            self.mux.forget(self.sid)
            if not self.peer_closed:
                await self.mux.write(self.sid, CLOSE)


class Mux:
    """A :class:`natpool.Signalling` whose every ``open`` is a new session on one existing stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, *, dialled: bool,
                 on_incoming: Callable[[SignalChannel], Coroutine[Any, Any, object]]) -> None:
        self.reader, self.writer, self.peer = reader, writer, peer
        self.on_incoming = on_incoming
        self.next_sid = 1 if dialled else 2  # ours; the peer's have the other parity
        self.highest_remote = 0
        self.opened: list[int] = []  # session ids this side opened, in order
        self.broken = False  # the stream ended: no session can run on it any more
        self.channels: dict[int, MuxChannel] = {}
        self.drops: Counter[str] = Counter()
        self.frames: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[object]] = set()
        self.reader_task = asyncio.create_task(self.read_loop())

    async def open(self, peer_identity: str) -> SignalChannel:
        if peer_identity != self.peer:
            raise LocalError(f"this connection reaches {self.peer!r}, not {peer_identity!r}")
        if self.broken or self.writer.is_closing():
            raise ChannelBroken(f"the connection to {self.peer!r} is gone")
        sid, self.next_sid = self.next_sid, self.next_sid + 2
        self.opened.append(sid)
        channel = self.channels[sid] = MuxChannel(self, sid)
        await self.write(sid, OPEN)  # no await before its frame is queued: OPENs leave in id order
        return channel

    async def write(self, sid: int, kind: int, payload: bytes = b"") -> None:
        if len(payload) > MAX_PAYLOAD:
            raise LocalError(f"signal of {len(payload)} bytes is over {MAX_PAYLOAD}")
        if self.broken:
            raise ChannelBroken(f"the connection to {self.peer!r} is gone")
        self.writer.write(HEADER.pack(sid, kind, len(payload)) + payload)
        self.frames["sent"] += 1
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelBroken(f"connection to {self.peer!r} failed: {exc}") from exc

    def forget(self, sid: int) -> None:
        self.channels.pop(sid, None)

    async def read_loop(self) -> None:
        try:
            while True:
                sid, kind, length = HEADER.unpack(await self.reader.readexactly(HEADER.size))
                payload = await self.reader.readexactly(length)
                self.frames["received"] += 1
                self.dispatch(sid, kind, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the stream ended: every session on it is broken
        finally:
            self.broken = True
            for channel in self.channels.values():
                channel.inbox.put_nowait(None)

    def dispatch(self, sid: int, kind: int, payload: bytes) -> None:
        if kind == OPEN and sid % 2 != self.next_sid % 2 and sid > self.highest_remote and not payload:
            self.highest_remote = sid  # a new session the peer opened: we are its responder
            self.channels[sid] = MuxChannel(self, sid)
            task = asyncio.create_task(self.on_incoming(self.channels[sid]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        channel = self.channels.get(sid)
        if channel is None and kind == CLOSE:
            return  # both ends close a finished session; the second CLOSE finds it gone already
        if channel is None or kind not in (DATA, CLOSE) or len(payload) > MAX_PAYLOAD:
            self.drops["frame for no open session, or malformed"] += 1  # remote input: counted, never raised
            return
        channel.inbox.put_nowait(payload if kind == DATA else None)

    async def close(self) -> None:
        self.writer.close()
        self.reader_task.cancel()
        await asyncio.gather(self.reader_task, *self.tasks, return_exceptions=True)


async def connected_muxes(alice: AsyncPairPool, bob: AsyncPairPool) -> tuple[Mux, Mux]:
    """The application's one existing connection between the two nodes (here: TCP on loopback)."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    bob_reader, bob_writer = await accepted
    server.close()
    return (Mux(reader, writer, "bob", dialled=True, on_incoming=alice.serve_handover),
            Mux(bob_reader, bob_writer, "alice", dialled=False, on_incoming=bob.serve_handover))


async def main() -> None:
    cfg = PairConfig(ping_interval=0.05)  # fast pings, for the demo only
    async with AsyncPairPool("alice", cfg) as alice, AsyncPairPool("bob", cfg) as bob:
        alice_mux, bob_mux = await connected_muxes(alice, bob)
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
        print(f"session ids: alice opened {sorted(alice_mux.opened)}, bob opened {sorted(bob_mux.opened)}; "
              f"frames sent: alice {alice_mux.frames['sent']}, bob {bob_mux.frames['sent']}; "
              f"drops: {dict(alice_mux.drops + bob_mux.drops)}")
        outcomes = alice.handover_outcomes + bob.handover_outcomes
        print(f"handover outcomes: {dict(outcomes)}")
        for lease in taken + accepted:
            lease.close()
        await alice_mux.close()
        await bob_mux.close()


if __name__ == "__main__":
    asyncio.run(main())
