"""PairConfig: the defaults survive loss, and combinations that defeat the protocol are refused.

Each rejected combination is also shown to fail in the core, so the rule
is not an arbitrary restriction: what ``__post_init__`` refuses would break
the entry or the handover whatever the network does.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from natpool.config import PairConfig
from natpool.core.entry import EntryOutput, ExpiryReason, PairEntry, StateChanged
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import LocalError
from natpool.sim.survival import keepalive_survival

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
PAIR = EndpointPair(ALICE, BOB, 0x77)


def unchecked(**changes: float) -> PairConfig:
    """A PairConfig with ``changes`` applied *without* validation: what the core would see if it were allowed."""
    cfg = PairConfig()
    for name, value in changes.items():
        object.__setattr__(cfg, name, value)
    return cfg


def exchange(a: PairEntry, b: PairEntry, now: float, delay: float = 0.01) -> None:
    """Deliver a's queued ping to b and b's pong back, ``delay`` each way."""
    for data, _ in a.datagrams_to_send(now):
        b.receive_datagram(data, ALICE.addr, now + delay)
    for data, _ in b.datagrams_to_send(now + delay):
        a.receive_datagram(data, BOB.addr, now + 2 * delay)


def drain(entry: PairEntry) -> list[EntryOutput]:
    out = []
    while (ev := entry.next_event()) is not None:
        out.append(ev)
    return out


def test_defaults_are_valid_and_detect_a_dead_path_inside_a_30_s_mapping() -> None:
    cfg = PairConfig()
    assert cfg.no_inbound_timeout < 30.0
    assert cfg.ping_interval * 10 <= cfg.no_inbound_timeout  # far below it: many exchanges per window
    assert cfg.lock_timeout + cfg.ping_interval < cfg.no_inbound_timeout
    assert cfg.ping_lifespan <= cfg.ping_interval  # at most one ping outstanding (see below)


def test_defaults_keep_pairs_alive_at_30_percent_loss_where_the_old_ones_did_not() -> None:
    # 20 seeds x 5 virtual minutes keeps this to about a second; natpool bench runs the full 50 x 10 min.
    new = keepalive_survival(0.3, PairConfig(), seeds=20, virtual_seconds=300.0)
    old = keepalive_survival(0.3, PairConfig(ping_interval=5.0, no_inbound_timeout=21.0), seeds=20,
                             virtual_seconds=300.0)
    assert new.alive == new.seeds and new.first_expiry_median is None
    assert old.alive < old.seeds // 2
    assert old.first_expiry_median is not None and old.first_expiry_median < 300.0


@pytest.mark.parametrize("name", ["ping_interval", "no_inbound_timeout", "ping_lifespan", "lock_timeout",
                                  "min_drain_grace", "drain_grace_rtts"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_timers_must_be_positive_numbers(name: str, value: float) -> None:
    with pytest.raises(LocalError, match=f"{name} must be > 0"):
        dataclasses.replace(PairConfig(), **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-0.1, math.nan])
def test_settle_time_must_be_non_negative(value: float) -> None:
    with pytest.raises(LocalError, match="settle_time must be >= 0"):
        PairConfig(settle_time=value)


def test_max_send_failures_must_be_at_least_one() -> None:
    with pytest.raises(LocalError, match="max_send_failures"):
        PairConfig(max_send_failures=0)


def test_no_inbound_timeout_must_exceed_the_ping_interval() -> None:
    with pytest.raises(LocalError, match="expire a lossless path between two pings"):
        PairConfig(ping_interval=3.0, no_inbound_timeout=3.0, lock_timeout=2.0)
    # Why: the ponger hears a ping every interval, so a window no longer than it runs out between two pings.
    cfg = unchecked(ping_interval=3.0, no_inbound_timeout=3.0, lock_timeout=2.0)
    a, b = PairEntry(PAIR, "alice", True, cfg, 0.0), PairEntry(PAIR, "bob", False, cfg, 0.0)
    exchange(a, b, 0.0)  # b heard the first ping at 0.01
    b.handle_timer(3.01)  # the next ping leaves at 3.0 and cannot arrive before 3.01 (one delay)
    assert b.state == "Expired"


@pytest.mark.parametrize("lock_timeout", [21.0, 30.0])
def test_lock_timeout_must_be_below_no_inbound_timeout(lock_timeout: float) -> None:
    with pytest.raises(LocalError, match=r"lock_timeout .* must be below no_inbound_timeout") as info:
        PairConfig(no_inbound_timeout=21.0, lock_timeout=lock_timeout)
    assert "loses the pair on both sides" in str(info.value)
    PairConfig(no_inbound_timeout=21.0, lock_timeout=20.9)  # the other direction is the required one


def test_a_timed_out_take_with_lock_timeout_at_no_inbound_loses_the_pair_on_both_sides() -> None:
    """What the lock_timeout rule prevents: even with an exchange just before the claim, both sides expire."""
    cfg = unchecked(lock_timeout=PairConfig().no_inbound_timeout)
    a = PairEntry(PAIR, "alice", True, cfg, 0.0)  # pinger, initiator of a take that will time out
    b = PairEntry(PAIR, "bob", False, cfg, 0.0)  # ponger, never got the LOCK: stays Idle
    exchange(a, b, 0.0)
    assert a.begin_lock(0.02)  # claimed right after a fresh exchange: the best case
    t = a.get_timer()
    assert t is not None and t == pytest.approx(0.02 + cfg.lock_timeout)
    b.handle_timer(t)
    a.handle_timer(t)  # the lock times out: back to Idle, and at once past its no-inbound deadline
    assert a.state == b.state == "Expired"
    changes = [(e.event, e.reason) for e in drain(a) if isinstance(e, StateChanged)]
    assert changes[-2:] == [("abort_lock", ExpiryReason.LOCK_TIMEOUT), ("expire", ExpiryReason.NO_INBOUND)]
    assert [(e.event, e.reason) for e in drain(b) if isinstance(e, StateChanged)] == [
        ("expire", ExpiryReason.NO_INBOUND)]


def test_ping_lifespan_must_not_be_below_the_drain_grace() -> None:
    with pytest.raises(LocalError, match=r"ping_lifespan .* must be >= min_drain_grace"):
        PairConfig(ping_lifespan=0.1, min_drain_grace=0.2)
    PairConfig(ping_lifespan=0.2, min_drain_grace=0.2)  # equal is fine
    # Why: the grace is capped at the lifespan, so the configured grace is silently not given.
    cfg = unchecked(ping_lifespan=0.1, min_drain_grace=0.2)
    a, b = PairEntry(PAIR, "alice", True, cfg, 0.0), PairEntry(PAIR, "bob", False, cfg, 0.0)
    exchange(a, b, 0.0)  # srtt 0.02: drain_grace_rtts * srtt is below min_drain_grace
    t = cfg.ping_interval
    a.handle_timer(t)
    a.datagrams_to_send(t)  # a ping outstanding when the lock begins
    assert a.begin_lock(t)
    deadline = a.get_timer()
    assert deadline == pytest.approx(t + cfg.ping_lifespan)  # not t + min_drain_grace


def test_settle_time_must_be_below_lock_timeout() -> None:
    with pytest.raises(LocalError, match=r"settle_time .* must be below lock_timeout"):
        PairConfig(settle_time=5.0, lock_timeout=5.0)
    PairConfig(settle_time=1.0, lock_timeout=5.0)
    # Why: a Locked entry expires at lock_timeout from its claim before it has settled.
    cfg = unchecked(settle_time=5.0, lock_timeout=5.0)
    b = PairEntry(PAIR, "bob", False, cfg, 0.0)
    assert b.begin_lock(1.0) and b.finish_lock(1.0)
    t = b.get_timer()
    assert t is not None and t == pytest.approx(1.0 + cfg.lock_timeout)
    assert not b.use(t - 0.001)
    b.handle_timer(t)
    assert b.state == "Expired"


def test_ping_lifespan_may_exceed_the_ping_interval() -> None:
    """Not rejected: several pings outstanding is safe, only slower to drain (see the PairConfig docstring)."""
    cfg = PairConfig(ping_lifespan=2.0)
    assert cfg.ping_lifespan > cfg.ping_interval
    a = PairEntry(PAIR, "alice", True, cfg, 0.0)
    a.datagrams_to_send(0.0)
    a.handle_timer(cfg.ping_interval)
    a.datagrams_to_send(cfg.ping_interval)
    assert a.outstanding == 2  # the first ping (lost) is still within its lifespan


def _lossy_keepalive(cfg: PairConfig, seconds: float) -> tuple[PairEntry, list[int]]:
    """A pinger whose every third pong is lost (RTT 20 ms); the outstanding count seen after every step."""
    a, b = PairEntry(PAIR, "alice", True, cfg, 0.0), PairEntry(PAIR, "bob", False, cfg, 0.0)
    seen: list[int] = []
    k = 0
    while (t := k * cfg.ping_interval) <= seconds:
        a.handle_timer(t)
        for data, _ in a.datagrams_to_send(t):
            b.receive_datagram(data, ALICE.addr, t + 0.01)
        pongs = b.datagrams_to_send(t + 0.01)
        if k % 3 != 1:
            for data, _ in pongs:
                a.receive_datagram(data, BOB.addr, t + 0.02)
        seen.append(a.outstanding)
        k += 1
    return a, seen


def test_default_lifespan_keeps_one_ping_outstanding_at_most_and_the_rtt_honest() -> None:
    a, seen = _lossy_keepalive(PairConfig(), 60.0)
    assert a.state == "Idle" and max(seen) <= 1 and seen[-1] == 0
    assert a.srtt == pytest.approx(0.02)
    # The reason for ping_lifespan <= ping_interval (see the PairConfig docstring): with a longer lifespan
    # the first lost pong leaves a phantom outstanding ping and every later RTT sample is an interval long.
    long_life, seen = _lossy_keepalive(PairConfig(ping_lifespan=2.5), 60.0)
    assert seen[-1] >= 1
    assert long_life.srtt is not None and long_life.srtt > PairConfig().ping_interval
