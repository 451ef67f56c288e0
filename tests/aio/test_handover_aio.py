"""Handover through the asyncio driver over in-memory signalling: two ``AsyncPairPool`` s on loopback UDP.

The sessions run in each pool's :class:`~natpool.core.node.Node` on the
driver's one timer; the channels are :class:`~natpool.signalling.MemoryChannel`
s (``Wire`` below, or the stock :class:`~natpool.signalling.MemorySignalling`).
Nothing sleeps on the wall clock: interleavings are forced with events and
``asyncio.sleep(0)`` yields; the only waits on the loop's clock are the
timeouts under test (a short ``lock_timeout``), which no assertion measures.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from natpool.aio.pool import AsyncPairPool
from natpool.config import PairConfig
from natpool.core.entry import TIMER_SLACK
from natpool.core.handover import Session
from natpool.core.lease import Lease
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import ChannelBroken, HandoverError, HandoverTimeout, PairBusy
from natpool.signalling import MemoryChannel, MemorySignalling, SignalChannel, memory_channel_pair
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.frame import decode as decode_frame
from natpool.wire.signal import AbortReason, SignalType, decode
from tests.support.aio import bound_socket, loopback_pair
from tests.support.aio import run as _run

NONCE = 0x5EED
CFG = PairConfig(ping_interval=0.05, no_inbound_timeout=10.0, ping_lifespan=2.0, lock_timeout=5.0)
#: For the tests of a timeout itself: the loop's clock must pass it, so it is short.
SHORT = PairConfig(ping_interval=0.05, no_inbound_timeout=10.0, ping_lifespan=2.0, lock_timeout=0.2)


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, 15.0)


def make_pair(nonce: int = NONCE) -> tuple[EndpointPair, socket.socket, socket.socket]:
    return loopback_pair(nonce)


async def add_pair(alice: AsyncPairPool, bob: AsyncPairPool, alice_pings: bool) -> None:
    """The pair on both pools, after one keepalive round trip (both sockets live)."""
    pair, s1, s2 = make_pair()
    ea = await alice.add(pair, is_pinger=alice_pings, sock=s1)
    eb = await bob.add(pair, is_pinger=not alice_pings, sock=s2)
    pinger, pool = (ea, alice) if alice_pings else (eb, bob)
    while pinger.stats.received < 1:
        await pool.wait_changed()


class Wire:
    """alice's Signalling: each ``open`` is a fresh memory channel pair; bob serves the far end.

    With ``bob`` None (or ``serve`` False) nobody serves it: the test plays
    the peer on ``channels[i][1]`` itself. ``opened`` is set on each open.
    """

    def __init__(self, bob: AsyncPairPool | None) -> None:
        self.bob = bob
        self.serve = bob is not None
        self.channels: list[tuple[MemoryChannel, MemoryChannel]] = []
        self.serves: list[asyncio.Task[Lease | None]] = []
        self.opened = asyncio.Event()
        self.watched: list[Watched] = []  # alice's ends, as handed to her pool

    async def open(self, peer_identity: str) -> SignalChannel:
        mine, theirs = memory_channel_pair()
        self.channels.append((mine, theirs))
        if self.serve and self.bob is not None:
            self.serves.append(asyncio.ensure_future(self.bob.serve_handover(theirs)))
        self.opened.set()
        watched = Watched(mine)
        self.watched.append(watched)
        return watched

    async def far_end(self) -> MemoryChannel:
        """The far end of the first channel alice opened (waits for the open)."""
        await self.opened.wait()
        return self.channels[0][1]


class Watched:
    """alice's end of a channel, recording each signal it reads with the loop's time.

    The driver processes a signal in the same loop step as ``recv`` returns
    it, so once ``seen[type]`` is set the node has acted on it, and the time
    recorded is no later than the one the node was given.
    """

    def __init__(self, inner: MemoryChannel) -> None:
        self.inner = inner
        self.peer_identity = inner.peer_identity
        self.seen: dict[SignalType, asyncio.Event] = {t: asyncio.Event() for t in SignalType}
        self.read_at: dict[SignalType, float] = {}

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes:
        data = await self.inner.recv()
        kind = decode(data).type
        self.read_at.setdefault(kind, asyncio.get_running_loop().time())
        self.seen[kind].set()
        return data

    async def close(self) -> None:
        await self.inner.close()


@asynccontextmanager
async def nodes(alice_pings: bool, cfg: PairConfig = CFG) -> AsyncIterator[tuple[AsyncPairPool, AsyncPairPool, Wire]]:
    alice, bob = AsyncPairPool("alice", cfg), AsyncPairPool("bob", cfg)
    wire = Wire(bob)
    alice.signalling = wire
    try:
        await add_pair(alice, bob, alice_pings)
        yield alice, bob, wire
    finally:
        await alice.close()
        await bob.close()


def types(channel: MemoryChannel) -> list[SignalType]:
    return [decode(d).type for d in channel.sent]


def only_session(pool: AsyncPairPool) -> Session:
    (session,) = pool.node.sessions().values()
    return session


@pytest.mark.parametrize("alice_pings", [True, False])
def test_take_hands_over_on_both_sides_and_closes_both_channel_ends(alice_pings: bool) -> None:
    async def main() -> None:
        async with nodes(alice_pings) as (alice, bob, wire):
            lease_a = await alice.take(NONCE)
            assert await wire.serves[0] is not None
            lease_b = await bob.accept()
            assert (lease_a.role, lease_b.role) == ("initiator", "responder")
            assert alice.get(NONCE).state == bob.get(NONCE).state == "InUse"
            mine, theirs = wire.channels[0]
            assert types(mine) == [SignalType.LOCK, SignalType.TAKE]
            assert types(theirs) == [SignalType.LOCKED, SignalType.TAKEN]
            assert mine.closed and theirs.closed
            assert not alice.node.sessions() and not bob.node.sessions()
            alice.release(lease_a)
            bob.release(lease_b)
            assert NONCE not in alice.core and NONCE not in bob.core

    run(main())


def test_the_pong_that_ends_the_drain_completes_the_take_with_no_timer() -> None:
    """The pinger initiator waits for its in-flight ping; the pong's datagram alone moves the take on.

    bob's NAT address (``x``) is a socket the test holds: alice's ping lands
    there and nothing answers it until the test sends the pong. The drain
    grace is as long as the lock, so no timer can end the drain: the ping is
    answered (not timed out) and the take ends with a lease.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        s1, s2, x = bound_socket(), bound_socket(), bound_socket()
        x.setblocking(False)
        pair = EndpointPair(Endpoint("alice", "127.0.0.1", s1.getsockname()[1]),
                            Endpoint("bob", "127.0.0.1", x.getsockname()[1]), NONCE)
        cfg = PairConfig(ping_interval=10.0, no_inbound_timeout=30.0, ping_lifespan=8.0, min_drain_grace=8.0,
                         lock_timeout=9.0)  # one ping, and only its pong ends the drain
        alice, bob = AsyncPairPool("alice", cfg), AsyncPairPool("bob", cfg)
        wire = Wire(bob)
        alice.signalling = wire
        try:
            await alice.add(pair, is_pinger=True, sock=s1)
            await bob.add(pair, is_pinger=False, sock=s2)  # its pings-to-answer never come: they go to x
            ping, src = await loop.sock_recvfrom(x, 64)
            assert decode_frame(ping).kind is Kind.PING and alice.get(NONCE).outstanding == 1
            take = asyncio.ensure_future(alice.take(NONCE))
            await wire.opened.wait()
            await wire.watched[0].seen[SignalType.LOCKED].wait()
            session = only_session(alice)
            for _ in range(5):  # LOCKED arrived, but nothing moves while the ping is outstanding
                await asyncio.sleep(0)
            assert session.state == "Draining" and alice.get(NONCE).state == "InLocking"
            assert types(wire.channels[0][0]) == [SignalType.LOCK]
            x.sendto(encode(Frame(NONCE, Kind.PONG)), src)
            lease = await take
            assert lease.role == "initiator"
            stats = alice.get(NONCE).stats
            assert (stats.received, stats.ping_timeouts) == (1, 0)
            assert types(wire.channels[0][0]) == [SignalType.LOCK, SignalType.TAKE]
            assert await wire.serves[0] is not None
        finally:
            x.close()
            await alice.close()
            await bob.close()

    run(main())


