"""Keyed keepalives at the entry: only MAC-valid, fresh frames count (issue 10 items 1, 2, 5).

What an attacker who knows the nonce (it is in clear in every frame) and has
recorded every frame can do to a keyed entry: nothing that refreshes
``last_seen``, ends a drain or gets answered. Each refusal is counted under
its ``DropReason``; a peer with another key or without one is reported as
KEY_MISMATCH / FORMAT_MISMATCH instead of a plain NO_INBOUND.
"""

from __future__ import annotations

import pytest

from natpool.config import PairConfig
from natpool.core.entry import PONG_BURST, PONGS_PER_INTERVAL, Drained, ExpiryReason, PairEntry, StateChanged
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, InvalidKey
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.keepalive import KEYED_FRAME_SIZE, KeepaliveKey

ALICE = Endpoint("alice", "127.0.0.1", 41001)
BOB = Endpoint("bob", "127.0.0.1", 41002)
NONCE = 0x5151
PAIR = EndpointPair(ALICE, BOB, NONCE)
CFG = PairConfig()
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def pinger(key: bytes | None = KEY, cfg: PairConfig = CFG) -> PairEntry:
    return PairEntry(PAIR, "alice", True, cfg, 0.0, key=key)


def ponger(key: bytes | None = KEY, cfg: PairConfig = CFG) -> PairEntry:
    return PairEntry(PAIR, "bob", False, cfg, 0.0, key=key)


def sent(entry: PairEntry, now: float) -> list[bytes]:
    out = entry.datagrams_to_send(now)
    assert all(addr == entry.remote.addr for _, addr in out)
    return [data for data, _ in out]


def expiries(entry: PairEntry) -> list[ExpiryReason | None]:
    out = []
    while (ev := entry.next_event()) is not None:
        if isinstance(ev, StateChanged) and ev.event == "expire":
            out.append(ev.reason)
    return out


def drained(entry: PairEntry) -> bool:
    seen = False
    while (ev := entry.next_event()) is not None:
        seen = seen or isinstance(ev, Drained)
    return seen


# --- the key argument --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"", b"x" * 15, b"x" * 65, "x" * 32, bytearray(32)],
                         ids=["empty", "15-bytes", "65-bytes", "str", "bytearray"])
def test_a_bad_key_raises_invalid_key_and_the_pool_is_unchanged(key: object) -> None:
    with pytest.raises(InvalidKey):
        PairEntry(PAIR, "alice", True, CFG, 0.0, key=key)  # type: ignore[arg-type]
    pool = PairPool("alice", CFG)
    with pytest.raises(InvalidKey):
        pool.add(PAIR, True, 0.0, key=key)  # type: ignore[arg-type]
    assert len(pool) == 0 and NONCE not in pool
    assert pool.add(PAIR, True, 0.0, key=b"y" * 16).key == b"y" * 16  # the boundary sizes are fine
    assert PairEntry(PAIR, "bob", False, CFG, 0.0, key=b"y" * 64).key == b"y" * 64


def test_without_a_key_the_legacy_9_byte_frame_stays() -> None:
    a, b = pinger(None), ponger(None)
    assert a.key is None
    (ping,) = sent(a, 0.0)
    assert ping == encode(Frame(NONCE, Kind.PING))
    b.receive_datagram(ping, ALICE.addr, 0.01)
    assert sent(b, 0.01) == [encode(Frame(NONCE, Kind.PONG))]


# --- the honest exchange -----------------------------------------------------------------------


def test_keyed_exchange_refreshes_both_sides_with_34_byte_frames() -> None:
    a, b = pinger(), ponger()
    (ping,) = sent(a, 0.0)
    assert len(ping) == KEYED_FRAME_SIZE
    b.receive_datagram(ping, ALICE.addr, 0.02)
    (pong,) = sent(b, 0.02)
    assert KeepaliveKey(KEY).open(pong, NONCE) == (False, 1)  # answers ping id 1
    a.receive_datagram(pong, BOB.addr, 0.04)
    assert a.last_seen == 0.04 and b.last_seen == 0.02
    assert a.srtt == pytest.approx(0.04) and a.outstanding == 0
    assert a.stats.drops == {} and b.stats.drops == {}
    a.handle_timer(1.0)
    (ping2,) = sent(a, 1.0)
    assert KeepaliveKey(KEY).open(ping2, NONCE) == (True, 2)  # ids are monotonic per entry


