"""The close/cancel guarantees of issue 11 over the persistent (multiplexed) TCP signalling.

Same cases as tests/test_aio_close.py's TCP section, but every session is a
virtual channel on one persistent connection: closing a pool or the server
logs nothing at ERROR, channels are closed on every exit, and a take cut off
by ``close()`` raises :class:`PoolClosed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import IncomingChannel, TcpSignalling, TcpSignallingServer
from natpool.errors import ChannelBroken, PoolClosed
from natpool.mux import MuxChannel
from natpool.wire import signal as wire
from natpool.wire.signal import AbortReason, Signal, SignalType
from tests.aio.test_aio_close import CFG, NONCE, SID, add_pair, errors_logged, run


@asynccontextmanager
async def session_in_progress() -> AsyncIterator[tuple[AsyncPairPool, TcpSignallingServer, TcpSignalling,
                                                       MuxChannel]]:
    """bob serves a LOCK that came on a persistent connection, then the client goes quiet: bob waits for TAKE."""
    alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
    server = await TcpSignallingServer(bob.serve_handover).start()
    sig = TcpSignalling("alice", {"bob": server.address})
    try:
        await add_pair(alice, bob, alice_pings=True)
        ch = await sig.open("bob")
        assert isinstance(ch, MuxChannel)
        await ch.send(wire.encode(Signal(SignalType.LOCK, NONCE, SID, 1)))
        assert wire.decode(await ch.recv()).type is SignalType.LOCKED
        assert bob.get(NONCE).state == "InLocking"
        yield bob, server, sig, ch
    finally:
        await sig.close()
        await server.close()
        await bob.close()
        await alice.close()


@pytest.mark.parametrize("closing", ["pool", "server"])
def test_closing_while_a_persistent_session_runs_logs_no_error(closing: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with session_in_progress() as (bob, server, sig, ch):
            if closing == "pool":
                await bob.close()
                abort = wire.decode(await ch.recv())
                assert abort.type is SignalType.ABORT and abort.reason is AbortReason.CANCELLED
                with pytest.raises(ChannelBroken):
                    await ch.recv()  # then the session's CLOSE
                assert sig.links["bob"].alive  # only the session ended; the connection stays
                assert server.sessions_served == 1  # ended normally, not cancelled
                assert bob.handover_outcomes == {"HandoverCancelled": 1}
            else:
                await server.close()
                with pytest.raises(ChannelBroken):
                    await ch.recv()
                assert not sig.links["bob"].alive
                # The link closed under the session (pushed at once) before its task was cancelled.
                assert bob.handover_outcomes == {"ChannelBroken": 1}
                assert bob.get(NONCE).state == "Idle"  # rule 4: an unanswered lock returns the entry
            assert server.handler_errors == 0

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert errors_logged(caplog) == []


def test_a_take_cut_off_by_close_raises_pool_closed_and_closes_its_session(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
        got_lock = asyncio.Event()
        ended: list[str] = []

        async def silent(ch: IncomingChannel) -> None:  # reads the LOCK, never answers
            await ch.recv()
            got_lock.set()
            try:
                while True:
                    ended.append(wire.decode(await ch.recv()).type.name)
            except ChannelBroken as exc:
                ended.append(str(exc))

        server = await TcpSignallingServer(silent).start()
        sig = TcpSignalling("alice", {"bob": server.address})
        alice.signalling = sig
        try:
            await add_pair(alice, bob)
            take = asyncio.ensure_future(alice.take(NONCE))
            await got_lock.wait()
            await alice.close()
            with pytest.raises(PoolClosed):
                await take
            assert not take.cancelled()
            while len(ended) < 2:  # the ABORT, then the session's CLOSE reach bob's handler
                await asyncio.sleep(0)
            assert ended[0] == "ABORT" and "closed by the peer" in ended[1]
            assert sig.links["bob"].alive and sig.links["bob"].sessions == 0
        finally:
            await sig.close()
            await server.close()
            await bob.close()
            await alice.close()

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("persistent", [True, False])
def test_takes_reuse_one_connection_unless_per_take_mode_is_asked_for(persistent: bool) -> None:
    async def main() -> None:
        alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
        server = await TcpSignallingServer(bob.serve_handover).start()
        sig = TcpSignalling("alice", {"bob": server.address}, persistent=persistent)
        alice.signalling = sig
        try:
            for i in range(3):
                await add_pair(alice, bob, nonce=NONCE + i)
                lease = await alice.take(NONCE + i)
                theirs = await bob.accept()
                assert lease.entry.pair.nonce == theirs.entry.pair.nonce == NONCE + i
                alice.release(lease)
                bob.release(theirs)
            assert sig.connects == (1 if persistent else 3)
            assert len(server.links) == (1 if persistent else 0)
            assert alice.handover_outcomes == {"lease": 3} and server.sessions_served == 3
        finally:
            await sig.close()
            await server.close()
            await bob.close()
            await alice.close()

    run(main())
