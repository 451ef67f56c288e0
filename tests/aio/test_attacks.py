"""Issue 10's attacks, end to end through the public asyncio API on loopback (the attacker's view).

Each attack at the top of issue 10 is run against the merged driver: two
``AsyncPairPool`` nodes, their pairs added with and without a key, the
handover over ``TcpSignalling`` / ``TcpSignallingServer`` with and without
``secrets=``. With keys (and secrets) each test asserts the defended
outcome; without them it asserts exactly the weakness the README documents,
so a change in either direction shows up here. The attacker knows every
nonce (they are in clear in each keepalive) and plays from the places the
issue names: the dead peer's freed port, the path between the nodes (a
relay that delays and forges), and the signalling server's open port.

What the sans-IO and simulator tests already show is not repeated here:
``tests/core/test_handover_auth.py``, ``tests/sim/test_sim_auth.py`` and
``tests/sim/test_sim_adversary.py`` drive the core directly;
``tests/aio/test_aio_keyed.py`` forges keyed frames at a pinger from its
dead peer's port and spoofs live peers by raw socket;
``tests/aio/test_aio_tcp_auth.py`` checks the hello, the caps and their
logging with a stand-in handler. Here the pools, the keys and the verified
peer identity go all the way through (``serve_handover`` ->
``Node.new_channel_id(peer)`` -> the responder session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import natpool
from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import IncomingChannel, TcpSignalling, TcpSignallingServer
from natpool.config import PairConfig
from natpool.core.entry import Drained, ExpiryReason, PairEntry, StateChanged
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import ChannelBroken, DropReason, HandoverError, PairBusy
from natpool.signalling import SignalChannel
from natpool.wire import signal as wire
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.keepalive import KeepaliveKey
from natpool.wire.keys import SIGNAL, derive
from natpool.wire.signal import Signal, SignalType
from tests.support.aio import bind_when_free, bound_socket, wait_for
from tests.support.aio import run as aio_run

Addr = tuple[str, int]
KEY = bytes(range(40, 72))
WRONG = b"the attacker's guess at the key!"
K_ALICE = b"alice-bob secret, 32 bytes long!"
K_MALLORY = b"mallory-bob secret, also 32 b..."
SECRETS = {"alice": K_ALICE, "mallory": K_MALLORY}
BOUND = 30.0  # failure bound of every test, never a timing assertion
#: Measured outcomes, by test: printed with ``-s`` and quoted in issue 10's closing note.
MEASURED: dict[str, object] = {}


def note(name: str, value: object) -> None:
    MEASURED[name] = value
    print(f"[attack] {name}: {value}")


def forged_frames(nonce: int, key: bytes | None, kind: Kind, ping: bytes | None = None) -> list[bytes]:
    """What an attacker without the key makes of a ``kind`` frame: the legacy frame, and keyed ones it can guess.

    ``ping``: a real frame it saw (the victim's own ping), replayed as it is and turned into a pong.
    """
    out = [encode(Frame(nonce, kind))]
    if key is not None:
        guess = KeepaliveKey(WRONG)
        out.append(guess.pong(nonce, 1) if kind is Kind.PONG else guess.ping(nonce, 1))
        if ping is not None and len(ping) == 34:
            out += [ping, ping[:1] + b"\x01" + ping[2:],
                    guess.pong(nonce, int.from_bytes(ping[10:18], "big"))]
    return out


async def add_pair(alice: AsyncPairPool, bob: AsyncPairPool, nonce: int, key: bytes | None,
                   alice_pings: bool = True) -> tuple[PairEntry, PairEntry]:
    sa, sb = bound_socket(), bound_socket()
    pair = EndpointPair(Endpoint("alice", *sa.getsockname()), Endpoint("bob", *sb.getsockname()), nonce)
    ea = await alice.add(pair, is_pinger=alice_pings, sock=sa, key=key)
    eb = await bob.add(pair, is_pinger=not alice_pings, sock=sb, key=key)
    await wait_for(alice, lambda: ea.state == eb.state == "Idle" and ea.stats.received >= 2
                   and eb.stats.received >= 2)
    return ea, eb


class Expiry:
    """The first expiry of ``nonce`` on ``pool``: when, and why (an ``on_event`` callback)."""

    def __init__(self, pool: AsyncPairPool, nonce: int) -> None:
        self.nonce = nonce
        self.at: float | None = None
        self.reason: ExpiryReason | None = None
        self.done = asyncio.Event()
        pool.on_event(self)

    def __call__(self, ev: object) -> None:
        if (isinstance(ev, StateChanged) and ev.nonce == self.nonce and ev.target == "Expired"
                and self.at is None):
            self.at, self.reason = ev.at, ev.reason
            self.done.set()


# === a) liveness spoofing after the peer died ====================================================

LIVE_CFG = PairConfig(ping_interval=0.05, no_inbound_timeout=1.0, ping_lifespan=0.25, lock_timeout=0.5)


async def impersonate(sock: socket.socket, victim: Addr, nonce: int, key: bytes | None, victim_pings: bool,
                      stop: asyncio.Event) -> int:
    """At the dead peer's port: answer the victim's pings with forged pongs, or feed a ponger forged pings."""
    loop = asyncio.get_running_loop()
    sent = 0
    while not stop.is_set():
        seen: bytes | None = None
        with contextlib.suppress(TimeoutError):
            seen, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), LIVE_CFG.ping_interval)
        if victim_pings and seen is None:
            continue
        kind = Kind.PONG if victim_pings else Kind.PING
        for data in forged_frames(nonce, key, kind, seen):
            with contextlib.suppress(OSError):
                sock.sendto(data, victim)
                sent += 1
    return sent


@pytest.mark.parametrize("victim", ["pinger", "ponger"])
@pytest.mark.parametrize("mode", ["keyed", "legacy", "control"])
def test_liveness_spoofing_from_the_dead_peers_port(victim: str, mode: str) -> None:
    """The survivor of a dead peer, fed forged frames from the peer's own (host, port).

    keyed: it expires within ``no_inbound_timeout`` of the peer's death,
    KEY_MISMATCH (forged frames kept coming, none authentic), and no forged
    frame counted. legacy: it stays Idle for as long as the attacker
    plays (asserted over 3x ``no_inbound_timeout``), and expires NO_INBOUND
    once the attacker stops. control (legacy, nobody forging): NO_INBOUND.
    """
    key = KEY if mode == "keyed" else None
    nonce = {"pinger": 0xA1, "ponger": 0xA2}[victim]
    timeout = LIVE_CFG.no_inbound_timeout

    async def main() -> None:
        async with AsyncPairPool("alice", LIVE_CFG) as alice, AsyncPairPool("bob", LIVE_CFG) as bob:
            # The victim is alice: the pinger or the ponger of the pair; bob dies.
            ea, eb = await add_pair(alice, bob, nonce, key, alice_pings=victim == "pinger")
            expiry = Expiry(alice, nonce)
            dead_addr, victim_addr = eb.local.addr, ea.local.addr
            await bob.remove(nonce)
            died, real, answered = alice.now(), ea.stats.received, ea.stats.sent
            stop = asyncio.Event()
            attacker = None
            task: asyncio.Task[int] | None = None
            if mode != "control":
                attacker = await bind_when_free(dead_addr)
                task = asyncio.create_task(impersonate(attacker, victim_addr, nonce, key, victim == "pinger", stop))
            try:
                if mode == "legacy":
                    while alice.now() - died < 3 * timeout:
                        await asyncio.sleep(LIVE_CFG.ping_interval)
                        assert ea.state == "Idle" and not expiry.done.is_set()
                    kept = alice.now() - died
                    assert ea.stats.received > real + 10  # the forgeries counted as the peer's frames
                    stop.set()
                    stopped = alice.now()
                    await expiry.done.wait()
                    assert expiry.reason is ExpiryReason.NO_INBOUND
                    assert expiry.at is not None
                    note(f"liveness/{victim}/legacy", f"Idle {kept:.2f}s after the peer died (attacker playing, "
                         f"no_inbound_timeout {timeout}s); expired {expiry.at - stopped:.2f}s after it stopped")
                else:
                    await expiry.done.wait()
                    assert expiry.at is not None
                    want = ExpiryReason.KEY_MISMATCH if mode == "keyed" else ExpiryReason.NO_INBOUND
                    assert expiry.reason is want
                    # No forged frame counted: at most the real frames already in flight when bob died.
                    assert ea.stats.received <= real + LIVE_CFG.ping_lifespan / LIVE_CFG.ping_interval + 1
                    note(f"liveness/{victim}/{mode}", f"expired {expiry.reason.name} {expiry.at - died:.2f}s after "
                         f"the peer died (no_inbound_timeout {timeout}s)")
            finally:
                stop.set()
                if task is not None:
                    sent = await task
                    assert sent > 0
                if attacker is not None:
                    attacker.close()
            if mode == "keyed":
                drops = alice.core.drops
                assert drops[DropReason.BAD_MAC] > 0 and drops[DropReason.FORMAT_MISMATCH] > 0
                if victim == "pinger":  # its own ping reflected, or made into a pong with a guessed MAC
                    assert drops[DropReason.REPLAY] + drops[DropReason.UNEXPECTED] > 0
                if victim == "ponger":  # no forged ping answered (at most the real ones in flight)
                    assert ea.stats.sent - answered <= LIVE_CFG.ping_lifespan / LIVE_CFG.ping_interval + 1

    aio_run(main(), BOUND)


# === b) a forged pong during a drain ==============================================================

DRAIN_CFG = PairConfig(ping_interval=0.05, no_inbound_timeout=3.0, ping_lifespan=1.0, lock_timeout=2.0)
PATH_DELAY = 0.2  # alice -> bob, one way: a slow path, well inside ping_lifespan


class _Leg(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data)


@dataclass
class OnPath:
    """The path between alice and bob, in the attacker's hands: alice -> bob takes PATH_DELAY, bob -> alice is prompt.

    alice sees bob at ``to_bob`` and bob sees alice at ``to_alice`` (as
    behind NATs). With ``forge`` the attacker answers each of alice's pings
    at once with forged pongs from bob's address (the legacy pong, and keyed
    ones it can make without the key), and still forwards the real ping.
    ``in_flight``: alice's frames on the path, not yet delivered to bob.
    """

    alice: Addr
    bob: Addr
    nonce: int
    key: bytes | None
    forge: bool
    forged: int = 0
    in_flight: int = 0
    legs: list[asyncio.DatagramTransport] = field(default_factory=list)

    async def start(self) -> tuple[Addr, Addr]:
        loop = asyncio.get_running_loop()
        for on_datagram in (self._from_alice, self._from_bob):
            transport, _ = await loop.create_datagram_endpoint(lambda f=on_datagram: _Leg(f),  # type: ignore[misc]
                                                               local_addr=("127.0.0.1", 0))
            self.legs.append(transport)
        a, b = (leg.get_extra_info("sockname")[:2] for leg in self.legs)
        return (a[0], a[1]), (b[0], b[1])

    def _from_alice(self, data: bytes) -> None:
        a_leg = self.legs[0]
        if self.forge and data[1:2] != b"\x01" and len(data) in (9, 34):  # a ping (9: flag at byte 8)
            for frame in forged_frames(self.nonce, self.key, Kind.PONG, data):
                a_leg.sendto(frame, self.alice)
                self.forged += 1
        self.in_flight += 1
        asyncio.get_running_loop().call_later(PATH_DELAY, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        self.in_flight -= 1
        if not self.legs[1].is_closing():
            self.legs[1].sendto(data, self.bob)

    def _from_bob(self, data: bytes) -> None:
        self.legs[0].sendto(data, self.alice)

    def close(self) -> None:
        for leg in self.legs:
            leg.close()


class Drain:
    """alice's drain of ``nonce``: how long it took and what was still on the path when she locked."""

    def __init__(self, nonce: int, path: OnPath) -> None:
        self.nonce, self.path = nonce, path
        self.began: float | None = None
        self.took: float | None = None
        self.in_flight_at_lock: int | None = None

    def __call__(self, ev: object) -> None:
        if isinstance(ev, StateChanged) and ev.nonce == self.nonce and ev.target == "InLocking":
            self.began = ev.at
        elif isinstance(ev, Drained) and ev.nonce == self.nonce and self.began is not None and self.took is None:
            self.took = ev.at - self.began
        elif isinstance(ev, StateChanged) and ev.nonce == self.nonce and ev.target == "Locked":
            self.in_flight_at_lock = self.path.in_flight