# --- forged and replayed pongs at the pinger ---------------------------------------------------


def test_forged_and_replayed_pongs_neither_refresh_last_seen_nor_count() -> None:
    a, b = pinger(), ponger()
    (ping,) = sent(a, 0.0)
    b.receive_datagram(ping, ALICE.addr, 0.01)
    (pong,) = sent(b, 0.01)
    a.receive_datagram(pong, BOB.addr, 0.02)
    assert a.last_seen == 0.02
    a.handle_timer(1.0)
    sent(a, 1.0)  # ping 2 outstanding
    forged = [
        pong,  # replay of the answer to ping 1
        encode(Frame(NONCE, Kind.PONG)),  # the legacy pong anybody can make
        KeepaliveKey(OTHER_KEY).pong(NONCE, 2),  # right id, wrong key
        pong[:-1] + bytes([pong[-1] ^ 1]),  # damaged MAC
        pong[:17] + b"\x02" + pong[18:],  # the id of ping 2 pasted into the old pong
    ]
    for i, data in enumerate(forged):
        a.receive_datagram(data, BOB.addr, 1.1 + 0.01 * i)
    assert a.last_seen == 0.02 and a.stats.received == 1 and a.outstanding == 1
    assert a.stats.drops == {DropReason.REPLAY: 1, DropReason.FORMAT_MISMATCH: 1, DropReason.BAD_MAC: 3}


def test_each_pong_id_is_accepted_once() -> None:
    a, b = pinger(), ponger()
    b.receive_datagram(sent(a, 0.0)[0], ALICE.addr, 0.01)
    (pong,) = sent(b, 0.01)
    a.receive_datagram(pong, BOB.addr, 0.02)
    a.receive_datagram(pong, BOB.addr, 0.03)
    assert a.stats.received == 1 and a.stats.drops == {DropReason.REPLAY: 1} and a.last_seen == 0.02


def test_a_late_pong_after_its_ping_timed_out_is_refused_as_not_outstanding() -> None:
    a, b = pinger(), ponger()
    b.receive_datagram(sent(a, 0.0)[0], ALICE.addr, 0.01)
    (pong,) = sent(b, 0.01)
    a.handle_timer(CFG.ping_lifespan)  # ping 1 given up (and ping 2 queued)
    assert a.stats.ping_timeouts == 1
    a.receive_datagram(pong, BOB.addr, CFG.ping_lifespan + 0.1)
    assert a.stats.drops == {DropReason.REPLAY: 1} and a.last_seen == 0.0


def test_pongs_out_of_order_each_answer_their_own_ping() -> None:
    cfg = PairConfig(ping_interval=1.0, ping_lifespan=3.0)  # two pings outstanding at once
    a, b = pinger(cfg=cfg), ponger(cfg=cfg)
    b.receive_datagram(sent(a, 0.0)[0], ALICE.addr, 0.1)
    (pong1,) = sent(b, 0.1)
    a.handle_timer(1.0)
    b.receive_datagram(sent(a, 1.0)[0], ALICE.addr, 1.1)
    (pong2,) = sent(b, 1.1)
    assert a.outstanding == 2
    a.receive_datagram(pong2, BOB.addr, 1.2)  # the newer answer first
    assert a.outstanding == 1 and a.srtt == pytest.approx(0.2)
    a.receive_datagram(pong1, BOB.addr, 1.3)
    assert a.outstanding == 0 and a.stats.received == 2
    for data in (pong1, pong2):
        a.receive_datagram(data, BOB.addr, 1.4)
    assert a.stats.drops == {DropReason.REPLAY: 2}
    a.handle_timer(4.0)  # nothing left to time out: the answered slot is not a timeout
    assert a.stats.ping_timeouts == 0


