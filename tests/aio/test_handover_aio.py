"""The async pump over in-memory channels: two sans-IO pools on one loop, no sleeps.

Keepalive datagrams are shuttled by hand where a test needs them; every
timeout here is a short ``lock_timeout`` honoured by the pump itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from natpool.aio.handover import run_initiator, serve_responder
from natpool.config import PairConfig
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import ChannelBroken, HandoverError, HandoverTimeout, PairBusy
from natpool.signalling import MemoryChannel, MemorySignalling, SignalChannel, Signalling, memory_channel_pair
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.signal import AbortReason, SignalType, decode

NONCE = 0x5EED
PAIR = EndpointPair(Endpoint("a", "127.0.0.1", 40001), Endpoint("b", "127.0.0.1", 40002), NONCE)
CFG = PairConfig(lock_timeout=0.2)


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout=10))


def pools(pinger: str, now: float) -> tuple[PairPool, PairPool]:
    a, b = PairPool("a", CFG), PairPool("b", CFG)
    a.add(PAIR, pinger == "a", now)
    b.add(PAIR, pinger == "b", now)
    return a, b


@pytest.mark.parametrize("pinger", ["a", "b"])
def test_pump_happy_path(pinger: str) -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, b = pools(pinger, clock())
        ca, cb = memory_channel_pair()
        session = a.start_take(NONCE, None, clock())
        lease_a, lease_b = await asyncio.gather(run_initiator(a, session, ca, clock),
                                                serve_responder(b, cb, clock))
        assert (lease_a.role, lease_b.role) == ("initiator", "responder")
        assert a.get(NONCE).state == b.get(NONCE).state == "InUse"
        assert [decode(d).type for d in ca.sent] == [SignalType.LOCK, SignalType.TAKE]
        assert [decode(d).type for d in cb.sent] == [SignalType.LOCKED, SignalType.TAKEN]
        assert ca.closed and cb.closed
        lease_a.release(clock())
        assert NONCE not in a

    run(main)


def test_pump_wakes_on_drain_without_polling() -> None:
    """The pinger initiator waits for its in-flight ping; the pong's Drained event wakes the pump at once."""

    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, b = pools("a", clock())
        [(_, _ping, _addr)] = a.datagrams_to_send(clock())  # the ping is now outstanding
        assert a.get(NONCE).outstanding == 1
        ca, cb = memory_channel_pair()
        session = a.start_take(NONCE, None, clock())
        initiator = asyncio.ensure_future(run_initiator(a, session, ca, clock))
        responder = asyncio.ensure_future(serve_responder(b, cb, clock))
        while session.state != "Draining":
            await asyncio.sleep(0)
        for _ in range(5):  # LOCKED arrived, but nothing moves while the ping is outstanding
            await asyncio.sleep(0)
        assert session.state == "Draining" and a.get(NONCE).state == "InLocking"
        a.receive_datagram(NONCE, encode(Frame(NONCE, Kind.PONG)), PAIR.b.addr, clock())
        lease_a, lease_b = await asyncio.gather(initiator, responder)
        assert isinstance(lease_a, Lease) and isinstance(lease_b, Lease)
        assert session.ended_at is not None and session.ended_at - session.started_at < CFG.lock_timeout

    run(main)


def test_pump_wakes_when_the_drain_arrives_on_another_thread() -> None:
    """The pong is fed on a worker thread: the waker hops to the loop thread and the session completes."""

    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, b = pools("a", clock())
        [(_, _ping, _addr)] = a.datagrams_to_send(clock())
        ca, cb = memory_channel_pair()
        session = a.start_take(NONCE, None, clock())
        initiator = asyncio.ensure_future(run_initiator(a, session, ca, clock))
        responder = asyncio.ensure_future(serve_responder(b, cb, clock))
        while session.state != "Draining":
            await asyncio.sleep(0)
        pong = encode(Frame(NONCE, Kind.PONG))
        await asyncio.to_thread(a.receive_datagram, NONCE, pong, PAIR.b.addr, clock())
        lease_a, lease_b = await asyncio.gather(initiator, responder)
        assert (lease_a.role, lease_b.role) == ("initiator", "responder")
        assert [decode(d).type for d in ca.sent] == [SignalType.LOCK, SignalType.TAKE]

    run(main)


