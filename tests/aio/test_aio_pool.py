"""The asyncio driver on real loopback UDP: add, keepalive, bind failure, close, bad input.

Synchronisation is by events/futures only; ``wait_for`` bounds are failure
bounds, never timing assertions.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from natpool.aio.pool import AsyncPairPool
from natpool.config import PairConfig
from natpool.core.entry import StateChanged
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import BindFailed, DropReason, DuplicateNonce, PoolClosed
from tests.support.aio import bound_socket, loopback_pair
from tests.support.aio import run as _run

BOUND = 10.0
def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, BOUND)


FAST = PairConfig(ping_interval=0.01, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)




async def wait_until(pool: AsyncPairPool, predicate: Callable[[], bool]) -> None:
    """Wait for driver input until ``predicate`` holds (bounded by the test's wait_for)."""
    while not predicate():
        await pool.wait_changed()


def test_add_and_keepalive_exchange_over_real_udp() -> None:
    async def main() -> None:
        async with AsyncPairPool("alice", FAST) as alice, AsyncPairPool("bob", FAST) as bob:
            pair, sa, sb = loopback_pair(7)
            ea = await alice.add(pair, is_pinger=True, sock=sa)
            eb = await bob.add(pair, is_pinger=False, sock=sb)
            assert len(alice) == 1 and len(bob) == 1
            await wait_until(alice, lambda: ea.stats.received >= 3)
            assert eb.stats.received >= 3 and eb.stats.sent >= 3
            snap = alice.snapshot(7)
            assert snap.state == "Idle" and snap.srtt is not None and snap.frames_received >= 3
            assert alice.stats.datagrams_out >= 3 and bob.stats.datagrams_in >= 3
            # The receive-buffer fix took effect (private attribute: absent on uvloop).
            assert getattr(alice.transport(7), "max_size", 2048) == 2048

    run(main())


def test_add_binds_the_local_endpoint_itself() -> None:
    async def main() -> None:
        pair, sa, sb = loopback_pair(9)
        sa.close()  # free alice's port: the pool binds it itself
        async with AsyncPairPool("alice", FAST) as alice, AsyncPairPool("bob", FAST) as bob:
            ea = await alice.add(pair, is_pinger=True)
            await bob.add(pair, is_pinger=False, sock=sb)
            assert alice.transport(9).get_extra_info("sockname")[1] == pair.a.port
            await wait_until(alice, lambda: ea.stats.received >= 1)

    run(main())


def test_bind_failure_leaves_the_pool_unchanged() -> None:
    async def main() -> None:
        pair, sa, sb = loopback_pair(11)  # sa still holds alice's port
        sb.close()
        events: list[object] = []
        async with AsyncPairPool("alice", FAST) as alice:
            alice.on_event(events.append)
            with pytest.raises(BindFailed) as info:
                await alice.add(pair, is_pinger=True)
            assert info.value.errno is not None
            assert len(alice) == 0 and alice.entries() == [] and events == []
            assert alice.stats.sockets_opened == 0
            sa.close()
            # The same pair can be added once the port is free.
            await alice.add(pair, is_pinger=True)
            assert len(alice) == 1
            with pytest.raises(DuplicateNonce):
                await alice.add(pair, is_pinger=True)
            assert len(alice) == 1

    run(main())


def open_fds() -> int | None:
    """Open file descriptors of this process (Linux); None where /proc is absent."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def test_close_closes_every_socket_and_refuses_further_use() -> None:
    async def main() -> None:
        fds_before = open_fds()
        alice = AsyncPairPool("alice", FAST)
        expired: list[StateChanged] = []
        alice.on_event(lambda ev: expired.append(ev) if isinstance(ev, StateChanged) else None)
        socks = []
        for n in range(1, 6):
            pair, sa, sb = loopback_pair(n)
            socks.append(sb)
            await alice.add(pair, is_pinger=n % 2 == 0, sock=sa)
        transports = [alice.transport(n) for n in range(1, 6)]
        await alice.close()
        assert all(t.is_closing() for t in transports)
        assert all(t.get_extra_info("socket").fileno() == -1 for t in transports)
        assert alice.stats.sockets_opened == alice.stats.sockets_closed == 5
        assert len(alice) == 0 and alice.entries() == []
        assert sorted(ev.nonce for ev in expired if ev.target == "Expired") == [1, 2, 3, 4, 5]
        with pytest.raises(PoolClosed):
            await alice.add(loopback_pair(99)[0], is_pinger=True)
        await alice.close()  # idempotent
        for s in socks:
            s.close()
        if fds_before is not None:
            assert open_fds() == fds_before  # no descriptor outlives the pool

    run(main())


def test_garbage_datagrams_are_dropped_and_counted() -> None:
    async def main() -> None:
        async with AsyncPairPool("alice", FAST) as alice, AsyncPairPool("bob", FAST) as bob:
            pair, sa, sb = loopback_pair(21)
            ea = await alice.add(pair, is_pinger=True, sock=sa)
            await bob.add(pair, is_pinger=False, sock=sb)
            attacker = bound_socket()
            target = pair.a.addr
            # From a foreign address: counted as FOREIGN_ADDRESS whatever the content.
            for junk in (b"", b"\x00" * 9, b"x" * 1500):
                attacker.sendto(junk, target)
            await wait_until(alice, lambda: ea.stats.drops[DropReason.FOREIGN_ADDRESS] >= 3)
            attacker.close()
            # From the right address (bob's port): malformed / wrong nonce / unexpected ping.
            bob_sock = bob.transport(21)
            for junk in (b"\x01\x02", b"\xff" * 9, (22).to_bytes(8, "big") + b"\x00", b"\x00" * 8 + b"\x05"):
                bob_sock.sendto(junk, target)
            await wait_until(alice, lambda: ea.stats.drops[DropReason.MALFORMED] >= 3
                             and ea.stats.drops[DropReason.WRONG_NONCE] >= 1)
            # The pair survives and keeps exchanging frames.
            received = ea.stats.received
            await wait_until(alice, lambda: ea.stats.received > received + 2)
            assert alice.snapshot(21).state == "Idle"
            assert alice.core.drops[DropReason.FOREIGN_ADDRESS] >= 3

    run(main())


def test_event_subscription_sees_expiry_and_ends_on_close() -> None:
    async def main() -> None:
        cfg = PairConfig(ping_interval=0.01, no_inbound_timeout=0.05, ping_lifespan=0.02, min_drain_grace=0.01,
                         lock_timeout=0.04)
        alice = AsyncPairPool("alice", cfg)
        sub = alice.subscribe()
        pair, sa, sb = loopback_pair(31)
        await alice.add(pair, is_pinger=True, sock=sa)  # nobody answers on sb
        seen: list[StateChanged] = []
        async for ev in sub:
            if isinstance(ev, StateChanged):
                seen.append(ev)
                if ev.target == "Expired":
                    break
        assert seen[-1].reason is not None and seen[-1].reason.value == "no_inbound"
        assert len(alice) == 0 and alice.stats.sockets_closed == 1
        await alice.close()
        assert [ev async for ev in sub] == []
        sb.close()

    run(main())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_keepalive_over_ipv6_loopback_with_sockets_bound_by_the_pool() -> None:
    async def main() -> None:
        ports = []
        for _ in range(2):  # find two free ports, then let the pools bind them
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
                ports.append(s.getsockname()[1])
        pair = EndpointPair(Endpoint("alice", "::1", ports[0]), Endpoint("bob", "::1", ports[1]), 41)
        async with AsyncPairPool("alice", FAST) as alice, AsyncPairPool("bob", FAST) as bob:
            ea = await alice.add(pair, is_pinger=True)
            await bob.add(pair, is_pinger=False)
            await wait_until(alice, lambda: ea.stats.received >= 2)
            assert alice.snapshot(41).drops == {}

    run(main())


def test_send_errors_are_reported_to_the_entry_and_expire_it() -> None:
    async def main() -> None:
        # An IPv4 socket cannot send to an IPv6 peer: every send fails at once (asyncio reports it via
        # error_received), the driver tells the core, and max_send_failures later the entry expires.
        cfg = PairConfig(ping_interval=0.01, no_inbound_timeout=5.0, ping_lifespan=0.005, min_drain_grace=0.005,
                         lock_timeout=3.0, max_send_failures=3)
        sa = bound_socket()
        pair = EndpointPair(Endpoint("alice", "127.0.0.1", sa.getsockname()[1]), Endpoint("bob", "::1", 9), 51)
        async with AsyncPairPool("alice", cfg) as alice:
            expired: asyncio.Future[StateChanged] = asyncio.get_running_loop().create_future()
            alice.on_event(lambda ev: expired.set_result(ev) if isinstance(ev, StateChanged)
                           and ev.target == "Expired" and not expired.done() else None)
            await alice.add(pair, is_pinger=True, sock=sa)
            ev = await expired
            assert ev.reason is not None and ev.reason.value == "send_failures"
            assert alice.stats.send_errors >= 3 and len(alice) == 0
            assert alice.stats.sockets_closed == 1

    run(main())


def test_a_ping_flood_is_absorbed_without_amplification() -> None:
    async def main() -> None:
        async with AsyncPairPool("alice", FAST) as alice:
            pair, sa, sb = loopback_pair(61)
            ea = await alice.add(pair, is_pinger=False, sock=sa)  # alice answers pings
            sb.setblocking(False)
            ping = (61).to_bytes(8, "big") + b"\x00"
            def seen_at_least(n: int) -> Callable[[], bool]:
                return lambda: ea.stats.received + sum(ea.stats.drops.values()) >= n

            for batch in range(1, 11):  # batches small enough for the kernel's receive buffer
                for _ in range(50):
                    sb.sendto(ping, pair.a.addr)
                await wait_until(alice, seen_at_least(50 * batch))
            assert ea.stats.sent <= ea.stats.received  # at most one pong per ping: no amplification
            assert alice.snapshot(61).state == "Idle"
            sb.close()

    run(main())


def test_malformed_source_addresses_are_dropped_even_with_a_wire_observer() -> None:
    """``datagram_received`` with an address no socket would report: counted, observed, never raised."""
    async def main() -> None:
        seen: list[tuple[str, tuple[str, int]]] = []
        async with AsyncPairPool("alice", FAST) as alice:
            alice.wire_observer = lambda direction, _n, _d, addr, _s: seen.append((direction, addr))
            pair, sa, sb = loopback_pair(23)
            sb.close()
            entry = await alice.add(pair, is_pinger=False, sock=sa)
            protocol = alice.transport(23).get_protocol()
            odd: list[object] = [(), ("127.0.0.1",), None, 5, ("127.0.0.1", "port")]
            for addr in odd:
                protocol.datagram_received((23).to_bytes(8, "big") + b"\x00", addr)  # type: ignore[attr-defined]
            assert entry.stats.drops[DropReason.FOREIGN_ADDRESS] == len(odd)
            assert entry.stats.received == 0
            assert [d for d, _ in seen] == ["recv"] * len(odd)

    run(main())


def test_many_entries_due_at_once_expire_over_several_bounded_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With more entries due than ``TIMER_BATCH``, one timer callback runs only a batch and re-arms for
    the rest on the next loop iteration: every entry still expires and every socket is closed."""
    import time

    import natpool.aio.pool as aio_pool

    monkeypatch.setattr(aio_pool, "TIMER_BATCH", 3)

    async def main() -> None:
        cfg = PairConfig(ping_interval=0.5, no_inbound_timeout=0.6, ping_lifespan=0.5, lock_timeout=0.3)
        async with AsyncPairPool("alice", cfg) as alice:
            peers = []
            for n in range(8):
                pair, sa, sb = loopback_pair(100 + n)
                peers.append(sb)
                await alice.add(pair, is_pinger=False, sock=sa)  # ponger: nobody pings it
            deadline = max(e.get_timer() or 0.0 for e in alice.entries())
            time.sleep(max(0.0, deadline - alice.now()) + 0.01)  # block the loop: all 8 are due at the next wake-up
            wakeups = alice.stats.timer_wakeups
            await asyncio.wait_for(wait_until(alice, lambda: len(alice) == 0), 5.0)
            assert alice.stats.timer_wakeups - wakeups >= 3  # ceil(8 / 3) callbacks, not one
            assert alice.stats.sockets_closed == 8
            assert {e.nonce for e in alice.entries()} == set()
        for sb in peers:
            sb.close()

    run(main())