def test_an_out_of_order_answer_is_skipped_not_timed_out_when_the_older_ping_expires() -> None:
    cfg = PairConfig(ping_interval=1.0, ping_lifespan=3.0)
    a, b = pinger(cfg=cfg), ponger(cfg=cfg)
    sent(a, 0.0)  # ping 1: lost
    a.handle_timer(1.0)
    b.receive_datagram(sent(a, 1.0)[0], ALICE.addr, 1.1)
    a.receive_datagram(sent(b, 1.1)[0], BOB.addr, 1.2)  # ping 2 answered, ping 1 still outstanding
    assert a.outstanding == 1
    a.handle_timer(3.0)
    assert a.stats.ping_timeouts == 1 and a.outstanding == 1  # ping 1 timed out, ping 3 (sent at 2.0) is left


# --- the drain ---------------------------------------------------------------------------------


def test_forged_or_replayed_pongs_do_not_end_a_drain_the_real_one_does() -> None:
    a, b = pinger(), ponger()
    b.receive_datagram(sent(a, 0.0)[0], ALICE.addr, 0.01)
    (old_pong,) = sent(b, 0.01)
    a.receive_datagram(old_pong, BOB.addr, 0.02)
    a.handle_timer(1.0)
    (ping2,) = sent(a, 1.0)
    assert a.begin_lock(1.01) and not drained(a)  # ping 2 outstanding: the drain waits for it
    for data in (old_pong, encode(Frame(NONCE, Kind.PONG)), KeepaliveKey(OTHER_KEY).pong(NONCE, 2)):
        a.receive_datagram(data, BOB.addr, 1.02)
    assert not drained(a) and a.outstanding == 1 and not a.finish_lock(1.02)
    b.receive_datagram(ping2, ALICE.addr, 1.03)
    a.receive_datagram(sent(b, 1.03)[0], BOB.addr, 1.04)
    assert drained(a) and a.finish_lock(1.04)


# --- pings at the ponger -----------------------------------------------------------------------


def test_replayed_and_forged_pings_are_not_answered_and_do_not_refresh() -> None:
    a, b = pinger(), ponger()
    (ping1,) = sent(a, 0.0)
    b.receive_datagram(ping1, ALICE.addr, 0.01)
    assert len(sent(b, 0.01)) == 1
    for data in (ping1, encode(Frame(NONCE, Kind.PING)), KeepaliveKey(OTHER_KEY).ping(NONCE, 2)):
        b.receive_datagram(data, ALICE.addr, 5.0)
    assert sent(b, 5.0) == [] and b.last_seen == 0.01 and b.stats.received == 1
    assert b.stats.drops == {DropReason.REPLAY: 1, DropReason.FORMAT_MISMATCH: 1, DropReason.BAD_MAC: 1}


def test_a_reordered_ping_inside_the_window_is_answered_once() -> None:
    b = ponger()
    ka = KeepaliveKey(KEY)
    for i in (1, 3, 2, 2, 3):
        b.receive_datagram(ka.ping(NONCE, i), ALICE.addr, 0.1 * i)
    answered = [KeepaliveKey(KEY).open(d, NONCE)[1] for d in sent(b, 0.5)]
    assert answered == [1, 3, 2]
    assert b.stats.drops == {DropReason.REPLAY: 2}
    b.receive_datagram(ka.ping(NONCE, 200), ALICE.addr, 1.0)
    b.receive_datagram(ka.ping(NONCE, 100), ALICE.addr, 1.1)  # older than the 64-id window: refused
    assert b.stats.drops[DropReason.REPLAY] == 3


# --- mismatches are reported as such ----------------------------------------------------------


def run_pair(a: PairEntry, b: PairEntry, until: float) -> None:
    """Both entries exchange frames (lossless, instant) until ``until`` or both expire."""
    t = 0.0
    while t <= until:
        for src, dst, addr in ((a, b, ALICE.addr), (b, a, BOB.addr)):
            src.handle_timer(t)
            for data in sent(src, t):
                dst.receive_datagram(data, addr, t)
        t = round(t + 0.25, 6)


