"""The lease as an application sees it: nothing lost, nothing cut, a usable API (loopback only).

The loss case is the one real NATs and slow signalling produce: the responder
gets its lease first and talks at once while the initiator's entry is still
Locked, waiting for TAKEN. A gate on the initiator's signalling channel holds
TAKEN until the responder's datagrams have reached the initiator's socket
(observed, not slept for), which is that slow-signalling window made exact.
"""

from __future__ import annotations

import asyncio
import socket
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import natpool
from natpool import (
    AsyncPairPool,
    DropReason,
    Endpoint,
    EndpointPair,
    EntryState,
    InvalidState,
    Lease,
    LeasedProtocol,
    LocalError,
    PairConfig,
    StateChanged,
)
from natpool.aio.pool import LEASE_RECV_BUFFER, RECV_BUFFER, DriverStats
from natpool.machines.tables import ENTRY
from natpool.signalling import MemoryChannel, MemorySignalling, SignalChannel
from natpool.wire import signal as wire
from natpool.wire.frame import Frame, Kind, encode
from tests.support.aio import bound_socket
from tests.support.aio import run as _run

CFG = PairConfig(ping_interval=0.02, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)
BIG = bytes(range(256)) * 15 + bytes(160)  # 4,000 bytes, not all one value: a cut or reorder shows
NINE = b"hi alice!"  # an application datagram exactly as long as a keepalive frame
assert len(BIG) == 4000 and len(NINE) == 9


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, 15.0)


class Collect(asyncio.DatagramProtocol):
    """Records connection_made and every datagram with its address, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.got: list[tuple[bytes, Any]] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("connection_made")
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.calls.append("datagram_received")
        self.got.append((data, addr))
        self.arrived.set()

    async def wait_for(self, n: int) -> None:
        while len(self.got) < n:
            self.arrived.clear()
            await self.arrived.wait()


class GatedChannel:
    """Wraps the initiator's channel end: TAKEN is held back until ``gate`` is set (slow signalling)."""

    def __init__(self, inner: SignalChannel, gate: asyncio.Event) -> None:
        self.inner = inner
        self.peer_identity = inner.peer_identity
        self.gate = gate
        self.held = 0

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes:
        data = await self.inner.recv()
        if wire.decode(data).type is wire.SignalType.TAKEN and not self.gate.is_set():
            self.held += 1
            await self.gate.wait()
        return data

    async def close(self) -> None:
        await self.inner.close()


class GatedSignalling:
    """Memory signalling from alice to bob's ``serve_handover``; alice's end is gated."""

    def __init__(self, bob: AsyncPairPool, gate: asyncio.Event) -> None:
        self.served: list[asyncio.Task[Lease | None]] = []
        self.channels: list[GatedChannel] = []
        self.gate = gate

        def incoming(_peer: str, channel: MemoryChannel) -> None:
            self.served.append(asyncio.ensure_future(bob.serve_handover(channel)))

        self._inner = MemorySignalling(incoming)

    async def open(self, peer_identity: str) -> SignalChannel:
        channel = GatedChannel(await self._inner.open(peer_identity), self.gate)
        self.channels.append(channel)
        return channel


@asynccontextmanager
async def nodes(on_lease: Callable[[Lease], None] | None = None,
                wire_observer: Any = None) -> AsyncIterator[tuple[AsyncPairPool, AsyncPairPool, asyncio.Event]]:
    gate = asyncio.Event()
    gate.set()  # open unless a test closes it
    bob = AsyncPairPool("bob", CFG, on_lease=on_lease)
    alice = AsyncPairPool("alice", CFG, signalling=GatedSignalling(bob, gate), wire_observer=wire_observer)
    try:
        yield alice, bob, gate
    finally:
        await alice.close()
        await bob.close()


async def add_pair(alice: AsyncPairPool, bob: AsyncPairPool, nonce: int, alice_pings: bool = True) -> EndpointPair:
    s1, s2 = bound_socket(), bound_socket()
    pair = EndpointPair(Endpoint("alice", *s1.getsockname()), Endpoint("bob", *s2.getsockname()), nonce)
    ea = await alice.add(pair, is_pinger=alice_pings, sock=s1)
    eb = await bob.add(pair, is_pinger=not alice_pings, sock=s2)
    pinger, pool = (ea, alice) if alice_pings else (eb, bob)
    while pinger.stats.received < 2:  # keepalives flowed both ways: last_seen is a real inbound time
        await pool.wait_changed()
    return pair


# --- Loss: the responder talks first, the initiator is still Locked ------------------------------------