def test_a_take_nobody_answers_times_out_with_abort_timeout() -> None:
    async def main() -> None:
        async with nodes(True, SHORT) as (alice, _bob, wire):
            wire.serve = False  # nobody serves the far end
            with pytest.raises(HandoverTimeout):
                await alice.take(NONCE)
            assert alice.get(NONCE).state == "Idle"
            mine, _theirs = wire.channels[0]
            assert types(mine) == [SignalType.LOCK, SignalType.ABORT]
            assert decode(mine.sent[-1]).reason is AbortReason.TIMEOUT
            assert mine.closed
            assert alice.handover_outcomes == {"HandoverTimeout": 1}

    run(main())


def test_the_peer_closing_the_channel_after_lock_fails_the_take_with_channel_broken() -> None:
    async def main() -> None:
        async with nodes(False) as (alice, bob, wire):
            wire.serve = False
            take = asyncio.ensure_future(alice.take(NONCE))
            far = await wire.far_end()
            assert decode(await far.recv()).type is SignalType.LOCK
            await far.close()
            with pytest.raises(ChannelBroken):
                await take
            assert alice.get(NONCE).state == bob.get(NONCE).state == "Idle"
            assert not alice.node.sessions()
            assert alice.handover_outcomes == {"ChannelBroken": 1}

    run(main())


