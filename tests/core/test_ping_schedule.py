"""The pinger's schedule: a fixed phase on a grid of PING_TICKS points per interval (natpool.core.entry).

Why it matters: a schedule of ``now + interval`` after each wake-up merges every
entry that one (late) wake-up served into one group, so a pool's pings end in a
few large bursts that stall the loop (they were the tail of the handover
latency); and entries on distinct phases each cost a wake-up. These tests pin
the three promises: phases are kept under small lateness, entries share grid
points (bounded wake-ups), and two pings never overlap.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.config import PairConfig
from natpool.core.entry import PHASE_TOLERANCE_TICKS, PING_TICKS, RESTART_SPREAD_TICKS, PairEntry
from natpool.endpoints import Endpoint, EndpointPair

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
CFG = PairConfig(ping_interval=1.0, no_inbound_timeout=21.0, ping_lifespan=1.0)
TICK = CFG.ping_interval / PING_TICKS
TOLERANCE = PHASE_TOLERANCE_TICKS * TICK


def pinger(now: float, nonce: int = 7, cfg: PairConfig = CFG) -> PairEntry:
    entry = PairEntry(EndpointPair(ALICE, BOB, nonce), "alice", True, cfg, now)
    entry.datagrams_to_send(now)  # the ping of add
    return entry


def pong(entry: PairEntry, now: float) -> None:
    nonce = entry.nonce
    entry.receive_datagram(nonce.to_bytes(8, "big") + b"\x01", BOB.addr, now)


def on_grid(t: float, tick: float = TICK) -> bool:
    return abs(t / tick - round(t / tick)) < 1e-6


def test_the_ping_of_add_leaves_at_once_and_the_next_is_on_the_grid() -> None:
    entry = PairEntry(EndpointPair(ALICE, BOB, 7), "alice", True, CFG, 3.3)
    assert len(entry.datagrams_to_send(3.3)) == 1
    pong(entry, 3.31)
    deadline = entry.get_timer()
    assert deadline is not None and on_grid(deadline)
    assert 3.3 + CFG.ping_interval <= deadline < 3.3 + CFG.ping_interval + TICK


def test_a_late_wakeup_keeps_the_phase() -> None:
    entry = pinger(0.0)
    due = entry.get_timer()
    assert due is not None and due == pytest.approx(1.0)
    late = due + 0.5 * TOLERANCE  # the loop was busy: served late, within the tolerance
    entry.handle_timer(late)
    assert len(entry.datagrams_to_send(late)) == 1
    pong(entry, late + 0.001)
    assert entry.get_timer() == pytest.approx(2.0)  # one interval after the slot, not after `late`


def test_a_wakeup_later_than_the_tolerance_restarts_on_the_grid_and_never_pings_early() -> None:
    entry = pinger(0.0)
    late = 1.0 + TOLERANCE + 0.3 * TICK
    entry.handle_timer(late)
    assert len(entry.datagrams_to_send(late)) == 1
    pong(entry, late + 0.001)
    nxt = entry.get_timer()
    assert nxt is not None and on_grid(nxt)
    assert late + CFG.ping_interval <= nxt < late + CFG.ping_interval + RESTART_SPREAD_TICKS * TICK
    # The point among the spread is the old phase's: grid index 64 (the slot at 1.0) modulo the spread.
    point = round(nxt / TICK)
    first = math.ceil((late + CFG.ping_interval) / TICK)
    assert (point - first) == (round(1.0 / TICK) - first) % RESTART_SPREAD_TICKS


def test_a_stall_spreads_the_phases_it_made_late_instead_of_merging_them() -> None:
    """One wake-up long after many entries were due (a 0.4-interval stall): they restart on many points."""
    entries = [pinger(i * TICK, nonce=i + 1) for i in range(PING_TICKS)]  # one entry per phase
    for e in entries:
        pong(e, e.last_seen + 0.001)
    stalled = 1.0 + 0.4 * CFG.ping_interval  # the loop was blocked from 1.0 on: every entry due in it is late
    late = [e for e in entries if (t := e.get_timer()) is not None and t <= stalled]
    assert len(late) > 20
    for e in late:
        e.handle_timer(stalled)
        assert e.datagrams_to_send(stalled)
        pong(e, stalled + 0.001)
    points = {round(t / TICK) for e in late if (t := e.get_timer()) is not None}
    # Not one burst: every entry keeps a point of its own (its phase: this config's margin allows the whole
    # spread), none earlier than the tolerance allows nor later than the spread.
    assert len(points) == len(late)
    for e in late:  # entry i was added at i ticks: its phase, kept through the restart
        t = e.get_timer()
        assert t is not None and round(t / TICK) % PING_TICKS == (e.nonce - 1) % PING_TICKS
    assert all(stalled + CFG.ping_interval - TOLERANCE - 1e-9 <= p * TICK < stalled + CFG.ping_interval
               + RESTART_SPREAD_TICKS * TICK for p in points)


def test_a_tight_config_spreads_less_so_the_restart_gap_stays_within_its_timeout_margin() -> None:
    tight = PairConfig(ping_interval=1.0, no_inbound_timeout=1.1, ping_lifespan=0.5, lock_timeout=1.0)
    entries = [pinger(i * TICK, nonce=i + 1, cfg=tight) for i in range(PING_TICKS)]
    for e in entries:
        pong(e, e.last_seen + 0.001)
    stalled = 1.09  # ~6 ticks late for the first: past the tolerance, before anyone's no-inbound timeout
    served = [e for e in entries if (t := e.get_timer()) is not None and t <= stalled]
    assert served
    for e in served:
        e.handle_timer(stalled)
        assert e.datagrams_to_send(stalled)
        pong(e, stalled + 0.001)
    margin = (tight.no_inbound_timeout - tight.ping_interval) / 2  # 3 ticks of spread at most, not 16
    for e in served:
        t = e.get_timer()
        assert t is not None and tight.ping_interval - TOLERANCE <= t - stalled <= tight.ping_interval + margin


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=40), st.integers(0, 2**32))
def test_pings_are_never_closer_than_interval_minus_tolerance_nor_overlap(lateness: list[float], seed: int) -> None:
    """Whatever the lateness of each wake-up (fractions of 2x the tolerance), and with lost pongs."""
    rng = random.Random(seed)
    entry = pinger(0.0)
    sent = [0.0]
    for frac in lateness:
        due = entry.get_timer()
        assert due is not None
        now = due + frac * 2 * TOLERANCE
        entry.handle_timer(now)
        out = entry.datagrams_to_send(now)
        if out:
            sent.append(now)
            assert entry.outstanding == 1  # an older, unanswered ping was given up before this one
            if rng.random() < 0.7:
                pong(entry, now + 0.01)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g >= CFG.ping_interval - TOLERANCE - 1e-9 for g in gaps)
    assert entry.state == "Idle"


def test_entries_added_at_any_times_share_at_most_ping_ticks_deadlines() -> None:
    """1,000 pingers added at random times over 3 s: their ping deadlines fall on <= PING_TICKS points."""
    rng = random.Random(1)
    entries = [pinger(rng.uniform(0.0, 3.0), nonce=i + 1) for i in range(1000)]
    for e in entries:
        pong(e, e.last_seen + 0.01)
    deadlines = {round(t / TICK) for e in entries if (t := e.get_timer()) is not None}
    assert len(deadlines) <= PING_TICKS * math.ceil(3.0 / CFG.ping_interval + 1)
    phases = {d % PING_TICKS for d in deadlines}
    assert len(phases) == PING_TICKS  # and they use the whole grid: no burst


def test_a_pool_served_late_every_time_keeps_its_groups_apart() -> None:
    """The bunching this schedule prevents: every wake-up serves what is due, a little late each time.

    With ``now + interval`` the groups served by one late wake-up merge; here
    ten virtual seconds of late wake-ups leave the number of distinct phases as
    it was.
    """
    rng = random.Random(2)
    entries = [pinger(rng.uniform(0.0, 1.0), nonce=i + 1) for i in range(500)]
    for e in entries:
        pong(e, e.last_seen + 0.01)

    def phases() -> int:
        return len({round(t / TICK) % PING_TICKS for e in entries if (t := e.get_timer()) is not None})

    before = phases()
    now = 0.0
    while now < 10.0:
        nxt = min(t for e in entries if (t := e.get_timer()) is not None)
        now = nxt + rng.uniform(0.0, TOLERANCE * 0.9)  # always late, never by more than the tolerance
        for e in entries:
            t = e.get_timer()
            if t is not None and t <= now + 0.001:
                e.handle_timer(now)
                if e.datagrams_to_send(now):
                    pong(e, now + 0.0005)
    assert phases() == before
    assert all(e.state == "Idle" for e in entries)