@pytest.mark.parametrize("alice_pings", [True, False])
def test_datagrams_sent_right_after_the_responders_hand_over_reach_the_initiators_lease_whole(
        alice_pings: bool) -> None:
    async def main() -> None:
        arrived: list[tuple[int, str]] = []  # (size, alice's entry state) of bob's datagrams at alice
        all_arrived = asyncio.Event()
        bob_addr: tuple[str, int] | None = None
        nonce = 0xA11CE

        def observe(direction: str, n: int, data: bytes, addr: tuple[str, int], state: str) -> None:
            if direction == "recv" and n == nonce and state in ENTRY.sets["silent"]:
                arrived.append((len(data), state))
                if len(arrived) == 3:
                    all_arrived.set()

        def bob_got_lease(lease: Lease) -> None:
            # The application's first act, synchronously at the hand-over: talk.
            lease.set_protocol(bob_app)
            assert lease.transport is not None
            lease.transport.sendto(NINE, lease.remote_addr)
            # A stray keepalive of this very pair (a ping in flight when the ponger went silent) must not
            # reach alice's application, unlike any other datagram.
            lease.transport.sendto(encode(Frame(nonce, Kind.PONG if alice_pings else Kind.PING)), lease.remote_addr)
            lease.transport.sendto(BIG, lease.remote_addr)
            bob_leases.append(lease)

        bob_app = Collect()
        bob_leases: list[Lease] = []
        async with nodes(on_lease=bob_got_lease, wire_observer=observe) as (alice, bob, gate):
            pair = await add_pair(alice, bob, nonce, alice_pings)
            bob_addr = pair.b.addr
            gate.clear()  # TAKEN will wait at alice: her entry stays Locked while bob talks
            take = asyncio.ensure_future(alice.take(nonce))
            await all_arrived.wait()
            assert alice.get(nonce).state == "Locked"  # the window the bug lived in
            assert [size for size, _ in arrived] == [9, 9, 4000]
            gate.set()
            lease = await take
            signalling = alice.signalling
            assert isinstance(signalling, GatedSignalling) and signalling.channels[0].held == 1

            alice_app = Collect()
            lease.set_protocol(alice_app)
            # Replayed at once, in order, with the sender's address; the stray keepalive is not among them.
            assert alice_app.calls[0] == "connection_made"
            assert alice_app.got == [(NINE, bob_addr), (BIG, bob_addr)]
            drops = lease.entry.stats.drops
            assert drops[DropReason.MALFORMED] == 0 and drops[DropReason.SILENT_STATE] == 1
            assert alice.stats.lease_buffer_drops == 0

            # And the other way, after both hand-overs: 4,000 bytes arrive whole at bob too.
            assert lease.transport is not None
            lease.transport.sendto(BIG, lease.remote_addr)
            await bob_app.wait_for(1)
            assert bob_app.got == [(BIG, pair.a.addr)]
            lease.close()
            bob_leases[0].close()

    run(main())


# --- Truncation -------------------------------------------------------------------------------------


def test_4000_byte_datagrams_cross_a_lease_whole_in_both_directions() -> None:
    async def main() -> None:
        async with nodes() as (alice, bob, _gate):
            pair = await add_pair(alice, bob, 0x4000)
            await add_pair(alice, bob, 0x4001)
            mine = await alice.take(0x4000)
            theirs = await bob.accept()
            a_app, b_app = Collect(), Collect()
            mine.set_protocol(a_app)
            theirs.set_protocol(b_app)
            for lease in (mine, theirs):
                assert lease.transport is not None
                # asyncio's private attribute (uvloop has none and reads whole datagrams anyway).
                assert getattr(lease.transport, "max_size", LEASE_RECV_BUFFER) == LEASE_RECV_BUFFER
                lease.transport.sendto(BIG, lease.remote_addr)
                lease.transport.sendto(BIG[::-1], lease.remote_addr)
            await a_app.wait_for(2)
            await b_app.wait_for(2)
            assert a_app.got == [(BIG, pair.b.addr), (BIG[::-1], pair.b.addr)]
            assert b_app.got == [(BIG, pair.a.addr), (BIG[::-1], pair.a.addr)]
            # The pair still pooled keeps the small keepalive buffer (the cheap path).
            pooled = alice.transport(0x4001)
            assert getattr(pooled, "max_size", RECV_BUFFER) == RECV_BUFFER
            mine.close()
            theirs.close()

    run(main())


# --- API ----------------------------------------------------------------------------------------------


