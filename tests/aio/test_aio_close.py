"""Cancellation and close of the asyncio driver: one test per case of issue 11.

Every test runs on loopback with real UDP sockets (and, where the case is
about TCP, the reference TCP signalling). Nothing sleeps on the wall clock:
interleavings are forced with events, futures and ``asyncio.sleep(0)``
yields, and ``tests.support.aio.run`` fails a test on any exception the loop
swallowed (asyncio's "Exception in callback ..." goes there, not to logging).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import HELLO_PREFIX, DropLog, TcpSignalling, TcpSignallingServer
from natpool.config import PairConfig
from natpool.core.entry import StateChanged
from natpool.core.handover import Session
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import (
    BindFailed,
    ChannelBroken,
    DropReason,
    DuplicateNonce,
    HandoverCancelled,
    HandoverError,
    InvalidPair,
    InvalidSocket,
    LocalError,
    PeerRefused,
    PoolClosed,
)
from natpool.signalling import MemoryChannel, SignalChannel, memory_channel_pair
from natpool.wire import signal as wire
from natpool.wire.signal import AbortReason, Signal, SignalType
from tests.support.aio import bound_socket, loopback_pair
from tests.support.aio import run as _run

NONCE = 0xC105E
CFG = PairConfig(ping_interval=0.02, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)
SID = b"\x42" * wire.SID_SIZE


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, 15.0)


def make_pair(nonce: int = NONCE) -> tuple[EndpointPair, socket.socket, socket.socket]:
    return loopback_pair(nonce)


def pair_only(nonce: int) -> EndpointPair:
    """An EndpointPair with loopback ports, its sockets closed: for calls that must fail before binding."""
    pair, s1, s2 = make_pair(nonce)
    s1.close()
    s2.close()
    return pair


async def add_pair(alice: AsyncPairPool, bob: AsyncPairPool, nonce: int = NONCE, alice_pings: bool = True) -> None:
    pair, s1, s2 = make_pair(nonce)
    ea = await alice.add(pair, is_pinger=alice_pings, sock=s1)
    eb = await bob.add(pair, is_pinger=not alice_pings, sock=s2)
    pinger, pool = (ea, alice) if alice_pings else (eb, bob)
    while pinger.stats.received < 1:  # one keepalive round trip: both sockets are live
        await pool.wait_changed()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


class Wired:
    """alice's Signalling: every ``open`` is a fresh memory channel whose far end bob serves.

    ``gate_send`` holds alice's sends of one signal type forever (a send that
    can only end by cancellation: the signal never goes out).
    """

    def __init__(self, bob: AsyncPairPool, gate_send: SignalType | None = None) -> None:
        self.bob = bob
        self.gate_send = gate_send
        self.hold = False  # True: bob does not serve the far end until the test hands it over
        self.serves: list[asyncio.Task[Lease | None]] = []
        self.channels: list[tuple[MemoryChannel, MemoryChannel]] = []
        self.gated = asyncio.Event()  # set when a gated send started waiting

    async def open(self, peer_identity: str) -> SignalChannel:
        mine, theirs = memory_channel_pair()
        self.channels.append((mine, theirs))
        if not self.hold:
            self.serves.append(asyncio.ensure_future(self.bob.serve_handover(theirs)))
        if self.gate_send is None:
            return mine
        return _GatedSend(mine, self.gate_send, self.gated)


class _GatedSend:
    def __init__(self, inner: MemoryChannel, gate: SignalType, started: asyncio.Event) -> None:
        self.inner, self.gate, self.started = inner, gate, started
        self.peer_identity = inner.peer_identity

    async def send(self, data: bytes) -> None:
        if wire.decode(data).type is self.gate:
            self.started.set()
            await asyncio.get_running_loop().create_future()  # never resolves: only cancellation ends it
        await self.inner.send(data)

    async def recv(self) -> bytes:
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()


class RecvProbe:
    """A channel wrapper that reports when a ``recv`` is pending (no polling for "it is waiting now")."""

    def __init__(self, inner: MemoryChannel) -> None:
        self.inner = inner
        self.peer_identity = inner.peer_identity
        self.waiting = asyncio.Event()

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes:
        self.waiting.set()
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()


class Played:
    """alice's Signalling when the test plays the peer: each ``open`` hands the far end to ``far``."""

    def __init__(self) -> None:
        self.far: asyncio.Queue[MemoryChannel] = asyncio.Queue()
        self.mine: list[MemoryChannel] = []

    async def open(self, peer_identity: str) -> SignalChannel:
        mine, theirs = memory_channel_pair()
        self.mine.append(mine)
        self.far.put_nowait(theirs)
        return mine


