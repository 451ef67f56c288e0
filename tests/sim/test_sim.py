"""The simulator driving real pools: determinism, keepalive, partitions, silence after locking.

Everything runs on virtual time; assertions about timing are about
*virtual* instants the protocol defines, never about wall-clock speed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason, PairEntry
from natpool.errors import DropReason
from natpool.sim import INJECTED, NetConfig, SentDatagram, SimNode, Simulation, bench_ratio
from natpool.wire.frame import Frame, Kind, encode

CFG = PairConfig()
SILENT = {"Locked", "InUse", "Expired"}


def two_nodes(seed: int = 1, net: NetConfig | None = None, pairs: int = 1) -> tuple[Simulation, SimNode, SimNode]:
    sim = Simulation(seed, net)
    a = sim.add_node("alice")
    b = sim.add_node("bob")
    for _ in range(pairs):
        sim.punch(a, b)
    return sim, a, b


def go_silent(node: SimNode, nonce: int) -> float:
    """Claim, drain and hand ``nonce`` to the application (InUse) as a session would; returns the lock time."""
    entry = node.claim(nonce)
    sim = node.sim
    assert isinstance(sim, Simulation)  # a node only knows its host through the World protocol
    assert sim.run_until(lambda: entry.drained, timeout=CFG.lock_timeout)
    now = sim.now()
    with node.pool.lock:
        assert entry.finish_lock(now)
        assert entry.use(now)
    node.pump()
    assert entry.state == "InUse"
    return now


def last_inbound(sim: Simulation, node: SimNode, nonce: int) -> float:
    return max(d.time for d in sim.deliveries if d.receiver == node.identity and d.nonce == nonce)


def fingerprint(sim: Simulation) -> list[SentDatagram]:
    return list(sim.log)


# --- determinism ---------------------------------------------------------------------

LOSSY = NetConfig(loss=0.3, duplicate=0.1, delay_min=0.005, delay_max=0.2)


def lossy_run(seed: int, seconds: float = 120.0, pairs: int = 5) -> tuple[list[SentDatagram], list[object]]:
    sim, a, b = two_nodes(seed, LOSSY, pairs)
    sim.run_until(seconds)
    return fingerprint(sim), [*a.events, *b.events]


def test_same_seed_gives_identical_log_and_events() -> None:
    log1, ev1 = lossy_run(42)
    log2, ev2 = lossy_run(42)
    assert log1 == log2 and ev1 == ev2
    assert len(log1) > 100


def test_different_seed_gives_different_log_under_loss() -> None:
    log1, _ = lossy_run(42)
    log2, _ = lossy_run(43)
    assert log1 != log2


@settings(max_examples=15)
@given(seed=st.integers(0, 2**63))
def test_determinism_for_any_seed(seed: int) -> None:
    assert lossy_run(seed, seconds=40.0, pairs=2) == lossy_run(seed, seconds=40.0, pairs=2)


# --- keepalive ------------------------------------------------------------------------------


def test_ten_virtual_minutes_of_keepalive_keep_everything_idle() -> None:
    sim, a, b = two_nodes(pairs=20)
    sim.run_until(600.0)
    for node in (a, b):
        assert len(node.pool) == 20
        assert {e.state for e in node.pool.entries()} == {"Idle"}
        assert node.expiries() == {}
        # last_seen was refreshed by the latest exchange, not left at creation time
        assert all(e.last_seen > 600.0 - CFG.ping_interval for e in node.pool.entries())
    pings = [d for d in sim.log if d.kind == "ping"]
    pongs = [d for d in sim.log if d.kind == "pong"]
    assert {d.sender for d in pings} == {"alice"} and {d.sender for d in pongs} == {"bob"}
    # one ping per interval per pair, each answered (the one sent at t=600 is still in flight)
    assert len(pings) == 20 * (int(600.0 / CFG.ping_interval) + 1)
    assert len(pongs) == len(pings) - 20
    assert sim.network.stats.lost == sim.unowned == 0
    assert a.pool.drops == b.pool.drops == {}


def test_duplicated_pongs_are_dropped_as_unexpected_and_pairs_survive() -> None:
    sim, a, b = two_nodes(net=NetConfig(duplicate=1.0, delay_min=0.01, delay_max=0.05), pairs=3)
    sim.run_until(120.0)
    assert {e.state for e in a.pool.entries()} == {e.state for e in b.pool.entries()} == {"Idle"}
    assert a.pool.drops[DropReason.UNEXPECTED] > 0  # the second copy of each pong


def test_partition_expires_both_sides_with_no_inbound_after_the_timeout() -> None:
    sim, a, b = two_nodes(pairs=3)
    nonces = {e.nonce for e in a.pool.entries()}
    sim.run_until(30.0)
    t_cut = sim.now()
    sim.partition(a, "bob")
    assert sim.network.is_partitioned(b, a)
    assert not sim.run_until(lambda: bool(a.expiries() or b.expiries()), timeout=CFG.no_inbound_timeout - 5.0)
    sim.run_until(t_cut + CFG.no_inbound_timeout + 1.0)
    for node in (a, b):
        expiries = node.expiries()
        assert set(expiries) == nonces  # every pair expired
        assert set(expiries.values()) == {ExpiryReason.NO_INBOUND}
        assert len(node.pool) == 0
        for ev in node.transitions("expire"):
            # exactly no_inbound_timeout after the last frame that got through
            assert ev.at == pytest.approx(last_inbound(sim, node, ev.nonce) + CFG.no_inbound_timeout, abs=2e-3)
            assert ev.at > t_cut
    # nothing is sent after the expiry
    t_end = max(ev.at for n in (a, b) for ev in n.events)
    assert not [d for d in sim.log if d.time > t_end]


@pytest.mark.parametrize("silent_side", ["pinger", "ponger"])
def test_locked_side_sends_nothing_and_remote_expires(silent_side: str) -> None:
    sim, a, b = two_nodes(pairs=2)
    nonce = next(iter(a.pool.entries())).nonce
    other = next(e.nonce for e in a.pool.entries() if e.nonce != nonce)
    sim.run_until(12.0)
    locker, remote = (a, b) if silent_side == "pinger" else (b, a)
    t_lock = go_silent(locker, nonce)
    sim.run_until(t_lock + CFG.no_inbound_timeout + CFG.ping_interval + 1.0)
    # the silent side sent nothing for this pair once it was Locked
    assert not [d for d in sim.sent_by(locker.identity, nonce) if d.time >= t_lock]
    assert locker.state(nonce) == "InUse"
    assert sim.silence_violations() == []
    # the remote expired with NO_INBOUND, timeout after the last frame it got
    assert remote.expiries() == {nonce: ExpiryReason.NO_INBOUND}
    (ev,) = remote.transitions("expire")
    assert ev.at == pytest.approx(last_inbound(sim, remote, nonce) + CFG.no_inbound_timeout, abs=2e-3)
    assert ev.at <= t_lock + CFG.no_inbound_timeout + 1e-6
    # the untouched pair lives on
    assert a.state(other) == b.state(other) == "Idle"


def test_claim_without_handover_stops_new_pings_then_aborts_after_lock_timeout() -> None:
    sim, a, b = two_nodes()
    (entry,) = a.pool.entries()
    sim.run_until(6.5 * CFG.ping_interval)  # between pings: the one from 6 intervals was answered
    t_claim = sim.now()
    a.claim(entry.nonce)
    assert entry.state == "InLocking"
    sim.run_until(t_claim + CFG.lock_timeout + 0.5)
    (change,) = a.transitions("abort_lock")
    assert change.reason is ExpiryReason.LOCK_TIMEOUT
    assert change.at == pytest.approx(t_claim + CFG.lock_timeout)
    assert not [d for d in sim.sent_by("alice") if t_claim <= d.time < change.at]
    assert a.state(entry.nonce) == "Idle"
    sim.run_until(60.0)  # keepalive resumed; PairConfig keeps lock_timeout below no_inbound_timeout
    assert [d for d in sim.sent_by("alice") if d.time > change.at]
    assert a.state(entry.nonce) == b.state(entry.nonce) == "Idle"


# --- the log -------------------------------------------------------------------------------


def test_log_records_sender_state_at_send_time() -> None:
    sim, a, b = two_nodes()
    (entry,) = b.pool.entries()
    sim.run_until(8.0)
    b.claim(entry.nonce)  # the ponger keeps answering while InLocking
    sim.run_until(12.0)
    states = [(d.sender, d.kind, d.state) for d in sim.log]
    assert states[:2] == [("alice", "ping", "Idle"), ("bob", "pong", "Idle")]
    assert ("bob", "pong", "InLocking") in states
    assert all(d.state not in SILENT for d in sim.log)
    assert sim.silence_violations() == []
    for d in sim.log:
        assert d.nonce == entry.nonce and d.src[0] == (a.host if d.sender == "alice" else b.host)
    assert [d.id for d in sim.log] == sorted(d.id for d in sim.log)


def test_injected_foreign_and_malformed_datagrams_are_logged_and_dropped() -> None:
    sim, a, b = two_nodes()
    (entry,) = a.pool.entries()
    (peer,) = b.pool.entries()
    sim.run_until(1.0)
    ping = encode(Frame(entry.nonce, Kind.PING))
    sim.inject(("10.9.9.9", 5555), peer.local.addr, ping)  # its own frame from elsewhere: ADDRESS_MISMATCH
    sim.inject(("10.9.9.9", 5555), peer.local.addr, b"\x00garbage")
    sim.inject(entry.remote.addr, entry.local.addr, b"\x00garbage")
    sim.run_until(2.0)
    assert b.pool.drops[DropReason.ADDRESS_MISMATCH] == 1 and peer.seen_from == ("10.9.9.9", 5555)
    assert b.pool.drops[DropReason.FOREIGN_ADDRESS] == 1
    assert a.pool.drops[DropReason.MALFORMED] == 1
    injected = [d for d in sim.log if d.sender == INJECTED]
    assert [(d.kind, d.state, d.nonce) for d in injected] == [("ping", None, 0), ("garbage", None, 0),
                                                               ("garbage", None, 0)]
    pongs = [d for d in sim.log if d.sender == "bob" and 1.0 <= d.time <= 2.0]
    assert all(d.dst == peer.remote.addr for d in pongs)  # the injected ping is never answered
    assert len(pongs) == len([d for d in sim.log if d.sender == "alice" and 1.0 <= d.time < 2.0])
    assert entry.state == peer.state == "Idle"


def test_datagrams_to_a_removed_pair_are_counted_as_unowned() -> None:
    sim, a, b = two_nodes()
    (entry,) = b.pool.entries()
    sim.run_until(3.0)
    b.remove(entry.nonce)
    assert b.expiries() == {entry.nonce: ExpiryReason.CLOSED}
    sim.run_until(60.0)
    assert sim.unowned >= 3  # alice kept pinging the closed port until she gave up
    assert a.expiries() == {entry.nonce: ExpiryReason.NO_INBOUND}
    assert sim.run_until_quiet(timeout=1.0)


def test_manual_network_lets_the_test_choose_each_fate() -> None:
    sim, a, _b = two_nodes(net=NetConfig(manual=True))
    (entry,) = a.pool.entries()
    net = sim.network
    assert [d.kind for d in sim.log] == ["ping"] and len(net.in_flight) == 1
    t = CFG.ping_interval / 2  # before the next ping
    sim.run_until(t)
    net.deliver(0)  # ping reaches bob, who answers at once
    assert [d.kind for d in sim.log] == ["ping", "pong"] and net.in_flight[0].dst == entry.local.addr
    net.duplicate(0)
    net.deliver_all()
    assert entry.last_seen == t and entry.srtt == pytest.approx(t)
    assert a.pool.drops[DropReason.UNEXPECTED] == 1  # the duplicate pong


def test_run_until_predicate_times_out_at_the_deadline() -> None:
    sim, _a, _ = two_nodes()
    t = CFG.ping_interval / 2  # one exchange done, the next ping not yet sent
    assert sim.run_until(lambda: False, timeout=t) is False
    assert sim.now() == t and len(sim.log) == 2
    assert sim.run_until(lambda: len(sim.log) >= 4, timeout=100.0)
    assert len(sim.log) == 4 and sim.now() == pytest.approx(CFG.ping_interval + 0.01)  # the 2nd pong arrived
    assert not sim.run_until_quiet(timeout=30.0)  # keepalive never goes quiet


def test_bench_ratio_runs_the_documented_scenario() -> None:
    result = bench_ratio(pairs=3, virtual_seconds=60.0)
    pings = int(60.0 / CFG.ping_interval) + 1  # per pair, at t = 0, 1 interval, ..., 60
    # every ping answered but the last (in flight at the end)
    assert (result.nodes, result.pairs, result.datagrams) == (2, 3, 3 * (2 * pings - 1))
    assert result.ratio > 0 and "x real time" in str(result)


def test_punch_allocates_deterministic_ports_and_roles() -> None:
    sim = Simulation(5)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    p1 = sim.punch(a, b)
    p2 = sim.punch(a, b, nonce=7, pinger=b)
    assert (p1.a.port, p1.b.port, p2.a.port, p2.b.port) == (40000, 40000, 40001, 40001)
    assert p2.nonce == 7
    assert a.entry(p1.nonce).is_pinger and not b.entry(p1.nonce).is_pinger
    assert b.entry(7).is_pinger and not a.entry(7).is_pinger
    assert Simulation(5).new_nonce() == p1.nonce
    entries: list[PairEntry] = a.pool.entries()
    assert len(entries) == 2


def test_short_partition_healed_before_the_timeout_is_survived() -> None:
    sim, a, b = two_nodes(pairs=2)
    sim.run_until(10.0)
    sim.partition("alice", "bob")
    # the ping sent at t=10 is cut too, so the last inbound was one interval earlier
    sim.run_until(10.0 + CFG.no_inbound_timeout - 2 * CFG.ping_interval - 1.0)
    sim.heal()
    sim.run_until(120.0)
    assert a.expiries() == b.expiries() == {}
    assert sim.network.stats.partitioned > 0


def test_step_fires_one_event_at_a_time() -> None:
    d = CFG.ping_interval / 4  # the exchange ends before the next ping
    sim, _a, _b = two_nodes(net=NetConfig(delay_min=d, delay_max=d))
    assert len(sim.log) == 1  # the first ping went out on add
    assert sim.step() and sim.now() == d and len(sim.log) == 2  # ping arrived, pong sent
    assert sim.step() and sim.now() == 2 * d and len(sim.log) == 2  # pong arrived
    assert sim.step() and sim.now() == CFG.ping_interval and len(sim.log) == 3


def test_local_send_errors_expire_the_entry_with_send_failures() -> None:
    # (the pinger: a ponger's failure count is reset by every inbound ping)
    cfg = PairConfig(max_send_failures=3)  # 3 failed pings (3 intervals) end before the no-inbound timeout
    assert cfg.ping_interval * cfg.max_send_failures < cfg.no_inbound_timeout
    sim = Simulation(1, config=cfg)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonce = sim.punch(a, b).nonce
    t_fail = cfg.ping_interval / 2  # the first ping was answered; the next ones fail
    sim.run_until(t_fail)
    a.fail_sends = True  # alice's pings never leave the host
    sim.run_until(60.0)
    assert a.expiries() == {nonce: ExpiryReason.SEND_FAILURES}
    (ev,) = a.transitions("expire")
    assert a.send_failures == cfg.max_send_failures
    assert ev.at == cfg.ping_interval * cfg.max_send_failures  # the 3rd failed ping
    assert b.expiries() == {nonce: ExpiryReason.NO_INBOUND}
    assert not [d for d in sim.sent_by("alice") if d.time > t_fail]