def test_lease_api_addresses_socket_close_and_async_with() -> None:
    async def main() -> None:
        events: list[StateChanged] = []
        async with nodes() as (alice, bob, _gate):
            alice.on_event(lambda ev: events.append(ev) if isinstance(ev, StateChanged) else None)
            pair = await add_pair(alice, bob, 0xAB)
            lease = await alice.take(0xAB)
            theirs = await bob.accept()
            sock = lease.socket
            assert isinstance(sock, socket.socket)  # the real one, not asyncio's TransportSocket wrapper
            assert sock.getsockname() == pair.a.addr == lease.local_addr
            assert lease.remote_addr == pair.b.addr and theirs.remote_addr == pair.a.addr
            assert lease.sock is sock  # the old name still works
            lease.close()
            assert lease.transport is not None and lease.transport.is_closing()
            assert lease.entry.state == "Expired"
            closed = [e for e in events if e.nonce == 0xAB and e.target == "Expired"]
            assert len(closed) == 1 and closed[0].reason is natpool.ExpiryReason.CLOSED
            lease.close()  # idempotent: no second expiry, no error
            assert len([e for e in events if e.nonce == 0xAB and e.target == "Expired"]) == 1
            with pytest.raises(InvalidState):
                lease.set_protocol(Collect())  # closed: nothing to deliver any more
            async with theirs as entered:
                assert entered is theirs
            assert theirs.released and theirs.transport is not None and theirs.transport.is_closing()
        await asyncio.sleep(0)  # let connection_lost run (not a timing wait)
        assert sock.fileno() == -1  # closed through the transport that owns it

    run(main())


def test_set_protocol_calls_connection_made_first_then_replays_once() -> None:
    async def main() -> None:
        async with nodes() as (alice, bob, _gate):
            pair = await add_pair(alice, bob, 0xCD)
            lease = await alice.take(0xCD)
            theirs = await bob.accept()
            assert theirs.transport is not None
            for i in range(3):  # arrives before alice installs her protocol: buffered, not lost
                theirs.transport.sendto(b"early %d" % i, theirs.remote_addr)
            buffered = lease.transport.get_protocol() if lease.transport is not None else None
            assert isinstance(buffered, LeasedProtocol)
            while len(buffered.buffer) < 3:
                await asyncio.sleep(0)  # a yield, not a timed wait: the loop reads the socket
            first, second = Collect(), Collect()
            lease.set_protocol(first)
            assert first.calls == ["connection_made", *["datagram_received"] * 3]
            assert [d for d, _ in first.got] == [b"early 0", b"early 1", b"early 2"]
            assert {a for _, a in first.got} == {pair.b.addr}
            lease.set_protocol(second)  # switching replays nothing twice
            assert second.calls == ["connection_made"]
            theirs.transport.sendto(b"late", theirs.remote_addr)
            await second.wait_for(1)
            assert second.got == [(b"late", pair.b.addr)] and len(first.got) == 3

    run(main())


def test_set_lease_protocol_is_a_deprecated_alias() -> None:
    async def main() -> None:
        async with nodes() as (alice, bob, _gate):
            await add_pair(alice, bob, 0xEF)
            lease = await alice.take(0xEF)
            app = Collect()
            with pytest.deprecated_call():
                alice.set_lease_protocol(lease, app)
            assert app.calls == ["connection_made"]
            assert lease.transport is not None and lease.transport.get_protocol() is app

    run(main())


def test_sans_io_lease_closes_only_with_a_clock() -> None:
    from natpool.core.pool import PairPool

    pool = PairPool("alice", CFG)
    pair = EndpointPair(Endpoint("alice", "127.0.0.1", 1), Endpoint("bob", "127.0.0.1", 2), 0x99)
    entry = pool.add(pair, True, 0.0)
    lease = Lease(pair, entry, "initiator", lock=pool.lock)
    assert lease.transport is None and lease.socket is None
    assert lease.local_addr == pair.a.addr and lease.remote_addr == pair.b.addr
    with pytest.raises(LocalError, match="release"):
        lease.close()
    with pytest.raises(LocalError):
        lease.set_protocol(asyncio.DatagramProtocol())
    lease.release(1.0)
    lease.release(2.0)  # idempotent
    assert entry.state == "Expired"


# --- the bounded buffer ------------------------------------------------------------------------------