@asynccontextmanager
async def alone(alice_pings: bool) -> AsyncIterator[tuple[AsyncPairPool, Played]]:
    """alice's pool with one pair whose peer is a silent socket the test holds (its pings go unanswered)."""
    pair, s1, s2 = make_pair()
    signalling = Played()
    alice = AsyncPairPool("alice", CFG, signalling=signalling)
    try:
        await alice.add(pair, is_pinger=alice_pings, sock=s1)
        yield alice, signalling
    finally:
        await alice.close()
        s2.close()


@asynccontextmanager
async def nodes(alice_pings: bool = True,
                gate_send: SignalType | None = None) -> AsyncIterator[tuple[AsyncPairPool, AsyncPairPool, Wired]]:
    alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
    wired = Wired(bob, gate_send)
    alice.signalling = wired
    try:
        await add_pair(alice, bob, alice_pings=alice_pings)
        yield alice, bob, wired
    finally:
        await alice.close()
        await bob.close()


# --- serve_handover cancelled before LOCK closes its channel ------------------------------------


def test_serve_handover_cancelled_before_lock_closes_its_channel() -> None:
    async def main() -> None:
        bob = AsyncPairPool("bob", CFG)
        ours, theirs = memory_channel_pair()
        probe = RecvProbe(theirs)
        serve = asyncio.ensure_future(bob.serve_handover(probe))
        await probe.waiting.wait()  # waiting for LOCK
        serve.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serve
        assert theirs.closed
        # The initiator learns at once, instead of waiting out its lock_timeout.
        with pytest.raises(ChannelBroken):
            await ours.recv()
        assert bob.handover_outcomes == {"HandoverCancelled": 1}
        await bob.close()

    run(main())


def test_serve_handover_before_lock_ends_with_close_and_closes_the_tcp_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        bob = AsyncPairPool("bob", CFG)
        served = asyncio.Event()

        async def handler(channel: SignalChannel) -> object:
            served.set()
            return await bob.serve_handover(channel)

        server = await TcpSignallingServer(handler).start()
        reader, writer = await asyncio.open_connection(*server.address)
        hello = HELLO_PREFIX + b"alice"
        writer.write(struct.pack("!I", len(hello)) + hello)
        await served.wait()  # the session is waiting for LOCK
        await bob.close()
        assert await reader.read() == b""  # EOF: the channel was closed, no LOCK needed
        writer.close()
        await server.close()
        assert bob.handover_outcomes == {"HandoverCancelled": 1}
        assert server.handler_errors == 0 and server.sessions_served == 1  # ended normally, not cancelled

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert errors_logged(caplog) == []


# --- ABORT is accepted whatever its sequence number --------------------------------------------


def test_abort_after_a_cancelled_send_is_accepted_despite_the_sequence_gap() -> None:
    """The initiator's TAKE (#2) never goes out (its send is cancelled); its ABORT is #3."""

    async def main() -> None:
        async with nodes(gate_send=SignalType.TAKE) as (alice, bob, wired):
            take = asyncio.ensure_future(alice.take(NONCE))
            await wired.gated.wait()
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            assert await wired.serves[0] is None
            mine, _theirs = wired.channels[0]
            sent = [wire.decode(d) for d in mine.sent]
            assert [(s.type, s.seq) for s in sent] == [(SignalType.LOCK, 1), (SignalType.ABORT, 3)]
            assert bob.handover_outcomes == {"PeerRefused": 1}  # not SignalProtocolError
            assert not bob.core.handovers.drops
            assert alice.handover_outcomes == {"HandoverCancelled": 1}

    run(main())