def is_ping(data: bytes, nonce: int) -> bool:
    return data == encode(Frame(nonce, Kind.PING)) or (len(data) == 34 and data[1] == 0)


@pytest.mark.parametrize("mode", ["keyed", "legacy", "control"])
def test_a_forged_pong_from_the_path_during_a_drain(mode: str) -> None:
    """alice (pinger) takes over TCP signalling while an on-path attacker forges pongs for her in-flight pings.

    keyed: the forgeries are dropped and counted, the drain lasts until the
    real pongs come back, nothing of alice's is on the path when she locks,
    and bob's application gets no keepalive (CleanHandover holds on the
    wire). legacy: the forged pongs retire each ping as it leaves, the
    drain is over at once with alice's real pings still on the path, and
    they land on bob's handed-over socket, in his application. control:
    legacy, nobody forging: a clean drain.
    """
    key = KEY if mode == "keyed" else None
    nonce = 0xB1

    async def main() -> None:
        from tests.aio.test_lease import Collect

        late: list[str] = []

        def watch(who: str) -> Callable[[str, int, bytes, Addr, str], None]:
            def observe(direction: str, n: int, data: bytes, addr: Addr, state: str) -> None:
                if direction == "recv" and n == nonce and state in ("Locked", "InUse"):
                    late.append(who)
            return observe

        alice = AsyncPairPool("alice", DRAIN_CFG, wire_observer=watch("alice"))
        bob = AsyncPairPool("bob", DRAIN_CFG, wire_observer=watch("bob"))
        async with alice, bob, TcpSignallingServer(bob.serve_handover, identity="bob",
                                                   secrets={"alice": K_ALICE}) as server:
            alice.signalling = TcpSignalling("alice", {"bob": server.address}, secrets={"bob": K_ALICE})
            sa, sb = bound_socket(), bound_socket()
            path = OnPath(sa.getsockname(), sb.getsockname(), nonce, key, forge=mode != "control")
            to_bob, to_alice = await path.start()
            ea = await alice.add(EndpointPair(Endpoint("alice", *sa.getsockname()), Endpoint("bob", *to_bob), nonce),
                                 is_pinger=True, sock=sa, key=key)
            eb = await bob.add(EndpointPair(Endpoint("alice", *to_alice), Endpoint("bob", *sb.getsockname()), nonce),
                               is_pinger=False, sock=sb, key=key)
            await wait_for(alice, lambda: ea.state == eb.state == "Idle" and ea.stats.received >= 3)
            drain = Drain(nonce, path)
            alice.on_event(drain)
            lease = await alice.take(nonce)
            peer_lease = await bob.accept()
            app = Collect()
            peer_lease.set_protocol(app)  # bob's application: gets whatever the pool does not keep
            while path.in_flight:
                await asyncio.sleep(PATH_DELAY / 4)  # whatever was on the path lands
            await asyncio.sleep(0.05)
            keepalives = [d for d, _ in app.got if is_ping(d, nonce)]
            assert drain.took is not None and drain.in_flight_at_lock is not None
            if mode == "legacy":
                assert drain.in_flight_at_lock > 0  # locked with real pings still on the path
                assert keepalives  # ... and they reached bob's application over the handed-over socket
            else:
                assert drain.in_flight_at_lock == 0
                assert keepalives == [] and late == []
            if mode == "keyed":
                assert path.forged > 0 and ea.stats.drops[DropReason.BAD_MAC] > 0
                assert ea.stats.drops[DropReason.FORMAT_MISMATCH] > 0
            note(f"drain/{mode}", f"drain {drain.took * 1000:.0f} ms (path delay {PATH_DELAY * 1000:.0f} ms, "
                 f"ping every {DRAIN_CFG.ping_interval * 1000:.0f} ms); {drain.in_flight_at_lock} ping(s) on the "
                 f"path at lock, {len(keepalives)} delivered to bob's application; {path.forged} forged")
            lease.close()
            peer_lease.close()
            path.close()
            assert isinstance(alice.signalling, TcpSignalling)
            await alice.signalling.close()

    aio_run(main(), BOUND)