def test_lease_buffer_is_bounded_by_count_and_bytes_and_counts_what_it_refuses() -> None:
    stats = DriverStats()
    buf = LeasedProtocol(stats, limit=3, max_bytes=10_000)
    for i in range(5):
        buf.datagram_received(bytes([i]), ("127.0.0.1", i))
    assert buf.dropped == 2 and stats.lease_buffer_drops == 2
    assert buf.drain() == [(bytes([i]), ("127.0.0.1", i)) for i in range(3)]  # the oldest are kept
    assert buf.drain() == []
    buf.datagram_received(BIG, ("127.0.0.1", 9))
    buf.datagram_received(BIG, ("127.0.0.1", 9))
    buf.datagram_received(BIG, ("127.0.0.1", 9))  # 12,000 bytes > 10,000: refused
    assert buf.dropped == 3 and [len(d) for d, _ in buf.drain()] == [4000, 4000]


# --- Mapping lifetime ---------------------------------------------------------------------------------


def test_the_lease_carries_its_last_inbound_keepalive_and_mapping_deadline() -> None:
    async def main() -> None:
        cfg = PairConfig(ping_interval=0.02, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0,
                         nat_mapping_timeout=12.5)
        bob = AsyncPairPool("bob", cfg)
        alice = AsyncPairPool("alice", cfg, signalling=GatedSignalling(bob, asyncio.Event()))
        assert isinstance(alice.signalling, GatedSignalling)
        alice.signalling.gate.set()
        at_locked: dict[str, float] = {}

        def watch(pool: AsyncPairPool, name: str) -> Callable[[Any], None]:
            def on(ev: Any) -> None:
                if isinstance(ev, StateChanged) and ev.target == "Locked":
                    at_locked[name] = pool.get(ev.nonce).last_seen
            return on

        alice.on_event(watch(alice, "alice"))
        bob.on_event(watch(bob, "bob"))
        try:
            added = alice.now()
            await add_pair(alice, bob, 0x77)
            mine = await alice.take(0x77)
            theirs = await bob.accept()
            for lease, name in ((mine, "alice"), (theirs, "bob")):
                # The last inbound keepalive: after the pair was added, frozen since the entry went silent.
                assert added < lease.last_inbound == at_locked[name] <= alice.now()
                assert lease.mapping_deadline == lease.last_inbound + 12.5
            mine.close()
            theirs.close()
        finally:
            await alice.close()
            await bob.close()

    run(main())


def test_nat_mapping_timeout_must_be_positive() -> None:
    assert PairConfig().nat_mapping_timeout == 30.0
    with pytest.raises(LocalError, match="nat_mapping_timeout"):
        PairConfig(nat_mapping_timeout=0)


# --- Export ---------------------------------------------------------------------------------------------


def test_state_changed_is_typed_with_the_generated_state_literal() -> None:
    hints = typing.get_type_hints(StateChanged)
    assert hints["source"] == hints["target"] == EntryState
    assert set(typing.get_args(EntryState)) == set(ENTRY.states)


def _natpool_classes(tp: Any) -> set[type]:
    """Every natpool-defined class mentioned in annotation ``tp`` (through unions, generics, Callable)."""
    found: set[type] = set()
    if isinstance(tp, type) and tp.__module__.startswith("natpool"):
        found.add(tp)
    for arg in typing.get_args(tp):
        if isinstance(arg, list):
            for inner in arg:
                found |= _natpool_classes(inner)
        else:
            found |= _natpool_classes(arg)
    return found


def test_every_natpool_type_in_a_public_signature_is_exported() -> None:
    import natpool.core.lease

    extra = {"asyncio": asyncio, "Socket": socket.socket}  # names the modules import only for type checking
    exported = {id(getattr(natpool, name)) for name in natpool.__all__}
    missing: set[str] = set()
    for name in natpool.__all__:
        obj = getattr(natpool, name)
        if not isinstance(obj, type) or not obj.__module__.startswith("natpool"):
            continue
        members: list[Any] = [obj]
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            if isinstance(value, property):
                value = value.fget
            if callable(value):
                members.append(value)
        for member in members:
            module = vars(__import__(member.__module__, fromlist=["_"]))
            hints = typing.get_type_hints(member, globalns={**module, **extra})
            for attr, hint in hints.items():
                if isinstance(member, type) and attr.startswith("_"):
                    continue
                for cls in _natpool_classes(hint):
                    if id(cls) not in exported and not cls.__name__.startswith("_"):
                        missing.add(f"{cls.__module__}.{cls.__qualname__} (in {name})")
    assert natpool.core.lease.Lease is Lease
    assert sorted(missing) == [], sorted(missing)
    for name in ("PoolClosed", "BindFailed", "Subscription", "EntrySnapshot", "DriverStats", "LeasedProtocol",
                 "EntryState"):
        assert name in natpool.__all__
