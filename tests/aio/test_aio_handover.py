"""Handover over real loopback UDP + the reference TCP signalling, and the demo smoke test."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import HELLO_PREFIX, TcpSignalling, TcpSignallingServer
from natpool.cli import main as cli_main
from natpool.config import PairConfig
from natpool.core.lease import Lease
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, PairBusy, PoolClosed, UnknownPair
from natpool.wire import signal as wire
from tests.support.aio import bound_socket
from tests.support.aio import run as _run

BOUND = 15.0
CFG = PairConfig(ping_interval=0.02, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, BOUND)


udp = bound_socket


@asynccontextmanager
async def two_nodes() -> AsyncIterator[tuple[AsyncPairPool, AsyncPairPool, TcpSignallingServer, TcpSignallingServer]]:
    alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
    sa = await TcpSignallingServer(alice.serve_handover).start()
    sb = await TcpSignallingServer(bob.serve_handover).start()
    alice.signalling = TcpSignalling("alice", {"bob": sb.address})
    bob.signalling = TcpSignalling("bob", {"alice": sa.address})
    try:
        yield alice, bob, sa, sb
    finally:
        await sa.close()
        await sb.close()
        await alice.close()
        await bob.close()


async def add_pair(alice: AsyncPairPool, bob: AsyncPairPool, nonce: int, alice_pings: bool) -> EndpointPair:
    s1, s2 = udp(), udp()
    pair = EndpointPair(Endpoint("alice", "127.0.0.1", s1.getsockname()[1]),
                        Endpoint("bob", "127.0.0.1", s2.getsockname()[1]), nonce)
    ea = await alice.add(pair, is_pinger=alice_pings, sock=s1)
    eb = await bob.add(pair, is_pinger=not alice_pings, sock=s2)
    pinger = ea if alice_pings else eb
    pool = alice if alice_pings else bob
    while pinger.stats.received < 2:  # a keepalive round trip happened: a real drain is needed
        await pool.wait_changed()
    return pair


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait(data)


@pytest.mark.parametrize("alice_pings", [True, False])
def test_take_over_tcp_returns_leases_on_both_sides_with_the_socket_still_bound(alice_pings: bool) -> None:
    async def main() -> None:
        fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        async with two_nodes() as (alice, bob, _sa, _sb):
            pair = await add_pair(alice, bob, 0x51, alice_pings)
            await add_pair(alice, bob, 0x52, alice_pings)
            lease = await alice.take(0x51)
            theirs = await bob.accept()
            assert isinstance(lease, Lease) and isinstance(theirs, Lease)
            assert (lease.role, theirs.role) == ("initiator", "responder")
            assert lease.nonce == theirs.nonce == 0x51
            assert lease.entry.state == "InUse" and theirs.entry.state == "InUse"
            for mine, side in ((lease, pair.a), (theirs, pair.b)):
                sock = mine.socket  # the real socket, not asyncio's TransportSocket wrapper
                assert isinstance(sock, socket.socket) and sock.fileno() != -1 and sock.type == socket.SOCK_DGRAM
                assert sock.getsockname()[1] == side.port  # the very port the NAT mapping is keyed on
                assert mine.local_addr == sock.getsockname() and mine.remote_addr != mine.local_addr
            # The pooled entries are gone from the pools' sockets; the other pair is untouched.
            assert len(alice) == 1 and len(bob) == 1
            assert alice.get(0x52).state == "Idle"
            with pytest.raises(UnknownPair):
                alice.transport(0x51)
            # The handed-over sockets carry application data end to end.
            ca, cb = Collect(), Collect()
            lease.set_protocol(ca)
            theirs.set_protocol(cb)
            assert lease.transport is not None and theirs.transport is not None
            assert lease.remote_addr == pair.b.addr and theirs.remote_addr == pair.a.addr
            lease.transport.sendto(b"hello bob", lease.remote_addr)
            assert await cb.got.get() == b"hello bob"
            lease.close()
            async with theirs:
                pass  # closes on exit, like lease.close()
            assert lease.transport.is_closing() and theirs.transport.is_closing()
            assert alice.handover_outcomes["lease"] == 1 and bob.handover_outcomes["lease"] == 1
        await asyncio.sleep(0)  # let the closed transports' connection_lost run (not a timing wait)
        if fds_before is not None:
            assert len(os.listdir("/proc/self/fd")) == fds_before  # sockets, TCP and leases: nothing leaked

    run(main())


def test_take_any_and_a_second_take_of_a_taken_pair() -> None:
    async def main() -> None:
        async with two_nodes() as (alice, bob, _sa, _sb):
            await add_pair(alice, bob, 0x61, True)
            lease = await bob.take_any("alice")
            assert lease.nonce == 0x61 and (await alice.accept()).nonce == 0x61
            with pytest.raises(PairBusy):
                await bob.take_any("alice")  # nothing Idle left
            with pytest.raises(PairBusy):
                await bob.take(0x61)  # InUse (leased) until released
            assert bob.handover_outcomes == {"lease": 1, "PairBusy": 2}  # refused at the claim: counted too
            bob.release(lease)
            with pytest.raises(UnknownPair):
                await bob.take(0x61)  # released: expired and gone
            assert bob.handover_outcomes == {"lease": 1, "PairBusy": 2}  # misuse (a LocalError) is not an outcome

    run(main())


def test_a_take_over_the_persistent_link_is_four_messages_and_no_close_crosses() -> None:
    """LOCK (in the OPEN), LOCKED, TAKE, TAKEN with the responder's CLOSE: the initiator sends no CLOSE back."""
    async def main() -> None:
        async with two_nodes() as (alice, bob, _sa, sb):
            for nonce in (0x71, 0x72, 0x73):
                await add_pair(alice, bob, nonce, nonce % 2 == 0)
                lease = await alice.take(nonce)
                theirs = await bob.accept()
                alice.release(lease)
                bob.release(theirs)
            assert isinstance(alice.signalling, TcpSignalling)
            mine = alice.signalling.links["bob"]
            (served,) = sb.links
            await asyncio.sleep(0.05)  # anything still in flight arrives
            # Each CLOSE of ours was held in the read that brought the peer's CLOSE, and dropped there.
            assert mine.late == 3 and mine.drops == {}
            assert served.late == 0 and served.drops == {}  # so no late CLOSE ever reached the responder
            assert alice.handover_outcomes == {"lease": 3}

    run(main())