@pytest.mark.parametrize("role", ["initiator", "responder"])
def test_sans_io_sessions_take_an_out_of_sequence_abort_as_the_peer_aborting(role: str) -> None:
    pair = EndpointPair(Endpoint("a", "127.0.0.1", 41001), Endpoint("b", "127.0.0.1", 41002), NONCE)
    a, b = PairPool("a", CFG), PairPool("b", CFG)
    a.add(pair, False, 0.0)  # ponger initiator: waits for LOCKED in Locking
    b.add(pair, False, 0.0)  # ponger responder: Committed after LOCKED
    ini = a.start_take(NONCE, None, 0.0)
    resp = b.accept_session(ini.signals_to_send()[0], 0.0)
    assert resp.state == "Committed"
    session: Session
    if role == "initiator":
        ini.receive_signal(wire.encode(Signal(SignalType.ABORT, NONCE, ini.sid, 7, AbortReason.CANCELLED)), 0.1)
        session, pool = ini, a
    else:
        resp.receive_signal(wire.encode(Signal(SignalType.ABORT, NONCE, ini.sid, 7, AbortReason.CANCELLED)), 0.1)
        session, pool = resp, b
    assert isinstance(session.outcome, PeerRefused)
    assert not session.drops and not pool.handovers.drops
    assert pool.get(NONCE).state == "Idle"  # rule 4: InLocking aborts to Idle
    # A gap before any other signal still fails the session as before.
    c = PairPool("a", CFG)
    c.add(pair, False, 0.0)
    other = c.start_take(NONCE, None, 0.0)
    other.receive_signal(wire.encode(Signal(SignalType.LOCKED, NONCE, other.sid, 3)), 0.1)
    assert isinstance(other.outcome, HandoverError) and not isinstance(other.outcome, PeerRefused)


def test_abort_opening_a_channel_is_refused_without_reply_or_drop() -> None:
    """The initiator's LOCK send was cancelled: its ABORT(#2) is the first signal the responder sees."""
    pair = EndpointPair(Endpoint("a", "127.0.0.1", 41001), Endpoint("b", "127.0.0.1", 41002), NONCE)
    b = PairPool("b", CFG)
    b.add(pair, True, 0.0)
    session = b.accept_session(wire.encode(Signal(SignalType.ABORT, NONCE, SID, 2, AbortReason.CANCELLED)), 0.0)
    assert isinstance(session.outcome, PeerRefused)
    assert session.signals_to_send() == []
    assert not b.handovers.drops
    assert b.get(NONCE).state == "Idle"


# --- cancellations are counted -----------------------------------------------------------------


def test_cancelled_take_and_serve_are_counted_in_handover_outcomes() -> None:
    async def main() -> None:
        async with nodes(gate_send=SignalType.TAKE) as (alice, bob, wired):
            take = asyncio.ensure_future(alice.take(NONCE))
            await wired.gated.wait()
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            assert alice.handover_outcomes == {"HandoverCancelled": 1}
            assert alice.core.handovers.outcomes == {"HandoverCancelled": 1}
            assert await wired.serves[0] is None
            assert bob.handover_outcomes == {"PeerRefused": 1}
            # bob's serving task cancelled by its caller (mid-session, LOCKED sent): counted, re-raised.
            await add_pair(alice, bob, nonce=NONCE + 1, alice_pings=False)  # alice's pair expired (rule 4)
            wired.gate_send = None
            wired.hold = True
            take = asyncio.ensure_future(alice.take(NONCE + 1))
            while not wired.channels[1:]:
                await asyncio.sleep(0)
            far = RecvProbe(wired.channels[1][1])
            serve = asyncio.ensure_future(bob.serve_handover(far))
            while bob.get(NONCE + 1).state == "Idle":
                await bob.wait_changed()
            serve.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serve
            with pytest.raises(HandoverError):
                await take
            assert bob.handover_outcomes == {"PeerRefused": 1, "HandoverCancelled": 1}
            assert bob.core.handovers.outcomes["HandoverCancelled"] == 1

    run(main())


# --- accept() once the pool is closed ----------------------------------------------------------


def test_accept_waiting_across_close_raises_pool_closed() -> None:
    async def main() -> None:
        bob = AsyncPairPool("bob", CFG)
        accept = asyncio.ensure_future(bob.accept())
        await asyncio.sleep(0)  # accept() is now waiting
        assert not accept.done()
        await bob.close()
        with pytest.raises(PoolClosed):
            await accept

    run(main())


def test_accept_after_close_raises_pool_closed() -> None:
    async def main() -> None:
        bob = AsyncPairPool("bob", CFG)
        await bob.close()
        with pytest.raises(PoolClosed):
            await bob.accept()

    run(main())


