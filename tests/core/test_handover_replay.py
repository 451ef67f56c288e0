"""Replay the checker's saved design counterexamples against the real sans-IO sessions.

Each ``tests/counterexamples/*.json`` (format ``natpool-trace/1``) is a run of
the system model that broke a property of an earlier protocol draft. Here
its actions drive two real :class:`PairPool` s step by step: signals sit in
per-session queues until the trace delivers them, channel breaks and
timeouts happen exactly where the trace puts them. The real code performs
some model steps eagerly (``send_lock`` inside ``take``, ``accept`` inside
the first LOCK), so those are no-ops here. After every step Symmetry must
hold; at the end every session has ended and no entry is left claimed —
the regression the trace stands for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason
from natpool.core.handover import InitiatorSession, ResponderSession, Session
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import PairBusy
from tests.support import COUNTEREXAMPLES

TRACES = sorted(COUNTEREXAMPLES.glob("*.json"))
MUTANT_TRACES = sorted((COUNTEREXAMPLES / "mutants").glob("*.json"))
NODES = ("n0", "n1")

#: Model steps the real code takes inside the call that enables them.
AUTOMATIC = {"send_lock", "accept", "send_locked", "ini_finish_lock", "resp_finish_lock", "send_take",
             "ini_settle", "resp_settle"}


class Replay:
    def __init__(self, trace: dict[str, Any], settle_time: float, strict: bool = True) -> None:
        """``strict``: the real code must follow the trace; otherwise (a mutant's schedule) it may refuse."""
        self.trace = trace
        self.strict = strict
        self.diverged: list[str] = []
        self.now = 0.0
        # Timers far apart so that only the trace decides when a ping times out or a lock gives up.
        cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=1000.0, ping_lifespan=100.0, lock_timeout=500.0,
                         settle_time=settle_time)
        self.pools = [PairPool(n, cfg) for n in NODES]
        k = int(trace["constants"]["K"])
        for p in range(k):
            pair = EndpointPair(Endpoint("n0", "10.0.0.1", 40000 + p), Endpoint("n1", "10.0.0.2", 40000 + p), p + 1)
            for n, pool in enumerate(self.pools):
                pool.add(pair, trace["pinger"][p] == n, self.now)
        self.spec = {s["id"]: s for s in trace["sessions"]}
        self.ini: dict[int, InitiatorSession] = {}
        self.resp: dict[int, ResponderSession] = {}
        self.toresp: dict[int, list[bytes]] = {s: [] for s in self.spec}
        self.toini: dict[int, list[bytes]] = {s: [] for s in self.spec}
        self.closed: dict[int, bool] = dict.fromkeys(self.spec, False)
        # Keepalive frames in flight per pair: pings (pinger -> ponger) and pongs, FIFO.
        self.pings: dict[int, list[bytes]] = {p: [] for p in range(k)}
        self.pongs: dict[int, list[bytes]] = {p: [] for p in range(k)}
        self.addr = {(n, p): ("10.0.0.1" if n == 0 else "10.0.0.2", 40000 + p) for n in (0, 1) for p in range(k)}
        self.stray: list[str] = []  # CleanHandover: a keepalive frame that reached an InUse side

    def sessions(self) -> list[Session]:
        return [*self.ini.values(), *self.resp.values()]

    def collect(self) -> None:
        """Move queued output into the channel queues (lost once the channel is closed)."""
        for s, ini in self.ini.items():
            out = ini.signals_to_send()
            if not self.closed[s]:
                self.toresp[s] += out
            if ini.done:
                self.closed[s] = True
        for s, resp in self.resp.items():
            out = resp.signals_to_send()
            if not self.closed[s]:
                self.toini[s] += out
            if resp.done:
                self.closed[s] = True

    def step(self, action: str, params: dict[str, int], node: int | None) -> None:
        self.now += 0.001
        s = params.get("s")
        if action in AUTOMATIC:
            pass
        elif action in ("take", "take_busy", "take_any", "take_any_none"):
            assert s is not None
            ini_node = self.spec[s]["initiator"]
            pool = self.pools[ini_node]
            by_nonce = action in ("take", "take_busy")
            nonce, peer = (params["p"] + 1, None) if by_nonce else (None, NODES[1 - ini_node])
            if action in ("take", "take_any"):
                try:
                    self.ini[s] = pool.start_take(nonce, peer, self.now)
                except PairBusy:
                    assert not self.strict, (action, params)
                    self.diverged.append(f"{action}({params}) -> PairBusy")
            else:
                with pytest.raises(PairBusy):
                    pool.start_take(nonce, peer, self.now)
        elif action in ("lock_claim", "lock_yield", "lock_refuse", "lock_unknown"):
            assert s is not None
            if self.toresp[s]:
                data = self.toresp[s].pop(0)
                self.resp[s] = self.pools[self.spec[s]["responder"]].accept_session(data, self.now)
            else:
                assert not self.strict
                self.diverged.append(f"{action}({params}): no LOCK queued")
        elif action in ("recv_locked", "recv_busy", "recv_unknown", "recv_taken"):
            assert s is not None
            if s in self.ini and self.toini[s]:
                self.ini[s].receive_signal(self.toini[s].pop(0), self.now)
            else:
                assert not self.strict
                self.diverged.append(f"{action}({params}): nothing queued")
        elif action == "recv_take":
            assert s is not None
            if s in self.resp and self.toresp[s]:
                self.resp[s].receive_signal(self.toresp[s].pop(0), self.now)
            else:
                assert not self.strict
                self.diverged.append(f"{action}({params}): nothing queued")
        elif action == "chan_break":
            assert s is not None
            self.closed[s] = True
            self.toresp[s].clear()
            self.toini[s].clear()
        elif action in ("ini_fail", "resp_fail"):
            assert s is not None
            role: dict[int, Any] = self.ini if action == "ini_fail" else self.resp
            if s not in role:
                assert not self.strict
                self.diverged.append(f"{action}({params}): no such session")
                return
            session: Session = role[s]
            if self.closed[s]:
                session.channel_closed(self.now)
            elif not session.done:  # the model's lock timeout
                deadline = session.get_timer()
                assert deadline is not None
                self.now = max(self.now, deadline)
                session.handle_timer(self.now)
            assert session.done, (action, s)
        elif action in ("remove", "expire_idle"):
            pool = self.pools[params["n"]]
            nonce = params["p"] + 1
            if action == "remove":
                pool.remove(nonce, self.now)
            else:
                with pool.lock:
                    pool.get(nonce).expire(ExpiryReason.NO_INBOUND, self.now)
        elif action == "ping_send":
            p, pinger = params["p"], self.trace["pinger"][params["p"]]
            pool = self.pools[pinger]
            frames = [d for nonce, d, _a in pool.datagrams_to_send(self.now) if nonce == p + 1]
            if not frames:  # the next ping is due on the entry's own timer
                t = pool.get_timer()
                assert t is not None
                self.now = max(self.now, t)
                pool.handle_timer(self.now)
                frames = [d for nonce, d, _a in pool.datagrams_to_send(self.now) if nonce == p + 1]
            self.pings[p] += frames * params.get("c", 1)
        elif action in ("ping_answer", "ping_drop"):
            p = params["p"]
            self.deliver(p, ping=True, copies=params.get("c", 1))
        elif action == "pong_recv":
            self.deliver(params["p"], ping=False)
        elif action in ("lose_ping", "lose_pong"):
            (self.pings if action == "lose_ping" else self.pongs)[params["p"]].pop(0)
        elif action == "ping_timeout":
            pool = self.pools[self.trace["pinger"][params["p"]]]
            t = pool.get_timer()
            assert t is not None
            self.now = max(self.now, t)
            pool.handle_timer(self.now)
        else:
            raise AssertionError(f"unknown model action {action!r}")
        self.collect()
        self.check_symmetry()

    def deliver(self, p: int, ping: bool, copies: int = 1) -> None:
        """The head frame of pair ``p`` reaches its side; a ponger's answers (``copies`` each) go back."""
        pinger = self.trace["pinger"][p]
        dst = 1 - pinger if ping else pinger
        queue = self.pings[p] if ping else self.pongs[p]
        if not queue:
            assert not self.strict
            self.diverged.append(f"no {'ping' if ping else 'pong'} in flight for pair {p}")
            return
        data = queue.pop(0)
        if self.state(dst, p) == "InUse":
            self.stray.append(f"{'ping' if ping else 'pong'} reached InUse node {dst}")
        self.pools[dst].receive_datagram(p + 1, data, self.addr[(1 - dst, p)], self.now)
        if ping:
            out = [d for nonce, d, _a in self.pools[dst].datagrams_to_send(self.now) if nonce == p + 1]
            self.pongs[p] += out * copies

    def run_to_quiescence(self) -> None:
        """Deliver every queued signal in order, then let closes and lock timeouts end what is left."""
        for _ in range(100):
            progressed = False
            for p in self.pings:
                if self.pings[p] or self.pongs[p]:
                    self.deliver(p, ping=bool(self.pings[p]))
                    progressed = True
            for s in self.spec:
                if self.toresp[s]:
                    data = self.toresp[s].pop(0)
                    if s in self.resp:
                        self.resp[s].receive_signal(data, self.now)
                    else:
                        self.resp[s] = self.pools[self.spec[s]["responder"]].accept_session(data, self.now)
                    progressed = True
                elif self.toini[s] and s in self.ini:
                    self.ini[s].receive_signal(self.toini[s].pop(0), self.now)
                    progressed = True
            self.collect()
            self.check_symmetry()
            if progressed:
                continue
            live = [x for x in self.sessions() if not x.done]
            if not live:
                return
            for s in self.spec:
                for role in (self.ini.get(s), self.resp.get(s)):
                    if role is not None and not role.done and self.closed[s]:
                        role.channel_closed(self.now)
            for session in self.sessions():
                t = session.get_timer()
                if not session.done and t is not None:
                    self.now = max(self.now, t)
                    session.handle_timer(self.now)
            self.collect()
            self.check_symmetry()
        raise AssertionError("replay did not quiesce")

    def state(self, n: int, p: int) -> str:
        pool = self.pools[n]
        return pool.get(p + 1).state if (p + 1) in pool else "Expired"

    def check_symmetry(self) -> None:
        for p in range(int(self.trace["constants"]["K"])):
            assert {self.state(0, p), self.state(1, p)} != {"InUse", "Idle"}


