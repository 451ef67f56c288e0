"""Reference TCP signalling: framing, size limits, bad input dropped and counted (loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct

import pytest

from natpool.aio.tcp import (
    HELLO_PREFIX,
    MAX_QUEUED_FRAMES,
    MUX_HELLO_PREFIX,
    SIGNAL_RECV_BUFFER,
    IncomingChannel,
    TcpChannel,
    TcpSignalling,
    TcpSignallingServer,
)
from natpool.errors import ChannelBroken, DropReason, LocalError

BOUND = 10.0  # failure bound only; every test completes in milliseconds


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, BOUND))  # type: ignore[arg-type]


def test_frames_round_trip_and_hello_names_the_peer() -> None:
    async def main() -> None:
        seen: list[tuple[str | None, bytes]] = []
        done = asyncio.Event()

        async def handler(ch: IncomingChannel) -> None:
            msg = await ch.recv()
            seen.append((ch.peer, msg))
            await ch.send(b"pong:" + msg)
            done.set()

        async with TcpSignallingServer(handler) as server:
            client = TcpSignalling("alice", {"bob": server.address})
            ch = await client.open("bob")
            await ch.send(b"\x00" * 30)
            assert await ch.recv() == b"pong:" + b"\x00" * 30
            await done.wait()
            await ch.close()
            assert ch.closed
        assert seen == [("alice", b"\x00" * 30)]

    run(main())


def test_both_ends_read_in_small_chunks_and_a_frame_longer_than_one_read_arrives_whole() -> None:
    """Each connection reads at most SIGNAL_RECV_BUFFER per recv (not asyncio's 256 KiB: an mmap per read
    in some processes); a frame longer than that (a large ``max_frame``) comes in several reads and is joined."""
    big = bytes(range(256)) * 800  # 204,800 bytes: more than three reads' worth

    async def main() -> None:
        sizes: list[int] = []

        async def handler(ch: IncomingChannel) -> None:
            assert isinstance(ch, TcpChannel)
            sizes.append(ch._transport.max_size)  # type: ignore[attr-defined]
            msg = await ch.recv()
            await ch.send(len(msg).to_bytes(4, "big") + hashlib.sha256(msg).digest())  # every byte, not a sample

        async with TcpSignallingServer(handler, max_frame=len(big)) as server:
            ch = await TcpSignalling("alice", {"bob": server.address}, persistent=False,
                                     max_frame=len(big)).open("bob")
            assert isinstance(ch, TcpChannel)
            sizes.append(ch._transport.max_size)  # type: ignore[attr-defined]
            await ch.send(big)
            assert await ch.recv() == len(big).to_bytes(4, "big") + hashlib.sha256(big).digest()
            await ch.close()
        assert sizes == [SIGNAL_RECV_BUFFER, SIGNAL_RECV_BUFFER]
        assert SIGNAL_RECV_BUFFER < len(big) // 3

    run(main())


def test_a_channel_on_plain_asyncio_streams_reads_in_small_chunks_too() -> None:
    """A TcpChannel a user builds on asyncio.open_connection's streams (pull mode) sets the same read size."""
    async def main() -> None:
        sizes: list[int] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ch = TcpChannel(reader, writer)
            sizes.append(writer.transport.max_size)  # type: ignore[attr-defined]
            await ch.send(await ch.recv())
            await ch.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        ch = TcpChannel(reader, writer)
        sizes.append(writer.transport.max_size)  # type: ignore[attr-defined]
        await ch.send(b"ping")
        assert await ch.recv() == b"ping"
        await ch.close()
        server.close()
        await server.wait_closed()
        assert sizes == [SIGNAL_RECV_BUFFER, SIGNAL_RECV_BUFFER]

    run(main())


def test_recv_after_peer_closes_raises_channel_broken() -> None:
    async def main() -> None:
        async def handler(ch: IncomingChannel) -> None:
            await ch.close()

        async with TcpSignallingServer(handler) as server:
            ch = await TcpSignalling("alice", {"bob": server.address}).open("bob")
            with pytest.raises(ChannelBroken):
                await ch.recv()
            with pytest.raises(ChannelBroken):
                await ch.send(b"x")

    run(main())


def test_oversized_and_empty_frames_end_the_connection_and_are_counted() -> None:
    async def main() -> None:
        results: list[str] = []
        all_done = asyncio.Event()

        async def handler(ch: IncomingChannel) -> None:
            try:
                await ch.recv()
                results.append("got")
            except ChannelBroken:
                results.append("broken")
            if len(results) == 3:
                all_done.set()

        async with TcpSignallingServer(handler, max_frame=64) as server:
            host, port = server.address
            for length in (1 << 20, 0):
                reader, writer = await asyncio.open_connection(host, port)
                hello = HELLO_PREFIX + b"mallory"
                writer.write(struct.pack("!I", len(hello)) + hello + struct.pack("!I", length))
                await writer.drain()
                assert await reader.read() == b""  # server closed on us
                writer.close()
            # A well-behaved client still works afterwards.
            ch = await TcpSignalling("alice", {"bob": server.address}).open("bob")
            await ch.send(b"ok")
            await ch.close()
            await all_done.wait()
        assert results == ["broken", "broken", "got"]
        assert server.drops[DropReason.OVERSIZED] == 1
        assert server.drops[DropReason.MALFORMED] == 1

    run(main())