def test_accept_returns_a_lease_that_arrives_while_it_waits() -> None:
    async def main() -> None:
        async with nodes() as (alice, bob, _wired):
            accept = asyncio.ensure_future(bob.accept())
            await asyncio.sleep(0)
            mine = await alice.take(NONCE)
            theirs = await accept
            assert theirs.nonce == mine.nonce == NONCE and theirs.role == "responder"
            alice.release(mine)
            bob.release(theirs)

    run(main())


# --- close() racing an arriving LOCK: no new session claims an entry ---------------------------


@pytest.mark.parametrize("yields", range(20))
def test_close_racing_an_arriving_lock_never_completes_a_new_handover(yields: int) -> None:
    """alice's take sends LOCK; after ``yields`` loop turns bob's pool closes.

    Each parameter is one interleaving, from "LOCK queued, not yet read" on.
    Whatever the interleaving, once close() has begun bob claims no entry,
    and alice can hold a lease only if bob's session was already past its
    point of no return (Settling or done) when close() began.
    """

    async def main() -> None:
        alice = AsyncPairPool("alice", CFG)
        bob = AsyncPairPool("bob", CFG)
        await add_pair(alice, bob)
        claims_after_close: list[StateChanged] = []
        closing = False

        def watch(event: object) -> None:
            if closing and isinstance(event, StateChanged) and event.target == "InLocking":
                claims_after_close.append(event)

        bob.on_event(watch)
        ca, cb = memory_channel_pair()
        probe = RecvProbe(cb)
        serve = asyncio.ensure_future(bob.serve_handover(probe))
        await probe.waiting.wait()

        class ToBob:  # alice's Signalling: her one take's channel is the one bob already serves
            async def open(self, peer_identity: str) -> SignalChannel:
                return ca

        alice.signalling = ToBob()
        initiator = asyncio.ensure_future(alice.take(NONCE))
        try:
            for _ in range(yields):
                await asyncio.sleep(0)
            sessions = bob.core.handovers.sessions()
            past_no_return = bool(bob.core.handovers.outcomes["lease"]) or any(
                s.state == "Settling" for s in sessions)
            closing = True
            await bob.close()
            result = await asyncio.gather(initiator, return_exceptions=True)
            assert await serve is None or past_no_return
            assert claims_after_close == []
            if not past_no_return:
                assert not isinstance(result[0], Lease), result
                # Rule 4: alice's entry is back to Idle, or expired if she had locked (sent TAKE).
                assert NONCE not in alice.core or alice.get(NONCE).state == "Idle"
                # A lease completing during close() is closed, not handed out.
                assert bob.handover_outcomes["lease"] == 0
        finally:
            await alice.close()

    run(main())


def test_a_lock_read_by_a_channel_that_swallows_cancellation_claims_nothing() -> None:
    """A user channel may swallow the cancellation close() sends; the pool still claims no entry."""

    async def main() -> None:
        bob = AsyncPairPool("bob", CFG)
        pair, s1, s2 = make_pair()
        s1.close()
        await bob.add(pair, False, sock=s2)
        lock = asyncio.get_running_loop().create_future()
        reading = asyncio.Event()

        class Stubborn:
            closed = False
            peer_identity: str | None = None

            async def send(self, data: bytes) -> None:
                raise AssertionError("nothing may be answered")

            async def recv(self) -> bytes:
                reading.set()
                try:
                    await asyncio.shield(lock)
                except asyncio.CancelledError:
                    pass  # swallowed: a badly written channel
                lock.set_result(wire.encode(Signal(SignalType.LOCK, NONCE, SID, 1)))
                return bytes(lock.result())

            async def close(self) -> None:
                self.closed = True

        channel = Stubborn()
        serve = asyncio.ensure_future(bob.serve_handover(channel))
        await reading.wait()
        await bob.close()
        assert await serve is None
        assert channel.closed
        assert bob.core.handovers.outcomes == {}  # no session was ever opened
        assert bob.handover_outcomes == {"HandoverCancelled": 1}

    run(main())


# --- a pending take raises PoolClosed when close() runs ---------------------------------------


