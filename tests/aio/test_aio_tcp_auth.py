"""Authenticated TCP signalling hello, connection/session caps and their logging (issue 10; loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable
from typing import Any

import pytest

import natpool.aio.tcp as tcp
from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import DropLog, IncomingChannel, TcpSignalling, TcpSignallingServer
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import ChannelBroken, DropReason, InvalidKey, LocalError
from natpool.mux import Mux, MuxChannel
from natpool.signalling import MemorySignalling, memory_channel_pair
from natpool.wire import hello as auth
from natpool.wire import signal as wire
from natpool.wire.signal import Signal, SignalType
from tests.support.aio import bound_socket
from tests.support.aio import run as _run

BOUND = 10.0  # failure bound only; every test completes in milliseconds
K_ALICE = b"alice-bob secret, 32 bytes long!"
K_MALLORY = b"mallory-bob secret, also 32 b..."
PER_PEER = {"alice": K_ALICE, "mallory": K_MALLORY}
_LEN = struct.Struct("!I")


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, BOUND)


def frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    return await reader.readexactly(n)


async def until(cond: Any) -> None:
    """Poll a condition the server reaches within milliseconds; the test's BOUND is the failure bound."""
    while not cond():
        await asyncio.sleep(0.001)


async def closed_on_us(reader: asyncio.StreamReader) -> bool:
    """True once the server closed the connection (EOF, or a reset if it left our bytes unread)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


def bob_server(handler: tcp.Handler, **kw: Any) -> TcpSignallingServer:
    return TcpSignallingServer(handler, identity="bob", secrets=PER_PEER, **kw)


class Recorder:
    """A handler that keeps every session's peer identities and first message, and holds it until released."""

    def __init__(self, hold: bool = False) -> None:
        self.seen: list[tuple[str | None, str | None, bytes]] = []
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, ch: IncomingChannel) -> None:
        try:
            msg = await ch.recv()
        except ChannelBroken:
            return  # the client gave up (a test's flood connection closing): not this handler's business
        self.seen.append((ch.peer, ch.peer_identity, msg))
        self.arrived.set()
        await self.release.wait()
        with contextlib.suppress(ChannelBroken):
            await ch.send(b"ok:" + msg)

    def by(self, peer: str) -> list[bytes]:
        return [m for p, _, m in self.seen if p == peer]


# --- mutual authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("persistent", [True, False])
def test_mutual_auth_verifies_both_ends_and_channels_carry_the_identity(persistent: bool) -> None:
    async def main() -> None:
        rec = Recorder()
        async with bob_server(rec) as server, \
                TcpSignalling("alice", {"bob": server.address}, secrets={"bob": K_ALICE},
                              persistent=persistent) as sig:
            ch = await sig.open("bob")
            assert ch.peer_identity == "bob"  # the server proved it holds alice's secret and is bob
            await ch.send(b"lock")
            assert await ch.recv() == b"ok:lock"
            await ch.close()
        assert rec.seen == [("alice", "alice", b"lock")]
        assert server.stats.authenticated == 1 and server.stats.hellos_refused == 0
        assert not server.drops and not sig.drops

    run(main())


def test_a_network_wide_secret_works_for_every_member() -> None:
    async def main() -> None:
        net = b"one secret for the whole network"
        rec = Recorder()
        async with TcpSignallingServer(rec, identity="bob", secrets=net) as server:
            for who in ("alice", "carol"):
                async with TcpSignalling(who, {"bob": server.address}, secrets=net) as sig:
                    ch = await sig.open("bob")
                    await ch.send(who.encode())
                    assert await ch.recv() == b"ok:" + who.encode()
        assert [(p, i) for p, i, _ in rec.seen] == [("alice", "alice"), ("carol", "carol")]

    run(main())


# --- refused hellos -----------------------------------------------------------------------------