# === c) signalling bound to the pair's peer =======================================================

SIG_CFG = PairConfig(ping_interval=0.02, no_inbound_timeout=4.0, ping_lifespan=0.5, lock_timeout=1.0)


class Tap:
    """alice's signalling, with an eavesdropper on her connections: every signal she sends, recorded."""

    def __init__(self, inner: TcpSignalling) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    async def open(self, peer_identity: str) -> SignalChannel:
        return _TappedChannel(await self.inner.open(peer_identity), self.sent)


class _TappedChannel:
    def __init__(self, inner: SignalChannel, log: list[bytes]) -> None:
        self.inner, self.log = inner, log
        self.peer_identity = inner.peer_identity

    async def send(self, data: bytes) -> None:
        self.log.append(data)
        await self.inner.send(data)

    async def recv(self) -> bytes:
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Net:
    alice: AsyncPairPool
    bob: AsyncPairPool
    bob_server: TcpSignallingServer
    alice_server: TcpSignallingServer
    secure: bool
    gate: asyncio.Event  # alice's server answers bob's sessions only while set
    bob_gate: asyncio.Event  # bob's server answers sessions only while set

    def as_(self, who: str, secret: bytes | None = None, persistent: bool = True) -> TcpSignalling:
        """A client of bob's server claiming to be ``who`` (with ``secret``, or none)."""
        return TcpSignalling(who, {"bob": self.bob_server.address}, persistent=persistent,
                             secrets=None if secret is None else {"bob": secret})