@pytest.mark.parametrize(("key_a", "key_b", "reason", "drop"), [
    (KEY, OTHER_KEY, ExpiryReason.KEY_MISMATCH, DropReason.BAD_MAC),
    (KEY, None, ExpiryReason.FORMAT_MISMATCH, DropReason.FORMAT_MISMATCH),
    (None, KEY, ExpiryReason.FORMAT_MISMATCH, DropReason.FORMAT_MISMATCH),
], ids=["other-key", "pinger-keyed-only", "ponger-keyed-only"])
def test_a_peer_with_another_key_or_format_expires_as_a_mismatch_not_no_inbound(
        key_a: bytes | None, key_b: bytes | None, reason: ExpiryReason, drop: DropReason) -> None:
    a, b = pinger(key_a), ponger(key_b)
    run_pair(a, b, CFG.no_inbound_timeout + 1.0)
    assert a.state == b.state == "Expired"
    # The ponger reports the mismatch: it got this pair's frames from the peer's address and could not trust them.
    assert b.stats.drops == {drop: b.stats.drops[drop]} and b.stats.drops[drop] > 0 and b.stats.received == 0
    assert expiries(b) == [reason]
    # The pinger hears nothing at all (nothing it cannot authenticate is answered): a plain NO_INBOUND.
    assert a.stats.received == 0 and a.stats.drops == {}
    assert expiries(a) == [ExpiryReason.NO_INBOUND]


def test_a_mismatch_before_the_last_valid_frame_does_not_change_the_reason() -> None:
    b = ponger()
    b.receive_datagram(KeepaliveKey(OTHER_KEY).ping(NONCE, 1), ALICE.addr, 0.5)  # one stray forgery
    b.receive_datagram(KeepaliveKey(KEY).ping(NONCE, 1), ALICE.addr, 1.0)  # then the real peer, then silence
    b.handle_timer(1.0 + CFG.no_inbound_timeout)
    assert expiries(b) == [ExpiryReason.NO_INBOUND]


# --- rate limit --------------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True], ids=["legacy", "keyed"])
def test_a_ping_flood_is_answered_at_most_at_the_pong_rate(keyed: bool) -> None:
    b = ponger(KEY if keyed else None)
    ka = KeepaliveKey(KEY)
    answered = 0
    flood = 1000
    for i in range(flood):  # 1000 pings within one second, drained after each like the aio driver
        now = i / flood
        data = ka.ping(NONCE, i + 1) if keyed else encode(Frame(NONCE, Kind.PING))
        b.receive_datagram(data, ALICE.addr, now)
        answered += len(sent(b, now))
    limit = PONG_BURST + PONGS_PER_INTERVAL * 1.0 / CFG.ping_interval
    assert PONGS_PER_INTERVAL <= answered <= limit
    assert b.stats.drops == {DropReason.RATE_LIMITED: flood - answered}
    assert b.stats.received == answered


# --- own-frame recognition (the driver's check at a handed-over socket) ------------------------


def test_is_own_frame_needs_a_valid_mac_when_keyed() -> None:
    keyed, legacy = ponger(), ponger(None)
    ka = KeepaliveKey(KEY)
    assert keyed.is_own_frame(ka.ping(NONCE, 9)) and keyed.is_own_frame(ka.pong(NONCE, 1))
    assert not keyed.is_own_frame(KeepaliveKey(OTHER_KEY).ping(NONCE, 9))
    assert not keyed.is_own_frame(encode(Frame(NONCE, Kind.PING)))
    assert not keyed.is_own_frame(ka.ping(NONCE + 1, 9))
    assert legacy.is_own_frame(encode(Frame(NONCE, Kind.PONG)))
    assert not legacy.is_own_frame(encode(Frame(NONCE + 1, Kind.PONG))) and not legacy.is_own_frame(b"hello")


def test_only_a_mac_valid_frame_from_elsewhere_is_an_address_mismatch() -> None:
    b = ponger()
    b.receive_datagram(KeepaliveKey(OTHER_KEY).ping(NONCE, 1), ("10.0.0.9", 9), 0.1)
    assert b.stats.drops == {DropReason.FOREIGN_ADDRESS: 1} and b.seen_from is None
    b.receive_datagram(KeepaliveKey(KEY).ping(NONCE, 1), ("10.0.0.9", 9), 0.2)
    assert b.stats.drops[DropReason.ADDRESS_MISMATCH] == 1 and b.seen_from == ("10.0.0.9", 9)