@pytest.mark.parametrize("settle_time", [0.0, 10.0], ids=["no-settle", "long-settle"])
@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_design_counterexample_replays_without_getting_stuck(path: Path, settle_time: float) -> None:
    trace = json.loads(path.read_text())
    assert trace["format"] == "natpool-trace/1" and trace["mutant"] is None
    replay = Replay(trace, settle_time)
    for step in trace["steps"][1:]:
        replay.step(step["action"], step["params"], step["node"])
    # The model got stuck here (a role in Settling with its entry gone); the real sessions must all end.
    for session in replay.sessions():
        assert session.done, (session.role, session.state)
    if path.stem.startswith("design-01") and settle_time > 0:
        # The responder was still Settling when its entry was removed: it must fail, not wait forever.
        [resp] = replay.resp.values()
        assert resp.state == "Failed"
    for n, pool in enumerate(replay.pools):
        assert not pool.handovers.sessions()
        for p in range(int(trace["constants"]["K"])):
            assert replay.state(n, p) in ("Idle", "InUse", "Expired")


@pytest.mark.parametrize("path", MUTANT_TRACES, ids=[p.stem for p in MUTANT_TRACES])
def test_mutant_counterexample_schedules_do_not_break_the_real_code(path: Path) -> None:
    """Each seeded bug's shortest counterexample, replayed as a schedule: the real code refuses or survives it."""
    trace = json.loads(path.read_text())
    assert trace["mutant"] is not None
    replay = Replay(trace, settle_time=0.0, strict=False)
    for step in trace["steps"][1:]:
        replay.step(step["action"], step["params"], step["node"])
    replay.run_to_quiescence()
    k = int(trace["constants"]["K"])
    for n, pool in enumerate(replay.pools):
        assert not pool.handovers.sessions()  # NoLeak: no session holds an entry
        for p in range(k):
            assert replay.state(n, p) in ("Idle", "InUse", "Expired")
    assert replay.stray == []  # CleanHandover: no keepalive frame reached a handed-out pair
    # AtomicTake: per node and pair at most one lease, and both sides' leases come from one session.
    for p in range(k):
        sids = {n: [x.outcome.sid for x in replay.sessions()
                    if isinstance(x.outcome, Lease) and x.outcome.nonce == p + 1
                    and x.outcome.entry.local.identity == NODES[n]] for n in (0, 1)}
        assert len(sids[0]) <= 1 and len(sids[1]) <= 1, sids
        if sids[0] and sids[1]:
            assert sids[0] == sids[1]