@contextlib.asynccontextmanager
async def net(secure: bool) -> AsyncIterator[Net]:
    """alice and bob, each serving handovers over TCP, with per-peer secrets (secure) or none (tests-only mode)."""
    alice, bob = AsyncPairPool("alice", SIG_CFG), AsyncPairPool("bob", SIG_CFG)
    gate, bob_gate = asyncio.Event(), asyncio.Event()
    gate.set()
    bob_gate.set()

    async def alice_serves(ch: IncomingChannel) -> None:
        await gate.wait()
        await alice.serve_handover(ch)

    async def bob_serves(ch: IncomingChannel) -> None:
        await bob_gate.wait()
        await bob.serve_handover(ch)

    bob_kw: dict[str, Any] = {"identity": "bob", "secrets": SECRETS} if secure else {}
    alice_kw: dict[str, Any] = {"identity": "alice", "secrets": {"bob": K_ALICE}} if secure else {}
    async with alice, bob, TcpSignallingServer(bob_serves, **bob_kw) as bob_server, \
            TcpSignallingServer(alice_serves, **alice_kw) as alice_server:
        alice.signalling = TcpSignalling("alice", {"bob": bob_server.address},
                                         secrets={"bob": K_ALICE} if secure else None)
        bob.signalling = TcpSignalling("bob", {"alice": alice_server.address},
                                       secrets={"alice": K_ALICE} if secure else None)
        try:
            yield Net(alice, bob, bob_server, alice_server, secure, gate, bob_gate)
        finally:
            for pool in (alice, bob):
                sig = pool.signalling
                if isinstance(sig, TcpSignalling):
                    await sig.close()
                elif isinstance(sig, Tap):
                    await sig.inner.close()


def forged_lock(nonce: int, keyed: bool, sid: bytes) -> tuple[bytes, bytes]:
    """mallory's LOCK for ``nonce``: legacy (anyone can make it), or signed under her guess at the key."""
    ri = os.urandom(wire.RAND_SIZE)
    if not keyed:
        return wire.encode(Signal(SignalType.LOCK, nonce, sid, 1)), ri
    return wire.encode_signed(SignalType.LOCK, nonce, sid, 1, None, ri, wire.NO_RAND, derive(WRONG, SIGNAL),
                              False)[1], ri


async def steal(sig: TcpSignalling, nonce: int, lock: bytes | None = None, keyed: bool = False,
                hang_up_after_lock: bool = False) -> list[str]:
    """mallory runs the initiator's half by hand: LOCK (forged or ``lock``, a recording), then TAKE; her replies."""
    try:
        ch = await sig.open("bob")
    except ChannelBroken:
        return ["refused hello"]
    got: list[str] = []
    try:
        sid = os.urandom(wire.SID_SIZE)
        ri = os.urandom(wire.RAND_SIZE)
        if lock is None:
            lock, ri = forged_lock(nonce, keyed, sid)
        else:
            recorded = wire.decode(lock)
            sid, ri = recorded.sid, recorded.ri or ri
        await ch.send(lock)
        reply = wire.decode(await asyncio.wait_for(ch.recv(), 3 * SIG_CFG.lock_timeout))
        got.append(reply.type.name)
        if reply.type is not SignalType.LOCKED or hang_up_after_lock:
            return got
        if reply.signed:  # she cannot sign: her guess at the key, bound to the responder's fresh random
            assert reply.rr is not None
            take = wire.encode_signed(SignalType.TAKE, nonce, sid, 2, None, ri, reply.rr, derive(WRONG, SIGNAL),
                                      False)[1]
        else:
            take = wire.encode(Signal(SignalType.TAKE, nonce, sid, 2))
        await ch.send(take)
        got.append(wire.decode(await asyncio.wait_for(ch.recv(), 3 * SIG_CFG.lock_timeout)).type.name)
    except (ChannelBroken, TimeoutError):
        got.append("closed")
    finally:
        await ch.close()
    return got