@pytest.mark.parametrize("stage", ["opening", "waiting-for-locked", "taking"])
def test_pending_take_raises_pool_closed_and_leaves_its_task_uncancelled(stage: str) -> None:
    async def main() -> None:
        alice = AsyncPairPool("alice", CFG)
        bob = AsyncPairPool("bob", CFG)
        await add_pair(alice, bob, alice_pings=stage != "taking")
        reached = asyncio.Event()
        far_ends: list[MemoryChannel] = []

        class Signalling:
            async def open(self, peer_identity: str) -> SignalChannel:
                if stage == "opening":
                    reached.set()
                    await asyncio.get_running_loop().create_future()  # hangs: only cancellation ends it
                mine, theirs = memory_channel_pair()
                far_ends.append(theirs)
                return RecvProbe(mine) if stage == "waiting-for-locked" else mine

        alice.signalling = Signalling()

        async def caller() -> str:
            try:
                await alice.take(NONCE)
            except PoolClosed:
                await asyncio.sleep(0)  # the task is not left cancelled: it can go on awaiting
                return "closed"
            return "lease"

        task = asyncio.ensure_future(caller())
        if stage == "opening":
            await reached.wait()
        else:
            while not far_ends:
                await asyncio.sleep(0)
            lock = wire.decode(await far_ends[0].recv())
            assert lock.type is SignalType.LOCK
            if stage == "taking":
                # alice (ponger initiator) locks on LOCKED and sends TAKE; no TAKEN comes back.
                await far_ends[0].send(wire.encode(Signal(SignalType.LOCKED, NONCE, lock.sid, 1)))
                assert wire.decode(await far_ends[0].recv()).type is SignalType.TAKE
        await alice.close()
        assert await task == "closed"
        assert alice.handover_outcomes == {"HandoverCancelled": 1}
        if far_ends:
            abort = wire.decode(await far_ends[0].recv())
            assert abort.type is SignalType.ABORT and abort.reason is AbortReason.CANCELLED
        await bob.close()

    run(main())


def test_the_callers_own_cancellation_of_take_still_raises_cancelled_error() -> None:
    async def main() -> None:
        async with nodes(gate_send=SignalType.TAKE) as (alice, _bob, wired):
            take = asyncio.ensure_future(alice.take(NONCE))
            await wired.gated.wait()
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            assert NONCE not in alice.core  # it had sent TAKE (Locked): expired per rule 4

    run(main())


def test_take_after_close_raises_pool_closed() -> None:
    async def main() -> None:
        async with nodes() as (alice, _bob, _wired):
            await alice.close()
            with pytest.raises(PoolClosed):
                await alice.take(NONCE)
            with pytest.raises(PoolClosed):
                await alice.take_any("bob")

    run(main())


# --- closing while a session runs logs nothing at ERROR ----------------------------------------


@asynccontextmanager
async def tcp_session_in_progress() -> AsyncIterator[tuple[AsyncPairPool, AsyncPairPool, TcpSignallingServer,
                                                           asyncio.StreamReader, asyncio.StreamWriter]]:
    """bob serves a LOCK from a raw TCP client that then goes quiet: bob's session waits for TAKE."""
    alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
    server = await TcpSignallingServer(bob.serve_handover).start()
    try:
        await add_pair(alice, bob, alice_pings=True)  # bob (ponger responder) sends LOCKED while InLocking
        reader, writer = await asyncio.open_connection(*server.address)
        for frame in (HELLO_PREFIX + b"alice", wire.encode(Signal(SignalType.LOCK, NONCE, SID, 1))):
            writer.write(struct.pack("!I", len(frame)) + frame)
        header = await reader.readexactly(4)
        locked = wire.decode(await reader.readexactly(struct.unpack("!I", header)[0]))
        assert locked.type is SignalType.LOCKED
        assert bob.get(NONCE).state == "InLocking"
        yield alice, bob, server, reader, writer
        writer.close()
    finally:
        await server.close()
        await bob.close()
        await alice.close()


