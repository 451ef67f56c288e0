"""Reference TCP signalling: framing, size limits, bad input dropped and counted (loopback only)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from natpool.aio.tcp import HELLO_PREFIX, IncomingChannel, TcpSignalling, TcpSignallingServer
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
