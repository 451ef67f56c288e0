"""Keyed keepalives on loopback, forged from the peer's exact address (issue 10 item 7).

The attacker knows the nonce (it is in every frame) and replays what it
recorded. Without root it binds the dead peer's freed port, so its datagrams
come from the very (host, port) the entry expects; as root it also spoofs the
live peer's address through a raw socket. With keys nothing it sends counts:
the pair whose peer is gone expires (KEY_MISMATCH, as forged frames kept
coming), a drain is ended only by the real pong or the ping's timeout, and
every frame the entry counted as inbound is one the real peer sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

import pytest

import natpool
from natpool.aio.pool import AsyncPairPool
from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason, PairEntry
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, InvalidKey
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.keepalive import KeepaliveKey
from tests.support.aio import bind_when_free, bound_socket, wait_for
from tests.support.aio import run as aio_run

KEY = bytes(range(7, 39))
# Fast pings, but a no-inbound window far above a loaded CI box's scheduling hiccups.
CFG = PairConfig(ping_interval=0.05, no_inbound_timeout=2.0, ping_lifespan=0.25, lock_timeout=1.0)
Addr = tuple[str, int]


class Recorder:
    """Plays the eavesdropper: every frame alice's pool received (a wire observer), to replay."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def __call__(self, direction: str, nonce: int, data: bytes, addr: Addr, state: str) -> None:
        if direction == "recv":
            self.frames.append(data)


def forgeries(nonce: int, recorded: list[bytes], echo: bytes | None = None) -> list[bytes]:
    """What the attacker can make without the key: legacy frames, other keys, made-up MACs, replays."""
    out = [encode(Frame(nonce, Kind.PONG)), encode(Frame(nonce, Kind.PING)),
           KeepaliveKey(b"guessed key, wrong").pong(nonce, 1)]
    if echo is not None and len(echo) == 34:  # the victim's own ping, reflected, and turned into a pong
        out += [echo, echo[:1] + b"\x01" + echo[2:]]
        ping_id = int.from_bytes(echo[10:18], "big")
        out.append(KeepaliveKey(b"guessed key, wrong").pong(nonce, ping_id))
    out += recorded[-10:]
    return out


async def keyed_pair(alice: AsyncPairPool, bob: AsyncPairPool, nonce: int,
                     key: bytes | None = KEY) -> tuple[PairEntry, PairEntry, socket.socket]:
    sa, sb = bound_socket(), bound_socket()
    port_b = sb.getsockname()[1]
    pair = EndpointPair(Endpoint("alice", "127.0.0.1", sa.getsockname()[1]), Endpoint("bob", "127.0.0.1", port_b),
                        nonce)
    ea = await alice.add(pair, is_pinger=True, sock=sa, key=key)
    eb = await bob.add(pair, is_pinger=False, sock=sb, key=key)
    return ea, eb, sa


async def answer_every_ping(sock: socket.socket, nonce: int, recorded: Recorder, stop: asyncio.Event) -> int:
    """At the dead peer's port: answer each of alice's pings with every forgery, and keep blasting between."""
    loop = asyncio.get_running_loop()
    sent = 0
    last_ping: bytes | None = None
    target: Addr | None = None
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            last_ping, target = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), 0.02)
        if last_ping is None or target is None:
            continue
        for frame in forgeries(nonce, recorded.frames, last_ping):
            with contextlib.suppress(OSError):
                sock.sendto(frame, target)
                sent += 1
    return sent


def test_bad_keys_are_refused_by_the_asyncio_add_before_any_socket_is_kept() -> None:
    async def main() -> None:
        async with AsyncPairPool("alice", CFG) as alice:
            sa = bound_socket()
            pair = EndpointPair(Endpoint("alice", "127.0.0.1", sa.getsockname()[1]),
                                Endpoint("bob", "127.0.0.1", 9), 3)
            with pytest.raises(InvalidKey):
                await alice.add(pair, True, sock=sa, key=b"short")
            assert sa.fileno() == -1 and len(alice) == 0  # add owns the socket: closed on any error

    aio_run(main(), 10.0)