@pytest.mark.parametrize("closing", ["pool", "server"])
def test_closing_while_a_tcp_session_runs_logs_no_error(closing: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with tcp_session_in_progress() as (_alice, bob, server, reader, _writer):
            if closing == "pool":
                await bob.close()
                header = await reader.readexactly(4)
                abort = wire.decode(await reader.readexactly(struct.unpack("!I", header)[0]))
                assert abort.type is SignalType.ABORT and abort.reason is AbortReason.CANCELLED
            else:
                await server.close()
            assert await reader.read() == b""  # and then the connection is closed
            assert server.handler_errors == 0

    with caplog.at_level(logging.DEBUG):
        run(main())  # fails on anything passed to the loop's exception handler
    assert errors_logged(caplog) == []


def test_closing_the_tcp_server_with_many_idle_connections_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        bob = AsyncPairPool("bob", CFG)
        started = 0
        all_in = asyncio.Event()

        async def handler(channel: SignalChannel) -> object:
            nonlocal started
            started += 1
            if started == 5:
                all_in.set()
            return await bob.serve_handover(channel)

        server = await TcpSignallingServer(handler).start()
        writers = []
        for _ in range(5):
            _reader, writer = await asyncio.open_connection(*server.address)
            hello = HELLO_PREFIX + b"alice"
            writer.write(struct.pack("!I", len(hello)) + hello)
            writers.append(writer)
        await all_in.wait()
        await server.close()
        for writer in writers:
            writer.close()
        await bob.close()

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert errors_logged(caplog) == []


# --- add(sock=s): one ownership rule, typed errors only ----------------------------------------


def test_add_closes_the_given_socket_on_every_failure() -> None:
    async def main() -> None:
        pool = AsyncPairPool("alice", CFG)
        pair, s1, s2 = make_pair()
        s2.close()
        await pool.add(pair, True, sock=s1)

        cases: list[tuple[str, Callable[[], socket.socket], EndpointPair, type[LocalError]]] = [
            ("tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), pair_only(2), InvalidSocket),
            ("unbound", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), pair_only(3), InvalidSocket),
            ("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), pair_only(4), InvalidSocket),
            ("duplicate", bound_socket, pair, DuplicateNonce),
            ("invalid-pair", bound_socket,
             EndpointPair(Endpoint("x", "127.0.0.1", 1), Endpoint("y", "127.0.0.1", 2), 5), InvalidPair),
        ]
        for name, make, p, err in cases:
            s = make()
            with pytest.raises(err):
                await pool.add(p, True, sock=s)
            assert s.fileno() == -1, f"{name}: add left the socket open"
        closed = bound_socket()
        closed.close()
        with pytest.raises(InvalidSocket):
            await pool.add(pair_only(6), True, sock=closed)
        assert len(pool) == 1 and pool.stats.sockets_opened == 1
        await pool.close()
        s = bound_socket()
        with pytest.raises(PoolClosed):
            await pool.add(pair_only(7), True, sock=s)
        assert s.fileno() == -1

    run(main())


def test_add_without_sock_still_raises_bind_failed() -> None:
    async def main() -> None:
        pool = AsyncPairPool("alice", CFG)
        taken = bound_socket()
        pair = EndpointPair(Endpoint("alice", "127.0.0.1", taken.getsockname()[1]),
                            Endpoint("bob", "127.0.0.1", 9), 8)
        with pytest.raises(BindFailed):
            await pool.add(pair, True)
        taken.close()
        await pool.close()

    run(main())


# --- remote input and failed takes never log at WARNING per event ------------------------------


def test_bad_hellos_log_at_debug_with_one_rate_limited_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]

    async def main() -> None:
        async def handler(channel: SignalChannel) -> object:
            raise AssertionError("no valid hello was sent")

        server = await TcpSignallingServer(handler).start()
        server.drop_log = DropLog(interval=60.0, clock=lambda: now[0])
        for _ in range(20):
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(struct.pack("!I", 5) + b"junk!")
            assert await reader.read() == b""  # the server dropped it and closed
            writer.close()
            now[0] += 1.0  # 20 bad connections within 20 s
        assert server.drops[DropReason.MALFORMED] == 20
        now[0] = 61.0
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(struct.pack("!I", 0))  # a zero-length frame: malformed
        assert await reader.read() == b""
        writer.close()
        await server.close()
        assert server.drop_log.summaries == 2

    with caplog.at_level(logging.DEBUG, logger="natpool"):
        run(main())
    assert warnings_logged(caplog) == []
    summaries = [r for r in caplog.records if r.levelno == logging.INFO and "dropped" in r.getMessage()]
    assert len(summaries) == 2  # the first at once, the second after the interval, covering 20 drops
    assert "dropped 20 bad input" in summaries[1].getMessage()
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG and "hello" in r.getMessage()) == 20


