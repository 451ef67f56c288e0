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
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import PairBusy

TRACES = sorted((Path(__file__).parent / "counterexamples").glob("*.json"))
NODES = ("n0", "n1")

#: Model steps the real code takes inside the call that enables them.
AUTOMATIC = {"send_lock", "accept", "send_locked", "ini_finish_lock", "resp_finish_lock", "send_take",
             "ini_settle", "resp_settle"}


class Replay:
    def __init__(self, trace: dict[str, Any], settle_time: float) -> None:
        self.trace = trace
        self.now = 0.0
        cfg = PairConfig(lock_timeout=5.0, settle_time=settle_time)
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
        elif action in ("take", "take_busy"):
            assert s is not None
            pool = self.pools[self.spec[s]["initiator"]]
            if action == "take":
                self.ini[s] = pool.start_take(params["p"] + 1, None, self.now)
            else:
                with pytest.raises(PairBusy):
                    pool.start_take(params["p"] + 1, None, self.now)
        elif action in ("lock_claim", "lock_yield", "lock_refuse", "lock_unknown"):
            assert s is not None
            data = self.toresp[s].pop(0)
            self.resp[s] = self.pools[self.spec[s]["responder"]].accept_session(data, self.now)
        elif action in ("recv_locked", "recv_busy", "recv_unknown", "recv_taken"):
            assert s is not None
            self.ini[s].receive_signal(self.toini[s].pop(0), self.now)
        elif action == "recv_take":
            assert s is not None
            self.resp[s].receive_signal(self.toresp[s].pop(0), self.now)
        elif action == "chan_break":
            assert s is not None
            self.closed[s] = True
            self.toresp[s].clear()
            self.toini[s].clear()
        elif action in ("ini_fail", "resp_fail"):
            assert s is not None
            session: Session = self.ini[s] if action == "ini_fail" else self.resp[s]
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
        else:
            pytest.skip(f"replay of keepalive-level action {action!r} is not supported here")
        self.collect()
        self.check_symmetry()

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