async def settle(pool: AsyncPairPool, entry: PairEntry) -> None:
    """Until ``entry`` is back in Idle (or gone) and no session on this pool runs any more."""
    while entry.state not in ("Idle", "Expired", "InUse") or pool.node.sessions():
        await asyncio.sleep(SIG_CFG.ping_interval)


@pytest.mark.parametrize("config", ["secrets/as-mallory", "secrets/as-alice-without-her-secret",
                                    "none/as-mallory", "none/as-alice", "none/keyed-pair"])
def test_a_third_partys_lock_and_take_over_tcp(config: str) -> None:
    """mallory opens a session to bob for alice and bob's pair and runs LOCK/TAKE herself.

    With secrets bob's server verifies who is calling: as herself she is
    refused by the responder (UNEXPECTED_PEER, answered like an unknown
    pair, nothing claimed); as "alice" without alice's secret her hello is
    refused. Without secrets (the tests-only mode) the claim is believed
    and, on a legacy pair, mallory gets bob's lease, whatever name she
    gives. A keyed pair stops her even then: her LOCK does not verify.
    Every refused attack leaves the pair Idle and alice's real take works.
    """
    secure = config.startswith("secrets")
    keyed = config.endswith("keyed-pair")
    nonce = 0xC1

    async def main() -> None:
        async with net(secure) as n:
            _, eb = await add_pair(n.alice, n.bob, nonce, KEY if keyed else None)
            if config == "secrets/as-mallory":
                mallory = n.as_("mallory", K_MALLORY)
            elif config == "secrets/as-alice-without-her-secret":
                mallory = n.as_("alice", K_MALLORY)
            else:
                mallory = n.as_("alice" if config == "none/as-alice" else "mallory")
            got = await steal(mallory, nonce, keyed=keyed)
            await mallory.close()
            await settle(n.bob, eb)
            while secure and not n.bob_server.stats.hellos_refused and got == ["refused hello"]:
                await asyncio.sleep(0.01)  # the server notices the client's hang-up
            if config.startswith("none/as-"):  # the documented weakness of the unauthenticated mode
                assert got == ["LOCKED", "TAKEN"]
                stolen = await n.bob.accept()
                assert stolen.nonce == nonce and n.bob.handover_outcomes["lease"] == 1
                stolen.close()
                note(f"third-party/{config}", f"{got}: bob's application got a lease for mallory")
                return
            assert n.bob.handover_outcomes["lease"] == 0 and eb.state == "Idle"
            if config == "secrets/as-mallory":
                assert got == ["ABORT"] and n.bob.core.drops[DropReason.UNEXPECTED_PEER] == 1
            elif config == "secrets/as-alice-without-her-secret":
                # mallory cannot prove the secret, and bob's proof does not verify under hers either
                assert got == ["refused hello"] and n.bob_server.stats.hellos_refused == 1
                assert mallory.drops[DropReason.BAD_MAC] + n.bob_server.drops[DropReason.BAD_MAC] >= 1
                assert n.bob_server.stats.authenticated == 0
            else:
                assert got == ["closed"] and n.bob.core.drops[DropReason.BAD_MAC] == 1  # refused in silence
            lease = await n.alice.take(nonce)  # the pair is intact: the real peer still gets it
            peer_lease = await n.bob.accept()
            note(f"third-party/{config}", f"{got}: no lease for mallory, alice's take then succeeded")
            lease.close()
            peer_lease.close()

    aio_run(main(), BOUND)


@pytest.mark.parametrize("secure", [True, False], ids=["secrets", "no-secrets"])
def test_one_connection_and_one_session_per_pair_against_every_pair(secure: bool) -> None:
    """mallory, over one connection to bob, opens a session per pair at once and tries to take them all.

    secrets (she is a known peer, just not the pairs' peer): every session is
    refused, no pair is locked, stolen or lost, and alice takes each one
    afterwards. no secrets (legacy pairs): she steals every pair.
    """
    pairs = 6

    async def main() -> None:
        async with net(secure) as n:
            entries = [await add_pair(n.alice, n.bob, 0xC10 + i, None) for i in range(pairs)]
            mallory = n.as_("mallory", K_MALLORY if secure else None)
            began = n.bob.now()
            results = await asyncio.gather(*(steal(mallory, 0xC10 + i) for i in range(pairs)))
            took = n.bob.now() - began
            await mallory.close()
            for _, eb in entries:
                await settle(n.bob, eb)
            if not secure:
                assert results == [["LOCKED", "TAKEN"]] * pairs
                assert n.bob.handover_outcomes["lease"] == pairs
                for _ in range(pairs):
                    (await n.bob.accept()).close()
                note("per-pair-flood/no-secrets", f"{pairs}/{pairs} pairs stolen over one connection in {took:.2f}s")
                return
            assert results == [["ABORT"]] * pairs
            assert n.bob.core.drops[DropReason.UNEXPECTED_PEER] == pairs and n.bob.handover_outcomes["lease"] == 0
            assert all(ea.state == eb.state == "Idle" for ea, eb in entries)
            for _ in range(pairs):
                lease = await n.alice.take_any("bob")
                (await n.bob.accept()).close()
                lease.close()
            note("per-pair-flood/secrets", f"0/{pairs} pairs locked or stolen ({took:.2f}s); "
                 f"alice then took all {pairs}")

    aio_run(main(), BOUND)