def test_garbage_instead_of_hello_is_dropped_and_server_survives() -> None:
    async def main() -> None:
        handled: list[str | None] = []
        got = asyncio.Event()

        async def handler(ch: IncomingChannel) -> None:
            handled.append(ch.peer)
            got.set()

        async with TcpSignallingServer(handler) as server:
            host, port = server.address
            for junk in (b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x03\xff\xfe\xfd", b"\x00\x00"):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(junk)
                writer.write_eof()
                assert await reader.read() == b""
                writer.close()
            ch = await TcpSignalling("alice", {"bob": server.address}).open("bob")
            await ch.close()
            await got.wait()
        assert handled == ["alice"]
        assert server.drops[DropReason.MALFORMED] == 2
        assert server.handler_errors == 0

    run(main())


def test_read_timeout_closes_a_silent_connection() -> None:
    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(ch: IncomingChannel) -> None:
            try:
                await ch.recv()
                outcome.set_result("got")
            except ChannelBroken as exc:
                outcome.set_result(str(exc))

        async with TcpSignallingServer(handler, read_timeout=0.05) as server:
            ch = await TcpSignalling("alice", {"bob": server.address}).open("bob")
            assert await outcome == "read timeout"
            await ch.close()

    run(main())


def test_unknown_peer_and_unreachable_peer() -> None:
    async def main() -> None:
        sig = TcpSignalling("alice", {"bob": ("127.0.0.1", 1)})
        with pytest.raises(LocalError):
            await sig.open("carol")
        with pytest.raises(ChannelBroken):
            await sig.open("bob")

    run(main())


def test_identity_too_long_for_a_hello_is_refused_up_front() -> None:
    with pytest.raises(LocalError):
        TcpSignalling("a" * 100, max_frame=64)
    assert TcpSignalling("a" * (64 - len(HELLO_PREFIX)), max_frame=64).max_frame == 64


# --- persistent mode: one connection per peer, sessions multiplexed -----------------------------


def test_persistent_mode_is_the_default_and_takes_share_one_connection() -> None:
    async def main() -> None:
        peers: list[str | None] = []

        async def handler(ch: IncomingChannel) -> None:
            peers.append(ch.peer)
            await ch.send(b"pong:" + await ch.recv())

        async with TcpSignallingServer(handler) as server, TcpSignalling("alice", {"bob": server.address}) as sig:
            assert sig.persistent
            for i in range(3):
                ch = await sig.open("bob")
                await ch.send(b"%d" % i)
                assert await ch.recv() == b"pong:%d" % i
                await ch.close()
            # concurrent first uses of a second client share one connect too
            sig2 = TcpSignalling("carol", {"bob": server.address})
            chans = await asyncio.gather(*(sig2.open("bob") for _ in range(4)))
            for ch in chans:
                await ch.send(b"c")
            assert [await ch.recv() for ch in chans] == [b"pong:c"] * 4
            assert sig.connects == 1 and sig2.connects == 1
            assert len(server.links) == 2
            await sig2.close()
        assert peers == ["alice"] * 3 + ["carol"] * 4
        assert server.sessions_served == 7 and server.handler_errors == 0

    run(main())


def test_losing_the_connection_fails_its_sessions_and_the_next_open_reconnects() -> None:
    async def main() -> None:
        waiting = asyncio.Event()
        served = 0

        async def handler(ch: IncomingChannel) -> None:
            nonlocal served
            served += 1
            if served == 2:
                waiting.set()
            with contextlib.suppress(ChannelBroken):  # the first two see their connection die
                await ch.send(b"pong:" + await ch.recv())

        async with TcpSignallingServer(handler) as server, TcpSignalling("alice", {"bob": server.address}) as sig:
            chans = [await sig.open("bob"), await sig.open("bob")]
            await waiting.wait()
            (link,) = server.links
            await link.link.close()  # the connection dies mid-session (from the server's end)
            for ch in chans:
                with pytest.raises(ChannelBroken):
                    await ch.recv()
                with pytest.raises(ChannelBroken):
                    await ch.send(b"x")
            ch = await sig.open("bob")  # a new connection
            await ch.send(b"again")
            assert await ch.recv() == b"pong:again"
            assert sig.connects == 2
        assert server.handler_errors == 0

    run(main())


def test_persistent_server_refuses_sessions_beyond_its_cap() -> None:
    async def main() -> None:
        hold = asyncio.Event()

        async def handler(ch: IncomingChannel) -> None:
            await hold.wait()

        async with TcpSignallingServer(handler, max_sessions=2) as server, \
                TcpSignalling("alice", {"bob": server.address}) as sig:
            c1, c2, c3 = [await sig.open("bob") for _ in range(3)]
            for ch in (c1, c2, c3):
                await ch.send(b"hello")
            with pytest.raises(ChannelBroken):
                await c3.recv()  # refused: CLOSE came back
            (link,) = server.links
            assert link.refused_remote == 1 and link.sessions == 2
            hold.set()
            for ch in (c1, c2):
                with pytest.raises(ChannelBroken):
                    await ch.recv()  # the handler returned: its session closed

    run(main())


def test_a_bad_mux_frame_on_a_persistent_connection_is_counted_and_the_connection_survives() -> None:
    async def main() -> None:
        async def handler(ch: IncomingChannel) -> None:
            await ch.send(b"pong:" + await ch.recv())

        async with TcpSignallingServer(handler) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            for frame in (MUX_HELLO_PREFIX + b"mallory", b"\x00\x01\x02\x03\x04\x05",
                          b"\xa9\x00\x00\x00\x01", b"\xaa\x00\x00\x00\x01ping"):
                writer.write(struct.pack("!I", len(frame)) + frame)
            header = await reader.readexactly(4)
            reply = await reader.readexactly(struct.unpack("!I", header)[0])
            assert reply == b"\xa2\x00\x00\x00\x01pong:ping"  # DATA on session 1, which mallory opened
            (link,) = server.links
            assert link.drops == {DropReason.MALFORMED: 1}
            writer.close()

    run(main())


def _framed(*frames: bytes) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def test_push_mode_delivers_queued_and_new_frames_in_order_then_ends_once() -> None:
    """listen(): frames go to the callback from the transport's read callback, in order, then one on_end."""
    async def main() -> None:
        got: list[bytes] = []
        ended: list[str] = []
        done = asyncio.Event()

        def on_end(why: str) -> None:
            ended.append(why)
            done.set()

        async def handler(ch: IncomingChannel) -> None:
            assert isinstance(ch, TcpChannel) and ch.can_listen
            assert await ch.recv() == b"one"  # pull mode first, as a hello would be read
            ch.listen(got.append, on_end)
            await done.wait()

        async with TcpSignallingServer(handler) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(_framed(HELLO_PREFIX + b"alice", b"one", b"two", b"three"))  # two of them queued
            await writer.drain()
            while len(got) < 2:
                await asyncio.sleep(0)
            writer.write(_framed(b"four") + _framed(b"five")[:3])  # a frame split across segments
            await writer.drain()
            while len(got) < 3:
                await asyncio.sleep(0)
            writer.write(_framed(b"five")[3:])
            writer.write_eof()
            assert await reader.read() == b""  # the server closed its end after on_end
            writer.close()
        assert got == [b"two", b"three", b"four", b"five"]
        assert len(ended) == 1 and "EOF" in ended[0]

    run(main())


def test_push_mode_delivers_the_good_frames_before_a_bad_length_ends_the_connection() -> None:
    async def main() -> None:
        got: list[bytes] = []
        ended: list[str] = []
        done = asyncio.Event()

        def on_end(why: str) -> None:
            ended.append(why)
            done.set()

        async def handler(ch: IncomingChannel) -> None:
            assert isinstance(ch, TcpChannel)
            ch.listen(got.append, on_end)
            await done.wait()

        async with TcpSignallingServer(handler, max_frame=64) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(_framed(HELLO_PREFIX + b"alice", b"ok") + struct.pack("!I", 65) + b"x" * 65)
            assert await reader.read() == b""
            writer.close()
            await done.wait()
        assert got == [b"ok"] and ended == ["bad frame length 65"]
        assert server.drops == {DropReason.OVERSIZED: 1}

    run(main())


def test_a_flood_nobody_reads_pauses_reading_until_recv_drains_it() -> None:
    """Frames queued with no reader (a hello still in progress) are bounded: TCP pushes back instead."""
    async def main() -> None:
        channel: list[TcpChannel] = []
        release, drained, finish = asyncio.Event(), asyncio.Event(), asyncio.Event()
        seen: list[bytes] = []

        async def handler(ch: IncomingChannel) -> None:
            assert isinstance(ch, TcpChannel)
            channel.append(ch)
            await release.wait()
            for _ in range(MAX_QUEUED_FRAMES + 10):
                seen.append(await ch.recv())
            drained.set()
            await finish.wait()

        async with TcpSignallingServer(handler) as server:
            _reader, writer = await asyncio.open_connection(*server.address)
            writer.write(_framed(HELLO_PREFIX + b"alice"))
            while not channel:
                await asyncio.sleep(0)
            writer.write(_framed(*[b"%d" % i for i in range(MAX_QUEUED_FRAMES + 10)]))
            await writer.drain()
            transport = channel[0]._writer.transport
            assert isinstance(transport, asyncio.ReadTransport)
            while transport.is_reading():
                await asyncio.sleep(0)
            release.set()
            await drained.wait()
            assert transport.is_reading()  # resumed once recv emptied the queue
            finish.set()
            writer.close()
        assert seen == [b"%d" % i for i in range(MAX_QUEUED_FRAMES + 10)]

    run(main())
