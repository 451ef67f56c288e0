"""A peer heard from another address than expected (symmetric NAT, wrong port) is reported as such.

Contract: the entry's own well-formed keepalive frame from another (host,
port) is dropped as ``DropReason.ADDRESS_MISMATCH`` and recorded (first
address, kept) in ``PairEntry.seen_from`` with one WARNING per entry; a later
NO_INBOUND expiry then reads ``ExpiryReason.ADDRESS_MISMATCH``. Anything
else from a foreign address stays ``FOREIGN_ADDRESS`` and changes nothing.
"""

from __future__ import annotations

import logging

import pytest

from natpool.aio.pool import AsyncPairPool
from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason, PairEntry, StateChanged
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason
from natpool.sim import Simulation
from natpool.wire.frame import Frame, Kind, encode
from tests.support.aio import bound_socket
from tests.support.aio import run as aio_run

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
NONCE = 0x4242
PAIR = EndpointPair(ALICE, BOB, NONCE)
CFG = PairConfig()
PING = encode(Frame(NONCE, Kind.PING))
PONG = encode(Frame(NONCE, Kind.PONG))
ELSEWHERE = ("127.0.0.1", 51000)  # bob's frames through a symmetric NAT: same host, another port


def expiry(entry: PairEntry) -> StateChanged:
    changes = []
    while (ev := entry.next_event()) is not None:
        if isinstance(ev, StateChanged) and ev.event == "expire":
            changes.append(ev)
    (change,) = changes
    return change


def test_own_ping_from_another_port_is_an_address_mismatch_not_answered(caplog: pytest.LogCaptureFixture) -> None:
    b = PairEntry(PAIR, "bob", False, CFG, 0.0)  # bob pongs, expects alice at ALICE
    caplog.set_level(logging.DEBUG, logger="natpool.core.entry")
    for i in range(5):
        b.receive_datagram(PING, ELSEWHERE, 0.1 * (i + 1))
    b.receive_datagram(PING, ("10.1.1.1", 7), 0.6)  # a second wrong address: the first one is kept
    assert b.stats.drops == {DropReason.ADDRESS_MISMATCH: 6}
    assert b.seen_from == ELSEWHERE
    assert b.datagrams_to_send(0.6) == []  # never answered at the unexpected address
    assert b.last_seen == 0.0 and b.stats.received == 0  # it does not count as liveness
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # once per entry, however many frames
    assert "51000" in warnings[0].getMessage() and f"{NONCE:#x}" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 6  # every drop at DEBUG, as usual


def test_no_inbound_expiry_after_a_mismatch_reads_address_mismatch() -> None:
    b = PairEntry(PAIR, "bob", False, CFG, 0.0)
    b.receive_datagram(PING, ELSEWHERE, 1.0)
    b.handle_timer(CFG.no_inbound_timeout)
    assert b.state == "Expired"
    change = expiry(b)
    assert change.reason is ExpiryReason.ADDRESS_MISMATCH and change.at == CFG.no_inbound_timeout


def test_the_pinger_sees_its_pongs_from_another_address() -> None:
    a = PairEntry(PAIR, "alice", True, CFG, 0.0)
    a.datagrams_to_send(0.0)
    a.receive_datagram(PONG, ("127.0.0.1", 51001), 0.02)
    assert a.outstanding == 1 and a.srtt is None  # the pong did not answer anything
    assert a.seen_from == ("127.0.0.1", 51001)
    assert a.stats.drops == {DropReason.ADDRESS_MISMATCH: 1}


@pytest.mark.parametrize("data", [b"", b"x" * 100, encode(Frame(NONCE + 1, Kind.PING)), PING[:8] + b"\x07"],
                         ids=["empty", "junk", "other-nonce", "bad-kind"])