def test_a_hello_for_a_foreign_identity_is_refused() -> None:
    async def main() -> None:
        rec = Recorder()
        async with bob_server(rec) as server:
            # carol has no secret with bob: refused before any challenge
            async with TcpSignalling("carol", {"bob": server.address}, secrets=b"carol's guess at a secret") as sig:
                with pytest.raises(ChannelBroken):
                    await sig.open("bob")
            # mallory holds HER secret and claims to be alice: the MAC under alice's secret cannot match
            reader, writer = await asyncio.open_connection(*server.address)
            nonce = os.urandom(auth.NONCE_SIZE)
            writer.write(frame(auth.encode_hello(auth.MODE_MUX, nonce, "alice")))
            challenge = auth.decode_challenge(await read_frame(reader))
            forged = auth.transcript_mac(K_MALLORY, auth.ROLE_CLIENT, auth.MODE_MUX, "alice", "bob", nonce,
                                         challenge.nonce)
            writer.write(frame(auth.encode_proof(forged)) + frame(b"\xa9\x00\x00\x00\x01"))  # + a mux OPEN
            assert await closed_on_us(reader)  # closed on her
            writer.close()
            # an unauthenticated (legacy) hello naming alice is refused too
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(frame(tcp.MUX_HELLO_PREFIX + b"alice") + frame(b"\xa9\x00\x00\x00\x01"))
            assert await closed_on_us(reader)
            writer.close()
        assert rec.seen == []
        assert server.drops == {DropReason.UNEXPECTED_PEER: 2, DropReason.BAD_MAC: 1}
        assert server.stats.hellos_refused == 3 and server.stats.authenticated == 0

    run(main())


def test_a_wrong_secret_is_refused_by_either_side() -> None:
    async def main() -> None:
        rec = Recorder()
        wrong = b"not the secret alice shares w/ bob"
        async with bob_server(rec) as server:
            # client with the wrong secret: it sees the server's MAC fail first and gives up (counted there)
            async with TcpSignalling("alice", {"bob": server.address}, secrets=wrong) as sig:
                with pytest.raises(ChannelBroken, match="failed to authenticate"):
                    await sig.open("bob")
                assert sig.drops == {DropReason.BAD_MAC: 1}
            # a raw client with the wrong secret that answers anyway: the server refuses the proof
            reader, writer = await asyncio.open_connection(*server.address)
            nonce = os.urandom(auth.NONCE_SIZE)
            writer.write(frame(auth.encode_hello(auth.MODE_SESSION, nonce, "alice")))
            challenge = auth.decode_challenge(await read_frame(reader))
            proof = auth.transcript_mac(wrong, auth.ROLE_CLIENT, auth.MODE_SESSION, "alice", "bob", nonce,
                                        challenge.nonce)
            writer.write(frame(auth.encode_proof(proof)) + frame(b"lock"))
            assert await closed_on_us(reader)
            writer.close()
        assert rec.seen == []
        assert server.drops == {DropReason.BAD_MAC: 1}

    run(main())


def test_a_server_that_claims_another_identity_is_refused_by_the_client() -> None:
    async def main() -> None:
        net = b"one secret for the whole network"
        async with TcpSignallingServer(Recorder(), identity="carol", secrets=net) as server, \
                TcpSignalling("alice", {"bob": server.address}, secrets=net) as sig:
            with pytest.raises(ChannelBroken, match="says it is 'carol'"):
                await sig.open("bob")
            assert sig.drops == {DropReason.UNEXPECTED_PEER: 1}

    run(main())


# --- replay -------------------------------------------------------------------------------------