def test_a_failed_take_is_logged_once_at_debug_and_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
        server = await TcpSignallingServer(bob.serve_handover).start()
        alice.signalling = TcpSignalling("alice", {"bob": server.address})
        pair, s1, s2 = make_pair()
        s2.close()  # bob never hears of this pair: ABORT(UNKNOWN_PAIR)
        await alice.add(pair, True, sock=s1)
        with pytest.raises(PeerRefused):
            await alice.take(NONCE)
        await server.close()
        await alice.close()
        await bob.close()

    with caplog.at_level(logging.DEBUG, logger="natpool"):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    ended = [r for r in caplog.records if "initiator" in r.getMessage() and "ended" in r.getMessage()]
    assert len(ended) == 1 and ended[0].levelno == logging.DEBUG


# --- what a cancelled take leaves on each side -------------------------------------------------


def test_a_take_cancelled_before_take_went_out_leaves_both_entries_idle() -> None:
    """The docstring of ``take``, first case: the pair stays pooled on both sides."""

    async def main() -> None:
        async with nodes() as (alice, bob, wired):
            wired.hold = True
            take = asyncio.ensure_future(alice.take(NONCE))
            while not wired.channels:
                await asyncio.sleep(0)
            _mine, theirs = wired.channels[0]
            lock = await theirs.recv()  # alice waits for LOCKED (Locking)
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            assert alice.get(NONCE).state == "Idle"
            # bob now reads LOCK (claims its entry) and then alice's ABORT: back to Idle too.
            ours, far = memory_channel_pair()
            await ours.send(lock)
            await ours.send(await theirs.recv())
            assert await bob.serve_handover(far) is None
            assert bob.handover_outcomes == {"PeerRefused": 1}
            assert bob.get(NONCE).state == "Idle"
            # ... and the pair can be taken again.
            wired.hold = False
            lease = await alice.take(NONCE)
            alice.release(lease)
            bob.release(await bob.accept())

    run(main())


def test_a_take_cancelled_in_taking_expires_its_entry_per_rule_4() -> None:
    """Second case: TAKE went out, TAKEN did not arrive; alice's Locked entry expires, ABORT still goes out."""

    async def main() -> None:
        async with alone(alice_pings=False) as (alice, played):  # ponger initiator: locks on LOCKED, TAKE at once
            task = asyncio.ensure_future(alice.take(NONCE))
            cb = await played.far.get()
            lock = wire.decode(await cb.recv())
            (session,) = alice.node.sessions().values()
            await cb.send(wire.encode(Signal(SignalType.LOCKED, NONCE, lock.sid, 1)))
            assert wire.decode(await cb.recv()).type is SignalType.TAKE
            assert session.state == "Taking"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            abort = wire.decode(await cb.recv())
            assert abort.type is SignalType.ABORT and abort.reason is AbortReason.CANCELLED
            assert isinstance(session.outcome, HandoverCancelled)
            assert NONCE not in alice.core  # Locked never goes back to Idle: expired, left the pool
            assert alice.handover_outcomes == {"HandoverCancelled": 1}

    run(main())


@pytest.mark.parametrize("yields", range(8))
def test_a_cancel_landing_as_the_session_ends_is_never_swallowed(yields: int) -> None:
    """asyncio's contract: a ``cancel()`` that found the task running ends it with CancelledError.

    The peer answers BUSY; ``yields`` loop turns later the caller cancels. Some
    of the interleavings land after the session ended, while the take waits
    for its channel to close (the old per-session pump once swallowed the
    cancellation there, waiting for its reader task, and raised the
    session's error instead).
    """

    async def main() -> None:
        async with alone(alice_pings=True) as (alice, played):
            task = asyncio.ensure_future(alice.take(NONCE))
            cb = await played.far.get()
            lock = wire.decode(await cb.recv())
            await cb.send(wire.encode(Signal(SignalType.BUSY, NONCE, lock.sid, 1)))
            for _ in range(yields):
                await asyncio.sleep(0)
            requested = task.cancel()
            outcome = (await asyncio.gather(task, return_exceptions=True))[0]
            if requested:
                assert isinstance(outcome, asyncio.CancelledError), outcome
            else:
                assert isinstance(outcome, HandoverError)
            assert alice.get(NONCE).state == "Idle"

    run(main())