def test_anything_else_from_elsewhere_stays_foreign_and_expiry_stays_no_inbound(
        data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    b = PairEntry(PAIR, "bob", False, CFG, 0.0)
    caplog.set_level(logging.DEBUG, logger="natpool.core.entry")
    b.receive_datagram(data, ELSEWHERE, 1.0)
    assert b.stats.drops == {DropReason.FOREIGN_ADDRESS: 1}
    assert b.seen_from is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    b.handle_timer(CFG.no_inbound_timeout)
    assert expiry(b).reason is ExpiryReason.NO_INBOUND


def test_other_expiry_reasons_are_kept() -> None:
    b = PairEntry(PAIR, "bob", False, CFG, 0.0)
    b.receive_datagram(PING, ELSEWHERE, 1.0)
    b.expire(ExpiryReason.CLOSED, 2.0)
    assert expiry(b).reason is ExpiryReason.CLOSED


def test_frames_from_the_expected_address_still_keep_the_pair_alive() -> None:
    """A stray mismatched frame does not break a working pair; the record stays for diagnosis."""
    b = PairEntry(PAIR, "bob", False, CFG, 0.0)
    b.receive_datagram(PING, ELSEWHERE, 0.5)
    b.receive_datagram(PING, ALICE.addr, 1.0)
    assert b.datagrams_to_send(1.0) == [(PONG, ALICE.addr)]
    assert b.last_seen == 1.0 and b.state == "Idle" and b.seen_from == ELSEWHERE


def test_symmetric_nat_in_the_simulator_is_reported_on_the_side_that_hears_the_peer() -> None:
    """Bob (the pinger) sends from the port he really has; alice was told another one (what STUN saw).

    Alice's pongs go to the advertised port, which nobody has bound, so bob
    hears nothing and expires plainly NO_INBOUND; alice heard bob all along,
    from the wrong port, and says so.
    """
    sim = Simulation(3)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonce = sim.new_nonce()
    ea, eb = a.endpoint(), b.endpoint()
    advertised = Endpoint("bob", eb.host, eb.port + 1000)
    a.add(EndpointPair(ea, advertised, nonce), is_pinger=False)
    b.add(EndpointPair(ea, eb, nonce), is_pinger=True)
    sim.run_until(CFG.no_inbound_timeout + 2.0)
    assert a.expiries() == {nonce: ExpiryReason.ADDRESS_MISMATCH}
    assert b.expiries() == {nonce: ExpiryReason.NO_INBOUND}
    pings = len(sim.sent_by("bob"))
    assert a.pool.drops == {DropReason.ADDRESS_MISMATCH: pings}
    assert not sim.sent_by("alice")  # alice never answered the unexpected address
    (change,) = a.transitions("expire")
    assert change.reason is ExpiryReason.ADDRESS_MISMATCH


def test_the_asyncio_snapshot_shows_where_the_peer_was_seen() -> None:
    async def main() -> None:
        cfg = PairConfig(ping_interval=0.01, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)
        sa, sb = bound_socket(), bound_socket()
        wrong_port = sb.getsockname()[1] + 1 if sb.getsockname()[1] < 65535 else sb.getsockname()[1] - 1
        pair = EndpointPair(Endpoint("alice", "127.0.0.1", sa.getsockname()[1]),
                            Endpoint("bob", "127.0.0.1", wrong_port), 61)
        async with AsyncPairPool("alice", cfg) as alice:
            await alice.add(pair, is_pinger=False, sock=sa)
            sb.sendto(encode(Frame(61, Kind.PING)), sa.getsockname())  # bob, from his real port
            while alice.snapshot(61).seen_from is None:
                await alice.wait_changed()
            snap = alice.snapshot(61)
            assert snap.seen_from == ("127.0.0.1", sb.getsockname()[1])
            assert snap.drops == {DropReason.ADDRESS_MISMATCH.value: 1}
            assert alice.core.drops[DropReason.ADDRESS_MISMATCH] == 1
        sb.close()

    aio_run(main(), 10.0)