class RecordingProxy:
    """A TCP relay between one client and a server that records both directions' bytes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = bytearray()  # client -> server
        self.down = bytearray()  # server -> client
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        name = self.server.sockets[0].getsockname()
        return (str(name[0]), int(name[1]))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    log += data
                    dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, w2, self.up), pipe(r2, writer, self.down))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_a_replayed_handshake_transcript_is_refused_both_ways() -> None:
    async def main() -> None:
        rec = Recorder()
        async with bob_server(rec) as server:
            proxy = RecordingProxy(server.address)
            via = await proxy.start()
            sig = TcpSignalling("alice", {"bob": via}, secrets={"bob": K_ALICE}, persistent=False)
            ch = await sig.open("bob")
            await ch.send(wire.encode(Signal(SignalType.LOCK, 0x1234, b"\x07" * 16, 1)))
            assert (await ch.recv()).startswith(b"ok:")
            await ch.close()
            await proxy.close()
            assert len(rec.seen) == 1

            # The eavesdropper replays everything alice sent (hello, proof, LOCK) on a new connection.
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(bytes(proxy.up))
            assert (await read_frame(reader))[:1] == auth.CHALLENGE  # a fresh challenge, which the old proof fails
            assert await closed_on_us(reader)
            writer.close()

            # ... or plays bob to alice with bob's recorded challenge: alice's fresh nonce makes it fail too.
            async def fake_bob(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await read_frame(r)
                w.write(bytes(proxy.down))
                with contextlib.suppress(ConnectionError):
                    await r.read()
                w.close()

            fake = await asyncio.start_server(fake_bob, "127.0.0.1", 0)
            name = fake.sockets[0].getsockname()
            sig.peers["bob"] = (str(name[0]), int(name[1]))
            with pytest.raises(ChannelBroken):
                await sig.open("bob")
            fake.close()
            await fake.wait_closed()
            assert sig.drops == {DropReason.BAD_MAC: 1}
        assert len(rec.seen) == 1  # the replay reached no handler
        assert server.drops == {DropReason.BAD_MAC: 1}

    run(main())


# --- limits -------------------------------------------------------------------------------------


async def _connect_from(address: tuple[str, int], source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address, local_addr=(source, 0))


def test_a_connection_flood_from_one_address_is_refused_and_a_legitimate_peer_still_gets_through() -> None:
    async def main() -> None:
        rec = Recorder()
        async with bob_server(rec, max_pending_per_host=4) as server:
            # 12 connections from 127.0.0.2 that never say hello: 4 wait in their hello, 8 are closed at once
            try:
                flood = [await _connect_from(server.address, "127.0.0.2") for _ in range(12)]
            except OSError as exc:  # pragma: no cover - every Linux routes 127/8 to lo
                pytest.skip(f"cannot bind 127.0.0.2: {exc}")
            eofs = [asyncio.ensure_future(closed_on_us(reader)) for reader, _ in flood]
            await until(lambda: sum(t.done() for t in eofs) >= 8)
            assert server.stats.refused_host == 8 and server.stats.pending == 4
            async with TcpSignalling("alice", {"bob": server.address}, secrets={"bob": K_ALICE}) as sig:
                ch = await sig.open("bob")
                await ch.send(b"hi")
                assert await ch.recv() == b"ok:hi"
            assert sum(t.done() for t in eofs) == 8  # the 4 pending ones are still waiting for their hello
            for _, writer in flood:
                writer.close()
            await asyncio.gather(*eofs)
        assert rec.by("alice") == [b"hi"]
        assert server.drops[DropReason.RATE_LIMITED] == 8
        assert server.stats.hellos_refused == 4  # the pending ones ended without a hello

    run(main())


async def _reply_or_broken(ch: tcp.TcpChannel | MuxChannel) -> bytes | None:
    try:
        return await ch.recv()
    except ChannelBroken:
        return None


def test_an_authenticated_peer_flooding_connections_hits_its_cap_and_others_are_unaffected() -> None:
    async def main() -> None:
        rec = Recorder(hold=True)
        async with bob_server(rec, max_connections_per_peer=3) as server:
            mallory = TcpSignalling("mallory", {"bob": server.address}, secrets={"bob": K_MALLORY},
                                    persistent=False)
            chans = [await mallory.open("bob") for _ in range(8)]  # each hello passes: mallory is a known peer
            for i, ch in enumerate(chans):
                with contextlib.suppress(ChannelBroken):
                    await ch.send(b"m%d" % i)
            await until(lambda: len(rec.by("mallory")) == 3 and server.stats.refused_peer == 5)
            alice = TcpSignalling("alice", {"bob": server.address}, secrets={"bob": K_ALICE}, persistent=False)
            ch = await alice.open("bob")
            await ch.send(b"hi")
            await until(lambda: rec.by("alice"))
            rec.release.set()
            assert await ch.recv() == b"ok:hi"
            await ch.close()
            replies = await asyncio.gather(*(_reply_or_broken(c) for c in chans))
            assert sorted(r is None for r in replies) == [False] * 3 + [True] * 5
            for c in chans:
                await c.close()
        assert server.drops[DropReason.RATE_LIMITED] == 5

    run(main())


def test_the_total_connection_cap_refuses_at_once_and_is_counted() -> None:
    async def main() -> None:
        async with bob_server(Recorder(), max_connections=3, max_pending_per_host=100) as server:
            idle = [await asyncio.open_connection(*server.address) for _ in range(3)]
            while server.stats.open_connections < 3:
                await asyncio.sleep(0)
            reader, writer = await asyncio.open_connection(*server.address)
            assert await closed_on_us(reader)
            writer.close()
            assert server.stats.refused_busy == 1
            for _, w in idle:
                w.close()

    run(main())


@pytest.mark.parametrize("persistent", [True, False])
def test_a_lock_flood_from_one_peer_hits_the_session_cap(persistent: bool) -> None:
    async def main() -> None:
        rec = Recorder(hold=True)
        cap = 4
        async with bob_server(rec, max_sessions_per_peer=cap) as server:
            mallory = TcpSignalling("mallory", {"bob": server.address}, secrets={"bob": K_MALLORY},
                                    persistent=persistent)
            chans = [await mallory.open("bob") for _ in range(10)]
            for i, ch in enumerate(chans):
                with contextlib.suppress(ChannelBroken):
                    await ch.send(wire.encode(Signal(SignalType.LOCK, 0x100 + i, bytes([i + 1]) * 16, 1)))
            await until(lambda: len(rec.by("mallory")) == cap and server.stats.sessions_refused == 10 - cap)
            # alice is a different peer: her session is served while mallory's are held
            async with TcpSignalling("alice", {"bob": server.address}, secrets={"bob": K_ALICE}) as alice:
                ch = await alice.open("bob")
                await ch.send(b"hi")
                await until(lambda: rec.by("alice"))
                rec.release.set()
                assert await ch.recv() == b"ok:hi"
            replies = await asyncio.gather(*(_reply_or_broken(c) for c in chans))
            assert sorted(r is None for r in replies) == [False] * cap + [True] * (10 - cap)
            await mallory.close()
            for c in chans:
                await c.close()
        assert server.drops[DropReason.RATE_LIMITED] == 10 - cap
        assert len(rec.by("mallory")) == cap

    run(main())


# --- logging ------------------------------------------------------------------------------------


def test_refused_hellos_and_connections_log_at_debug_with_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]

    async def main() -> None:
        async with bob_server(Recorder(), max_pending_per_host=1) as server:
            server.drop_log = DropLog(interval=60.0, clock=lambda: now[0])
            wrong = b"not the secret alice shares w/ bob"
            for _ in range(15):  # wrong secret: bad MAC
                reader, writer = await asyncio.open_connection(*server.address)
                nonce = os.urandom(auth.NONCE_SIZE)
                writer.write(frame(auth.encode_hello(auth.MODE_SESSION, nonce, "alice")))
                ch = auth.decode_challenge(await read_frame(reader))
                writer.write(frame(auth.encode_proof(auth.transcript_mac(
                    wrong, auth.ROLE_CLIENT, auth.MODE_SESSION, "alice", "bob", nonce, ch.nonce))))
                assert await closed_on_us(reader)
                writer.close()
                now[0] += 1.0
            for _ in range(5):  # unknown identity
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(frame(auth.encode_hello(auth.MODE_SESSION, os.urandom(16), "eve")))
                assert await closed_on_us(reader)
                writer.close()
            held = await asyncio.open_connection(*server.address)  # fills the one pending slot
            while server.stats.pending < 1:
                await asyncio.sleep(0)
            for _ in range(5):  # refused at once: per-host cap
                reader, writer = await asyncio.open_connection(*server.address)
                assert await closed_on_us(reader)
                writer.close()
            held[1].close()
        assert server.drops == {DropReason.BAD_MAC: 15, DropReason.UNEXPECTED_PEER: 5, DropReason.RATE_LIMITED: 5}
        assert server.drop_log.summaries == 1

    with caplog.at_level(logging.DEBUG, logger="natpool"):
        run(main())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "dropped 1 bad input" in infos[0].getMessage()  # the first one, at once
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == "natpool.aio.tcp"]
    assert sum("bad MAC" in m for m in debug) == 15
    assert sum("no secret for that identity" in m for m in debug) == 5
    assert sum("max_pending_per_host" in m for m in debug) == 5


# --- without credentials: loopback only, peer_identity None ---------------------------------------


def test_without_secrets_it_works_on_loopback_and_verifies_nobody() -> None:
    async def main() -> None:
        rec = Recorder()
        async with TcpSignallingServer(rec) as server, TcpSignalling("alice", {"bob": server.address}) as sig:
            ch = await sig.open("bob")
            assert ch.peer_identity is None
            await ch.send(b"x")
            assert await ch.recv() == b"ok:x"
        assert rec.seen == [("alice", None, b"x")]  # the claimed name, unverified
        assert server.stats.unauthenticated == 1

    run(main())


def test_without_secrets_beyond_loopback_needs_an_explicit_opt_in_with_one_warning(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LocalError, match="unauthenticated"):
        TcpSignallingServer(Recorder(), host="0.0.0.0")

    async def dial() -> None:
        with pytest.raises(LocalError, match="unauthenticated"):
            await TcpSignalling("alice", {"bob": ("192.0.2.1", 7000)}).open("bob")

    run(dial())
    monkeypatch.setattr(tcp, "_warned_unauthenticated", False)
    with caplog.at_level(logging.WARNING, logger="natpool"):
        TcpSignallingServer(Recorder(), host="0.0.0.0", allow_unauthenticated=True)
        TcpSignalling("alice", {"bob": ("192.0.2.1", 7000)}, allow_unauthenticated=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "WITHOUT authentication" in warnings[0].getMessage()


def test_secrets_are_checked_locally() -> None:
    with pytest.raises(InvalidKey):
        TcpSignalling("alice", secrets=b"short")
    with pytest.raises(InvalidKey):
        TcpSignallingServer(Recorder(), identity="bob", secrets={"alice": b"short"})
    with pytest.raises(LocalError, match="identity"):
        TcpSignallingServer(Recorder(), secrets=K_ALICE)

    async def unknown() -> None:
        with pytest.raises(LocalError, match="no signalling secret"):
            await TcpSignalling("alice", {"carol": ("127.0.0.1", 1)}, secrets={"bob": K_ALICE}).open("carol")

    run(unknown())


def test_a_hello_that_never_finishes_is_closed_after_hello_timeout() -> None:
    async def main() -> None:
        async with bob_server(Recorder(), hello_timeout=0.05) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(frame(auth.encode_hello(auth.MODE_MUX, os.urandom(16), "alice")))
            assert (await read_frame(reader))[:1] == auth.CHALLENGE
            assert await closed_on_us(reader)  # no proof came: closed
            writer.close()
            assert server.stats.hellos_refused == 1 and server.stats.pending == 0

    run(main())


# --- peer_identity through Mux and memory channels, and into the handover ------------------------


def test_mux_channels_inherit_the_links_verified_identity() -> None:
    async def main() -> None:
        a, b = memory_channel_pair()
        a.peer_identity = "bob"
        got: list[str | None] = []
        ma = Mux(a, peer="bob").start()
        mb = Mux(b, peer="alice", on_session=lambda ch: got.append(ch.peer_identity)).start()
        ch = await ma.open("bob")
        assert ch.peer_identity == "bob"
        await ch.send(b"x")
        while not got:
            await asyncio.sleep(0)
        assert got == [None]  # b's link verified nobody
        assert Mux(b, peer_identity="alice").peer_identity == "alice"  # the application vouches for it
        await ma.close()
        await mb.close()

    run(main())


def test_memory_signalling_with_a_local_identity_names_both_ends() -> None:
    async def main() -> None:
        far: list[str | None] = []
        sig = MemorySignalling(lambda peer, ch: far.append(ch.peer_identity), local_identity="alice")
        ch = await sig.open("bob")
        assert ch.peer_identity == "bob" and far == ["alice"]
        anonymous = await MemorySignalling(lambda peer, ch: far.append(ch.peer_identity)).open("bob")
        assert anonymous.peer_identity is None and far[-1] is None

    run(main())


def test_a_take_over_authenticated_signalling_reaches_the_responder_with_the_identity() -> None:
    cfg = PairConfig(ping_interval=0.02, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)

    async def main() -> None:
        alice, bob = AsyncPairPool("alice", cfg), AsyncPairPool("bob", cfg)
        identities: list[str | None] = []

        async def serve(ch: IncomingChannel) -> None:
            identities.append(ch.peer_identity)
            await bob.serve_handover(ch)

        async with bob_server(serve) as server:
            alice.signalling = TcpSignalling("alice", {"bob": server.address}, secrets={"bob": K_ALICE})
            s1, s2 = bound_socket(), bound_socket()
            pair = EndpointPair(Endpoint("alice", "127.0.0.1", s1.getsockname()[1]),
                                Endpoint("bob", "127.0.0.1", s2.getsockname()[1]), 0x77)
            ea = await alice.add(pair, is_pinger=True, sock=s1)
            await bob.add(pair, is_pinger=False, sock=s2)
            while ea.state != "Idle":
                await alice.wait_changed()
            lease = await alice.take(0x77)
            peer_lease = await bob.accept()
            assert lease.nonce == peer_lease.nonce == 0x77
            lease.close()
            peer_lease.close()
            assert isinstance(alice.signalling, TcpSignalling)
            await alice.signalling.close()
        await alice.close()
        await bob.close()
        assert identities == ["alice"]

    run(main())