def test_simultaneous_takes_of_one_pair_give_one_lease_per_side() -> None:
    async def main() -> None:
        async with two_nodes() as (alice, bob, _sa, _sb):
            await add_pair(alice, bob, 0x71, True)
            results = await asyncio.gather(alice.take(0x71), bob.take(0x71), return_exceptions=True)
            leases = [r for r in results if isinstance(r, Lease)]
            assert len(leases) == 1 and isinstance(next(r for r in results if r not in leases), PairBusy)
            winner_is_alice = isinstance(results[0], Lease)
            other = await (bob if winner_is_alice else alice).accept()
            assert other.nonce == 0x71
            assert winner_is_alice  # rule 5: the pinger's (alice's) session wins

    run(main())


def test_garbage_signals_over_tcp_are_dropped_and_counted_and_the_pair_survives() -> None:
    async def main() -> None:
        async with two_nodes() as (alice, bob, _sa, sb):
            await add_pair(alice, bob, 0x81, True)
            host, port = sb.address
            hello = HELLO_PREFIX + b"mallory"
            junk = [
                b"\x00" * 30,  # bad version byte
                bytes([wire.VERSION_BYTE, 99]) + bytes(28),  # unknown type
                wire.encode(wire.Signal(wire.SignalType.TAKE, 0x81, b"\x01" * 16, 1)),  # TAKE without LOCK
                wire.encode(wire.Signal(wire.SignalType.LOCK, 0x99, b"\x01" * 16, 1)),  # unknown pair
            ]
            for frame in junk:
                reader, writer = await asyncio.open_connection(host, port)
                for msg in (hello, frame):
                    writer.write(struct.pack("!I", len(msg)) + msg)
                await writer.drain()
                await reader.read()  # the server ends the session and closes
                writer.close()
            assert bob.get(0x81).state == "Idle"
            assert sum(bob.core.drops.values()) >= 2
            assert bob.core.drops[DropReason.MALFORMED] >= 2
            assert sum(n for k, n in bob.handover_outcomes.items() if k != "lease") == 4
            assert sb.handler_errors == 0
            # A real take still works afterwards.
            lease = await alice.take(0x81)
            assert (await bob.accept()).nonce == lease.nonce

    run(main())


def test_close_with_a_pending_take_returns_nothing_and_closes_every_socket() -> None:
    async def main() -> None:
        alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
        gate = asyncio.Event()

        class Stuck:
            async def open(self, peer_identity: str) -> Any:
                await gate.wait()  # never set: the take hangs in channel set-up
                raise AssertionError("unreachable")

        alice.signalling = Stuck()
        await add_pair(alice, bob, 0x91, True)
        transports = [alice.transport(0x91), bob.transport(0x91)]
        take = asyncio.create_task(alice.take(0x91))
        while alice.get(0x91).state != "InLocking":
            await alice.wait_changed()
        await alice.close()
        await bob.close()
        with pytest.raises(PoolClosed):  # shutdown, told apart from the caller's own cancellation
            await take
        assert all(t.is_closing() for t in transports)
        assert alice.stats.sockets_opened == alice.stats.sockets_closed

    run(main())


def test_demo_smoke_exits_zero() -> None:
    code = cli_main(["demo", "--pairs", "6", "--takes", "3", "--ping-interval", "0.02", "--duration", "0.5",
                     "--refresh", "0.2", "--seed", "3", "--quiet"])
    assert code == 0


def test_bench_quick_smoke_reports_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code = cli_main(["bench", "--quick", "--json", "--only", "ops", "--only", "handover"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ops"]["take_any_ratio"] > 0 and report["handover"]["handover_us"]["n"] == 50
    assert set(report["targets"]) >= {"take_any_ratio", "handover_p50_ms", "handover_p99_ms"}


def test_demo_exits_non_zero_when_a_guarantee_is_violated(monkeypatch: pytest.MonkeyPatch) -> None:
    import natpool.aio.demo as demo

    # Pretend Idle were a silent state: every keepalive on the wire now violates "silence after lock".
    monkeypatch.setattr(demo, "SILENT", frozenset({"Idle", "Locked", "InUse", "Expired"}))
    code = cli_main(["demo", "--pairs", "2", "--takes", "0", "--ping-interval", "0.02", "--duration", "0.2",
                     "--seed", "1", "--quiet"])
    assert code == 1


def test_unaccepted_responder_leases_close_with_the_pool_and_on_lease_hands_them_out() -> None:
    async def main() -> None:
        async with two_nodes() as (alice, bob, _sa, _sb):
            got: list[Lease] = []
            alice.on_lease = got.append
            await add_pair(alice, bob, 0xA1, True)
            await add_pair(alice, bob, 0xA2, True)
            mine = await alice.take(0xA1)  # bob's responder lease is never accepted
            theirs = await bob.take(0xA2)  # alice's goes to on_lease
            assert [lease.nonce for lease in got] == [0xA2]
            unaccepted = bob._incoming[0]
            alice.release(mine)
            bob.release(theirs)
            alice.release(got[0])
        assert unaccepted.transport is not None and unaccepted.transport.is_closing()

    run(main())