def test_keyed_pair_keeps_alive_over_loopback_with_34_byte_frames() -> None:
    async def main() -> None:
        rec = Recorder()
        async with AsyncPairPool("alice", CFG, wire_observer=rec) as alice, AsyncPairPool("bob", CFG) as bob:
            ea, eb, _ = await keyed_pair(alice, bob, 0x71)
            await wait_for(alice, lambda: ea.stats.received >= 5)
            assert rec.frames and all(len(f) == 34 for f in rec.frames)
            assert ea.stats.drops == {} and eb.stats.drops == {}
            assert ea.state == eb.state == "Idle"

    aio_run(main(), 20.0)


def test_with_keys_a_dead_peers_port_taken_over_by_an_attacker_does_not_keep_the_pair_alive() -> None:
    async def main() -> None:
        rec = Recorder()
        async with AsyncPairPool("alice", CFG, wire_observer=rec) as alice, AsyncPairPool("bob", CFG) as bob:
            ea, eb, _ = await keyed_pair(alice, bob, 0x72)
            await wait_for(alice, lambda: ea.stats.received >= 3)
            bob_addr = eb.local.addr
            await bob.remove(0x72)  # bob dies; his port is free
            attacker = await bind_when_free(bob_addr)
            stop = asyncio.Event()
            task = asyncio.create_task(answer_every_ping(attacker, 0x72, rec, stop))
            expired = asyncio.Event()
            reasons: list[ExpiryReason | None] = []

            def on_event(ev: object) -> None:
                if getattr(ev, "event", None) == "expire" and getattr(ev, "nonce", None) == 0x72:
                    reasons.append(getattr(ev, "reason", None))
                    expired.set()

            alice.on_event(on_event)
            real = ea.stats.received
            await expired.wait()  # bounded by aio_run: it must come
            stop.set()
            sent: int = await task
            attacker.close()
            assert sent > 0
            assert reasons == [ExpiryReason.KEY_MISMATCH]  # forged frames kept coming, none authentic
            drops = alice.core.drops
            assert drops[DropReason.BAD_MAC] > 0 and drops[DropReason.FORMAT_MISMATCH] > 0
            assert drops[DropReason.REPLAY] + drops[DropReason.UNEXPECTED] > 0
            # At most the real pongs already in flight when bob died counted, nothing the attacker sent.
            assert ea.stats.received <= real + CFG.ping_lifespan / CFG.ping_interval + 1

    aio_run(main(), 30.0)


def test_with_keys_forged_pongs_from_the_dead_peers_port_do_not_end_a_drain() -> None:
    async def main() -> None:
        rec = Recorder()
        async with AsyncPairPool("alice", CFG, wire_observer=rec) as alice, AsyncPairPool("bob", CFG) as bob:
            ea, eb, _ = await keyed_pair(alice, bob, 0x73)
            await wait_for(alice, lambda: ea.stats.received >= 3)
            bob_addr = eb.local.addr
            await bob.remove(0x73)
            attacker = await bind_when_free(bob_addr)
            stop = asyncio.Event()
            task = asyncio.create_task(answer_every_ping(attacker, 0x73, rec, stop))
            # Claim once a ping is outstanding that nobody real will answer.
            await wait_for(alice, lambda: ea.outstanding >= 1 and alice.core.drops[DropReason.BAD_MAC] > 0)
            received, timeouts = ea.stats.received, ea.stats.ping_timeouts
            alice.core.claim(0x73, alice.now())
            alice.kick()
            outstanding = ea.outstanding
            bad_before = alice.core.drops[DropReason.BAD_MAC]
            await wait_for(alice, lambda: ea.drained)
            stop.set()
            await task
            attacker.close()
            assert outstanding >= 1
            # The drain ended by the pings' timeouts only: no forged pong counted.
            assert ea.stats.received == received
            assert ea.stats.ping_timeouts - timeouts >= outstanding
            assert alice.core.drops[DropReason.BAD_MAC] > bad_before  # forgeries did arrive while draining

    aio_run(main(), 30.0)


# --- raw-socket spoofing of a live peer (root only) -------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def spoofed_udp(src: Addr, dst: Addr, payload: bytes) -> bytes:
    """An IPv4 + UDP datagram from ``src`` (a raw socket with IP_HDRINCL sends it as is)."""
    udp_len = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + struct.pack("!HHHH", src[1], dst[1], udp_len, 0) + payload  # UDP checksum 0: none (IPv4)