def test_serve_handover_gives_up_when_no_lock_arrives() -> None:
    async def main() -> None:
        async with AsyncPairPool("bob", SHORT) as bob:
            ours, theirs = memory_channel_pair()
            assert await bob.serve_handover(theirs) is None
            assert theirs.closed
            assert bob.handover_outcomes == {"HandoverTimeout": 1}
            with pytest.raises(ChannelBroken):  # the initiator learns it on its channel
                await ours.recv()

    run(main())


def test_cancelling_the_taker_aborts_with_cancelled_and_returns_the_entry() -> None:
    async def main() -> None:
        async with nodes(True) as (alice, _bob, wire):
            wire.serve = False
            take = asyncio.ensure_future(alice.take(NONCE))
            far = await wire.far_end()
            assert decode(await far.recv()).type is SignalType.LOCK
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            abort = decode(await far.recv())
            assert abort.type is SignalType.ABORT and abort.reason is AbortReason.CANCELLED
            assert alice.get(NONCE).state == "Idle"
            assert alice.handover_outcomes == {"HandoverCancelled": 1}

    run(main())


def test_memory_signalling_with_fifty_concurrent_takers() -> None:
    """Fifty takers on alice: one lease per side, 49 PairBusy (nothing sent), through MemorySignalling."""

    async def main() -> None:
        alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
        served: list[asyncio.Task[Lease | None]] = []

        def incoming(_peer: str, channel: MemoryChannel) -> None:
            served.append(asyncio.ensure_future(bob.serve_handover(channel)))

        alice.signalling = MemorySignalling(incoming, local_identity="alice")
        try:
            await add_pair(alice, bob, alice_pings=True)
            results = await asyncio.gather(*(alice.take_any("bob") for _ in range(50)), return_exceptions=True)
            leases = [r for r in results if isinstance(r, Lease)]
            busy = [r for r in results if isinstance(r, PairBusy)]
            assert (len(leases), len(busy)) == (1, 49)
            assert not [r for r in results if isinstance(r, HandoverError) and not isinstance(r, PairBusy)]
            assert len(served) == 1  # the losers opened no channel
            responder = await served[0]
            assert responder is not None and responder.role == "responder"
            # One handover ran; the losers failed at the claim, before any session.
            assert alice.handover_outcomes["lease"] == 1 and set(alice.handover_outcomes) <= {"lease", "PairBusy"}
        finally:
            await alice.close()
            await bob.close()

    run(main())


def test_memory_channel_semantics() -> None:
    async def main() -> None:
        x, y = memory_channel_pair()
        await x.send(b"one")
        await x.send(b"two")
        await x.close()
        await x.close()  # idempotent
        assert await y.recv() == b"one"
        assert await y.recv() == b"two"
        with pytest.raises(ChannelBroken):
            await y.recv()
        with pytest.raises(ChannelBroken):
            await y.send(b"late")
        with pytest.raises(ChannelBroken):
            await x.recv()
        pending = asyncio.ensure_future(memory_channel_pair()[0].recv())
        await asyncio.sleep(0)
        assert not pending.done()
        pending.cancel()

    run(main())


def test_the_settle_wait_runs_on_the_drivers_one_timer() -> None:
    """settle_time > 0: after TAKEN the initiator settles on the driver's timer, then hands the lease out.

    Nothing but that timer can end the Settling state (no datagram or signal
    comes after TAKEN), so a lease at all shows the driver armed it; the
    lease is not out before the settle deadline (less the timer slack).
    """

    async def main() -> None:
        cfg = PairConfig(ping_interval=0.05, no_inbound_timeout=10.0, ping_lifespan=2.0, lock_timeout=5.0,
                         settle_time=0.02)
        async with nodes(False, cfg) as (alice, bob, wire):
            take = asyncio.ensure_future(alice.take(NONCE))
            await asyncio.sleep(0)  # the take started its session (start_take runs before the first await)
            session = only_session(alice)
            lease_a = await take
            assert alice.get(NONCE).state == "InUse"
            assert session.received[-1].type is SignalType.TAKEN  # the initiator settles from here
            taken_at = wire.watched[0].read_at[SignalType.TAKEN]
            assert session.ended_at is not None and session.ended_at >= taken_at + cfg.settle_time - TIMER_SLACK
            assert await wire.serves[0] is not None
            lease_b = await bob.accept()
            assert {lease_a.role, lease_b.role} == {"initiator", "responder"}

    run(main())