async def record_lock(n: Net, nonce: int) -> bytes:
    """alice's LOCK for ``nonce`` as an eavesdropper on her connection records it, the pair left Idle.

    alice starts a take while bob's server holds her session, and cancels it
    (ABORT(CANCELLED): both entries return to Idle, nothing handed over).
    """
    assert isinstance(n.alice.signalling, TcpSignalling)
    tap = Tap(n.alice.signalling)
    n.alice.signalling = tap
    n.bob_gate.clear()
    take = asyncio.ensure_future(n.alice.take(nonce))
    while not tap.sent:
        await asyncio.sleep(0.005)
    take.cancel()
    with contextlib.suppress(asyncio.CancelledError, HandoverError):
        await take
    n.bob_gate.set()
    n.alice.signalling = tap.inner
    lock = tap.sent[0]
    assert wire.decode(lock).type is SignalType.LOCK
    for pool in (n.alice, n.bob):
        await settle(pool, pool.get(nonce))
    assert n.alice.get(nonce).state == n.bob.get(nonce).state == "Idle"
    return lock


@pytest.mark.parametrize("mode", ["secrets", "none/legacy", "none/keyed-forged", "none/keyed-replayed"])
def test_a_third_partys_lock_during_a_local_take(mode: str) -> None:
    """bob (the ponger) is taking; alice has not answered yet; mallory's LOCK for the pair reaches bob.

    The tie-break (rule 5) lets the pinger's session win: it must only ever
    yield to the pair's real peer. secrets: mallory is refused
    (UNEXPECTED_PEER) and bob's take completes with alice. none/legacy: her
    LOCK wins the tie-break, bob's take fails PairBusy and mallory gets
    bob's lease. none/keyed-forged: her LOCK does not verify; bob's take
    completes. none/keyed-replayed (a LOCK of alice's recorded earlier):
    it verifies, so bob yields and his take fails PairBusy, but mallory
    cannot make the TAKE: no lease, and the pair returns to Idle (a
    stale LOCK costs one take, never the pair).
    """
    secure = mode == "secrets"
    keyed = "keyed" in mode
    nonce = 0xC2

    async def main() -> None:
        async with net(secure) as n:
            ea, eb = await add_pair(n.alice, n.bob, nonce, KEY if keyed else None)  # alice pings
            recorded = await record_lock(n, nonce) if mode == "none/keyed-replayed" else None
            n.gate.clear()  # alice's server holds bob's session: bob is Locking, his entry InLocking
            take = asyncio.ensure_future(n.bob.take(nonce))
            while not (eb.state == "InLocking" and n.alice_server.stats.open_connections >= 1):
                await asyncio.sleep(0.005)
            mallory = n.as_("mallory", K_MALLORY if secure else None)
            got = await steal(mallory, nonce, lock=recorded, keyed=keyed)
            await mallory.close()
            n.gate.set()
            outcome: object
            try:
                outcome = await take
            except HandoverError as exc:
                outcome = exc
            if isinstance(outcome, natpool.Lease):
                peer_lease = await n.alice.accept()
                outcome.close()
                peer_lease.close()
            await settle(n.bob, eb)
            await settle(n.alice, ea)
            if mode == "none/legacy":
                assert got == ["LOCKED", "TAKEN"] and isinstance(outcome, PairBusy)
                stolen = await n.bob.accept()
                assert stolen.nonce == nonce and n.bob.handover_outcomes["lease"] == 1
                stolen.close()
            elif mode == "none/keyed-replayed":
                # her TAKE is dropped; bob's responder times out (lock_timeout) and aborts
                assert got == ["LOCKED", "ABORT"] and isinstance(outcome, PairBusy)
                assert n.bob.handover_outcomes["lease"] == 0 and (ea.state, eb.state) == ("Idle", "Idle")
                assert n.bob.core.drops[DropReason.BAD_MAC] >= 1  # her TAKE
            else:
                assert isinstance(outcome, natpool.Lease)  # the real peer's session went through
                assert n.bob.handover_outcomes["lease"] == 1 and n.alice.handover_outcomes["lease"] == 1
                want = (["ABORT"], DropReason.UNEXPECTED_PEER) if secure else (["closed"], DropReason.BAD_MAC)
                assert got == want[0] and n.bob.core.drops[want[1]] == 1
            note(f"tie-break/{mode}", f"mallory {got}; bob's take: {type(outcome).__name__}; "
                 f"leases at bob {n.bob.handover_outcomes['lease']}")

    aio_run(main(), BOUND)