def raw_socket_or_skip() -> socket.socket:
    if os.geteuid() != 0:
        pytest.skip("spoofing a live peer's address needs a raw socket: run as root")
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError as exc:
        pytest.skip(f"raw sockets are not permitted here (no CAP_NET_RAW): {exc}")
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    return s


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "legacy"])
def test_raw_socket_spoofing_of_a_live_peer_counts_nothing_with_keys(key: bytes | None) -> None:
    """Both ends alive; the attacker floods each with frames "from" the other (spoofed source address)."""
    raw = raw_socket_or_skip()

    async def main() -> None:
        rec = Recorder()
        async with AsyncPairPool("alice", CFG, wire_observer=rec) as alice, AsyncPairPool("bob", CFG) as bob:
            ea, eb, _ = await keyed_pair(alice, bob, 0x74, key)
            await wait_for(alice, lambda: ea.stats.received >= 2)
            alice_addr, bob_addr = ea.local.addr, eb.local.addr
            for _ in range(50):
                for frame in forgeries(0x74, rec.frames):
                    raw.sendto(spoofed_udp(bob_addr, alice_addr, frame), (alice_addr[0], 0))
                    raw.sendto(spoofed_udp(alice_addr, bob_addr, frame), (bob_addr[0], 0))
                await asyncio.sleep(0.002)
            await wait_for(bob, lambda: sum(eb.stats.drops.values()) >= 50)  # the flood has landed
            if key is None:
                # Legacy: bob takes forged pings for alice's and answers them (rate-limited, not 1:1).
                assert eb.stats.received > ea.stats.sent
                assert eb.stats.drops[DropReason.RATE_LIMITED] > 0
            else:
                # Keyed: every frame either end counted is one the other really sent.
                assert ea.stats.received <= eb.stats.sent and eb.stats.received <= ea.stats.sent
                for entry in (ea, eb):
                    assert entry.stats.drops[DropReason.BAD_MAC] > 0
                    assert entry.stats.drops[DropReason.FORMAT_MISMATCH] > 0
                assert ea.stats.drops[DropReason.REPLAY] + eb.stats.drops[DropReason.REPLAY] > 0
            assert ea.state == eb.state == "Idle"

    try:
        aio_run(main(), 30.0)
    finally:
        raw.close()


# --- a handed-over socket: only the pair's own MAC-valid keepalive is the pool's -------------


def test_at_a_locked_entry_only_a_mac_valid_keepalive_is_kept_from_the_application() -> None:
    """The driver's own-frame check (aio/pool.py) on a keyed pair: a forged keyed frame is application data."""
    from tests.aio.test_lease import NINE, Collect, nodes

    async def main() -> None:
        nonce = 0x75
        arrived = asyncio.Event()
        stray = KeepaliveKey(KEY).pong(nonce, 1)  # a real late keepalive of this pair
        forged = KeepaliveKey(b"guessed key, wrong").pong(nonce, 1)  # the right shape, and the public nonce

        def observe(direction: str, n: int, data: bytes, addr: Addr, state: str) -> None:
            if direction == "recv" and n == nonce and state == "Locked" and data == NINE:
                arrived.set()

        bob_leases: list[natpool.Lease] = []

        def bob_got_lease(lease: natpool.Lease) -> None:
            assert lease.transport is not None
            for data in (stray, forged, NINE):
                lease.transport.sendto(data, lease.remote_addr)
            bob_leases.append(lease)

        async with nodes(on_lease=bob_got_lease, wire_observer=observe) as (alice, bob, gate):
            sa, sb = bound_socket(), bound_socket()
            pair = EndpointPair(Endpoint("alice", *sa.getsockname()), Endpoint("bob", *sb.getsockname()), nonce)
            ea = await alice.add(pair, is_pinger=True, sock=sa, key=KEY)
            await bob.add(pair, is_pinger=False, sock=sb, key=KEY)
            await wait_for(alice, lambda: ea.stats.received >= 2)
            gate.clear()  # alice stays Locked while bob's lease talks
            take = asyncio.ensure_future(alice.take(nonce))
            await arrived.wait()
            gate.set()
            lease = await take
            app = Collect()
            lease.set_protocol(app)
            assert app.got == [(forged, pair.b.addr), (NINE, pair.b.addr)]
            assert lease.entry.stats.drops[DropReason.SILENT_STATE] == 1  # the real one, dropped by the pool
            lease.close()
            for other in bob_leases:
                other.close()

    aio_run(main(), 20.0)