def test_pump_times_out_when_the_peer_never_answers() -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, _ = pools("a", clock())
        ca, _cb = memory_channel_pair()  # nobody serves the other end
        session = a.start_take(NONCE, None, clock())
        with pytest.raises(HandoverTimeout):
            await run_initiator(a, session, ca, clock)
        assert a.get(NONCE).state == "Idle"
        assert [decode(d).type for d in ca.sent] == [SignalType.LOCK, SignalType.ABORT]
        assert decode(ca.sent[-1]).reason is AbortReason.TIMEOUT

    run(main)


def test_pump_channel_closed_by_peer_after_lock() -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, b = pools("b", clock())
        ca, cb = memory_channel_pair()
        session = a.start_take(NONCE, None, clock())
        initiator = asyncio.ensure_future(run_initiator(a, session, ca, clock))
        first = await cb.recv()
        assert decode(first).type is SignalType.LOCK
        await cb.close()
        with pytest.raises(ChannelBroken):
            await initiator
        assert a.get(NONCE).state == "Idle" and b.get(NONCE).state == "Idle"
        assert not a.handovers.sessions()

    run(main)


def test_responder_gives_up_when_no_lock_arrives() -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        _, b = pools("a", clock())
        _ca, cb = memory_channel_pair()
        with pytest.raises(HandoverTimeout):
            await serve_responder(b, cb, clock)
        assert cb.closed

    run(main)


def test_cancelling_the_taker_aborts_and_returns_the_entry() -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, _ = pools("a", clock())
        ca, cb = memory_channel_pair()
        session = a.start_take(NONCE, None, clock())
        task = asyncio.ensure_future(run_initiator(a, session, ca, clock))
        assert decode(await cb.recv()).type is SignalType.LOCK
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        abort = decode(await cb.recv())
        assert abort.type is SignalType.ABORT and abort.reason is AbortReason.CANCELLED
        assert a.get(NONCE).state == "Idle"

    run(main)


def test_memory_signalling_with_fifty_concurrent_takers() -> None:
    """Fifty takers on node a: one lease per side, 49 PairBusy, through the Signalling protocol."""

    async def main() -> None:
        clock = asyncio.get_running_loop().time
        a, b = pools("a", clock())
        served: list[asyncio.Future[Lease]] = []

        def incoming(_peer: str, channel: MemoryChannel) -> None:
            served.append(asyncio.ensure_future(serve_responder(b, channel, clock)))

        signalling: Signalling = MemorySignalling(incoming)

        async def taker() -> Lease:
            session = a.start_take(None, "b", clock())  # PairBusy here for the losers: nothing is sent
            channel: SignalChannel = await signalling.open("b")
            return await run_initiator(a, session, channel, clock)

        results = await asyncio.gather(*(taker() for _ in range(50)), return_exceptions=True)
        leases = [r for r in results if isinstance(r, Lease)]
        busy = [r for r in results if isinstance(r, PairBusy)]
        assert (len(leases), len(busy)) == (1, 49)
        assert len(served) == 1
        assert isinstance(await served[0], Lease)
        assert not [r for r in results if isinstance(r, HandoverError) and not isinstance(r, PairBusy)]

    run(main)


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

    run(main)


def test_pump_honours_settle_time_on_its_own_timer() -> None:
    async def main() -> None:
        clock = asyncio.get_running_loop().time
        cfg = PairConfig(lock_timeout=0.5, settle_time=0.02)
        a, b = PairPool("a", cfg), PairPool("b", cfg)
        a.add(PAIR, False, clock())
        b.add(PAIR, True, clock())
        ca, cb = memory_channel_pair()
        session = a.start_take(NONCE, None, clock())
        lease_a, lease_b = await asyncio.gather(run_initiator(a, session, ca, clock),
                                                serve_responder(b, cb, clock))
        assert a.get(NONCE).state == b.get(NONCE).state == "InUse"
        taken_at = session.received[-1]  # TAKEN: the initiator entered Settling when it arrived
        assert taken_at.type is SignalType.TAKEN
        assert session.ended_at is not None and session.ended_at - session.started_at >= 0.02
        assert {lease_a.role, lease_b.role} == {"initiator", "responder"}

    run(main)