@pytest.mark.parametrize("move", ["take", "hang-up"])
@pytest.mark.parametrize("config", ["keyed", "legacy", "legacy+secrets"])
def test_a_busy_session_replayed_later_at_a_pinger_responder(config: str, move: str) -> None:
    """alice's (the ponger's) take ends BUSY; later mallory replays its LOCK to bob, the pinger, over TCP.

    No secrets (the replay comes over an unauthenticated connection, under
    any name). keyed: bob drains and answers LOCKED with a fresh random;
    mallory cannot sign the TAKE, so ``take``: no lease; ``hang-up`` (one
    LOCK, then disconnect): bob's entry goes back to Idle, never Locked
    or expired. legacy: ``take`` yields bob's lease to mallory (the
    documented weakness); ``hang-up`` still leaves the pair Idle (a pinger
    responder stays InLocking until TAKE). legacy+secrets: the replay comes
    over mallory's own authenticated connection and is refused before
    anything is claimed (UNEXPECTED_PEER). Where the pair is left Idle
    alice's next take works.
    """
    nonce = 0xC3
    keyed, secure = config == "keyed", config.endswith("secrets")

    async def main() -> None:
        async with net(secure) as n:
            ea, eb = await add_pair(n.alice, n.bob, nonce, KEY if keyed else None, alice_pings=False)
            # alice's take meets bob's own take (the pinger's session wins): alice gets BUSY
            tap = Tap(n.alice.signalling)  # type: ignore[arg-type]
            n.alice.signalling = tap
            n.gate.clear()
            bobs = asyncio.ensure_future(n.bob.take(nonce))
            while eb.state != "InLocking":
                await asyncio.sleep(0.005)
            with pytest.raises(PairBusy):
                await n.alice.take(nonce)
            bobs.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bobs
            n.gate.set()
            n.alice.signalling = tap.inner
            await settle(n.bob, eb)
            await settle(n.alice, ea)
            assert (ea.state, eb.state) == ("Idle", "Idle")  # read afresh (mypy narrowed them above)
            (lock,) = [d for d in tap.sent if wire.decode(d).type is SignalType.LOCK]
            # later: the replay
            states: list[str] = []
            n.bob.on_event(lambda ev: states.append(ev.target) if isinstance(ev, StateChanged) else None)
            mallory = n.as_("mallory", K_MALLORY) if secure else n.as_("alice")
            got = await steal(mallory, nonce, lock=lock, hang_up_after_lock=move == "hang-up")
            await mallory.close()
            await settle(n.bob, eb)
            if secure:
                assert got == ["ABORT"] and n.bob.core.drops[DropReason.UNEXPECTED_PEER] == 1
                assert states == [] and n.bob.handover_outcomes["lease"] == 0
                note(f"busy-replay/{config}/{move}", f"{got}: refused, nothing claimed")
                return
            if not keyed and move == "take":
                assert got == ["LOCKED", "TAKEN"]
                stolen = await n.bob.accept()
                assert stolen.nonce == nonce
                stolen.close()
                note(f"busy-replay/legacy/{move}", f"{got}: bob's lease went to the replayer")
                return
            assert got == (["LOCKED"] if move == "hang-up" else ["LOCKED", "ABORT"])  # ABORT(TIMEOUT)
            assert n.bob.handover_outcomes["lease"] == 0 and str(eb.state) == "Idle"
            assert "InLocking" in states and "Locked" not in states and "Expired" not in states
            if keyed and move == "take":
                assert n.bob.core.drops[DropReason.BAD_MAC] >= 1
            lease = await n.alice.take(nonce)
            (await n.bob.accept()).close()
            lease.close()
            note(f"busy-replay/{config}/{move}",
                 f"{got}: no lease, bob's entry back to Idle (never Locked or Expired); alice's take then worked")

    aio_run(main(), BOUND)


# === d) abuse: reflection, connection floods, logs ================================================

REFLECT_CFG = PairConfig(ping_interval=0.1, no_inbound_timeout=3.0, ping_lifespan=0.5, lock_timeout=1.0)


@pytest.mark.parametrize("mode", ["keyed", "legacy"])
def test_forged_pings_are_not_reflected_one_to_one(mode: str) -> None:
    """The pinger is dead; from its freed port the attacker fires a burst of forged pings at the ponger.

    legacy: answered within the pong budget only (PONG_BURST at once, then
    PONGS_PER_INTERVAL per ``ping_interval``), the rest RATE_LIMITED.
    keyed: none is answered (BAD_MAC / FORMAT_MISMATCH): no reflection at all.
    """
    from natpool.core.entry import PONG_BURST, PONGS_PER_INTERVAL

    key = KEY if mode == "keyed" else None
    nonce = 0xD1
    burst = 400

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncPairPool("alice", REFLECT_CFG) as alice, AsyncPairPool("bob", REFLECT_CFG) as bob:
            ea, eb = await add_pair(alice, bob, nonce, key)  # alice pings, bob answers
            alice_addr = ea.local.addr
            await alice.remove(nonce)
            attacker = await bind_when_free(alice_addr)
            answered = eb.stats.sent
            began = bob.now()
            forged = [encode(Frame(nonce, Kind.PING))] if key is None else forged_frames(nonce, key, Kind.PING)
            drops = eb.stats.drops
            seen = sum(drops.values()) + eb.stats.received
            for i in range(burst):  # in chunks a socket buffer holds: each one lands
                attacker.sendto(forged[i % len(forged)], eb.local.addr)
                if i % 50 == 49:
                    while sum(drops.values()) + eb.stats.received < seen + i + 1:
                        await asyncio.sleep(0.001)
            elapsed = bob.now() - began
            pongs = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.wait_for(loop.sock_recvfrom(attacker, 2048), 0.05)
                    pongs += 1
            attacker.close()
            reflected = eb.stats.sent - answered
            if key is None:
                budget = PONG_BURST + PONGS_PER_INTERVAL * (elapsed / REFLECT_CFG.ping_interval + 1)
                assert 0 < reflected <= budget and drops[DropReason.RATE_LIMITED] >= burst - budget
            else:
                assert reflected == 0 and drops[DropReason.BAD_MAC] + drops[DropReason.FORMAT_MISMATCH] >= burst
            assert pongs <= reflected
            note(f"reflection/{mode}", f"{reflected} pongs for {burst} forged pings "
                 f"({reflected / burst:.3f} per ping) in {elapsed * 1000:.0f} ms; "
                 f"RATE_LIMITED {drops[DropReason.RATE_LIMITED]}")

    aio_run(main(), BOUND)


@pytest.mark.parametrize("secure", [True, False], ids=["secrets", "no-secrets"])
def test_a_connection_flood_does_not_stop_a_real_take_and_logs_no_warning(
        secure: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Hundreds of connections to bob's server: idle ones, garbage, bad hellos, forged signals; then alice's take.

    With and without secrets the server's caps hold (refused at once,
    counted), the take between the real peers still goes through, and no
    record at WARNING or above is logged: the bad input is at DEBUG, with
    rate-limited INFO summaries (at most one per DROP_SUMMARY_INTERVAL from
    each DropLog).

    The flood comes from another address than alice's: the cap on pending
    hellos is per address, so idle connections from alice's own address
    (her NAT, say) hold her off until ``hello_timeout`` closes them.
    """
    nonce = 0xD2

    async def main() -> None:
        async with net(secure) as n:
            await add_pair(n.alice, n.bob, nonce, KEY)
            address = n.bob_server.address
            idle = []
            flood_from = ("127.0.0.2", 0)  # another host than alice's (a flood from hers: see the note below)
            for payload in (b"\x00\x00\x00\x05hello", b"\xff" * 64, b"\x00\x00\x00\x40" + b"\x01" * 64):
                for _ in range(20):  # garbage and bad hellos, each on its own connection
                    with contextlib.suppress(OSError):
                        reader, writer = await asyncio.open_connection(*address, local_addr=flood_from)
                        writer.write(payload)
                        with contextlib.suppress(ConnectionError, TimeoutError):
                            await asyncio.wait_for(reader.read(), 2.0)
                        writer.close()
            for _ in range(40):  # connections that never say hello
                with contextlib.suppress(OSError):
                    idle.append(await asyncio.open_connection(*address, local_addr=flood_from))
            for _ in range(20):  # forged signals for the keyed pair, from a client that gets through
                mallory = n.as_("mallory", K_MALLORY if secure else None)
                await steal(mallory, nonce, keyed=True)
                await mallory.close()
            stats = n.bob_server.stats
            assert stats.refused_host > 0  # the per-address cap of pending hellos
            assert stats.hellos_refused >= 60 and stats.authenticated + stats.unauthenticated >= 20
            lease = await n.alice.take(nonce)
            (await n.bob.accept()).close()
            lease.close()
            for _, writer in idle:
                writer.close()
            drops = n.bob.core.drops[DropReason.UNEXPECTED_PEER if secure else DropReason.BAD_MAC]
            assert drops == 20
            note(f"tcp-flood/{'secrets' if secure else 'no-secrets'}",
                 f"refused_host {stats.refused_host}, hellos_refused {stats.hellos_refused}, "
                 f"server drops {dict((k.name, v) for k, v in n.bob_server.drops.items())}, "
                 f"20 forged sessions refused; the real take went through")

    with caplog.at_level(logging.DEBUG, logger="natpool"):
        aio_run(main(), BOUND)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "dropped" in r.getMessage()]
    assert len(infos) <= 3  # one first summary per DropLog at most (server, mallory's clients), not one per input
    note(f"tcp-flood-logs/{'secrets' if secure else 'no-secrets'}",
         f"{sum(r.levelno == logging.DEBUG for r in caplog.records)} DEBUG, {len(infos)} INFO summary, 0 WARNING")


@pytest.mark.parametrize("secure", [True, False], ids=["secrets", "no-secrets"])
def test_the_per_peer_caps_can_be_filled_in_a_peers_name_only_without_secrets(secure: bool) -> None:
    """mallory holds connections open to bob's server under alice's name, up to the per-peer cap.

    The per-peer caps count by identity: the verified one with secrets, the
    claimed one without. no-secrets: mallory fills alice's quota and alice's
    own connection is refused. secrets: mallory cannot say hello as alice,
    and alice gets through.
    """
    cap = 3

    async def main() -> None:
        got: list[str | None] = []

        async def handler(ch: IncomingChannel) -> None:
            with contextlib.suppress(ChannelBroken):
                got.append(ch.peer_identity)
                await ch.send(await ch.recv())
                await ch.recv()  # held open until the client closes

        kw: dict[str, Any] = {"identity": "bob", "secrets": SECRETS} if secure else {}
        async with TcpSignallingServer(handler, max_connections_per_peer=cap, **kw) as server:
            squatter = TcpSignalling("alice", {"bob": server.address}, persistent=False,
                                     secrets={"bob": K_MALLORY} if secure else None)
            held = []
            for _ in range(cap):
                with contextlib.suppress(ChannelBroken):
                    ch = await squatter.open("bob")
                    await ch.send(b"x")
                    await ch.recv()
                    held.append(ch)
            alice = TcpSignalling("alice", {"bob": server.address}, persistent=False,
                                  secrets={"bob": K_ALICE} if secure else None)
            real: bytes | None = None
            with contextlib.suppress(ChannelBroken):
                ch = await alice.open("bob")
                await ch.send(b"real")
                real = await ch.recv()
                await ch.close()
            for ch in held:
                await ch.close()
            if secure:
                assert held == [] and real == b"real"
            else:
                assert len(held) == cap and real is None and server.stats.refused_peer == 1
            note(f"per-peer-caps/{'secrets' if secure else 'no-secrets'}",
                 f"{len(held)} connections held in alice's name; alice's own {'got through' if real else 'refused'}")

    aio_run(main(), BOUND)
