"""Replay the checker's saved design counterexamples against the real sessions on natpool.sim.

Each ``tests/counterexamples/*.json`` (format ``natpool-trace/1``) is a run of
the system model that broke a property of an earlier protocol draft. Here
its actions drive two :class:`natpool.sim.SimNode` s step by step, with the
network and the signalling in manual mode: datagrams and signals wait in the
simulator until the trace delivers, drops or duplicates them, channel breaks
happen exactly where the trace puts them, and virtual time only moves by the
trace's steps, so a ping or lock timeout fires only where the trace says (the
one timer it names, then the node pumps as its driver would). The real code
performs some model steps eagerly (``send_lock`` inside ``take``, ``accept``
inside the first LOCK), so those are no-ops here. After every step Symmetry
must hold; at the end every session has ended and no entry is left claimed
- the regression the trace stands for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from natpool.config import PairConfig
from natpool.core.entry import ExpiryReason
from natpool.core.handover import Session
from natpool.core.lease import Lease
from natpool.endpoints import EndpointPair
from natpool.errors import PairBusy
from natpool.sim import ChannelEnd, InFlight, NetConfig, SimNode, Simulation, TakeHandle, frame_kind
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
        # Timers far apart so that only the trace decides when a ping times out or a lock gives up.
        cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=1000.0, ping_lifespan=100.0, lock_timeout=500.0,
                         settle_time=settle_time)
        self.sim = Simulation(0, NetConfig(manual=True), config=cfg, signalling_manual=True)
        self.nodes: list[SimNode] = [self.sim.add_node(n, f"10.0.0.{i + 1}") for i, n in enumerate(NODES)]
        self.k = int(trace["constants"]["K"])
        self.pairs: list[EndpointPair] = [
            self.sim.punch(self.nodes[0], self.nodes[1], nonce=p + 1, pinger=self.nodes[trace["pinger"][p]])
            for p in range(self.k)]
        # The model starts with nothing in flight, but a punched pair pings at once: complete that
        # first keepalive round (ping and pong delivered) before the trace's first step.
        net = self.sim.network
        while net.in_flight:
            net.deliver(0)
        assert all(n.entry(p + 1).state == "Idle" for n in self.nodes for p in range(self.k))
        self.spec = {s["id"]: s for s in trace["sessions"]}
        self.takes: dict[int, TakeHandle] = {}  # model session id -> the take that opened its channel
        # Keepalive copies the trace put on the wire (``ping_send``, ``ping_answer``), oldest first, per
        # pair; the simulator's in-flight list also holds frames the trace never sent, which stay there.
        self.pings: dict[int, list[InFlight]] = {p: [] for p in range(self.k)}
        self.pongs: dict[int, list[InFlight]] = {p: [] for p in range(self.k)}

    @property
    def now(self) -> float:
        return self.sim.now()

    def tick(self, to: float | None = None) -> None:
        """Move virtual time (never firing the simulator's timers: the trace fires the ones it names)."""
        self.sim.clock.advance_to(max(self.now, self.now + 0.001 if to is None else to))

    def ini(self, s: int) -> Session | None:
        handle = self.takes.get(s)
        return handle.session if handle is not None else None

    def resp(self, s: int) -> Session | None:
        handle = self.takes.get(s)
        return handle.responder if handle is not None else None

    def sessions(self) -> list[Session]:
        return [x for s in self.spec for x in (self.ini(s), self.resp(s)) if x is not None]

    def node_of(self, session: Session) -> SimNode:
        return next(n for n in self.nodes if any(link.session is session for link in n.links))

    def deliver_to(self, end: ChannelEnd | None) -> bool:
        """Deliver the head of the channel direction towards ``end``; False if nothing waits there."""
        if end is None:
            return False
        sig = self.sim.signalling
        for i, pending in enumerate(sig.in_flight):
            if pending.to is end:
                sig.deliver(i)
                return True
        return False

    def ends(self, s: int) -> tuple[ChannelEnd | None, ChannelEnd | None]:
        """(initiator end, responder end) of session ``s``'s channel."""
        handle = self.takes.get(s)
        if handle is None or handle.end is None:
            return None, None
        return handle.end, handle.end.peer

    def fire(self, node: SimNode, session: Session | None = None) -> None:
        """The one timer the trace names: ``session``'s, or else ``node``'s pool's, at its deadline."""
        target = session if session is not None else node.pool
        t = target.get_timer()
        assert t is not None
        self.tick(t)
        target.handle_timer(self.now)
        node.pump()  # touched the pool/session directly: flush it, as a driver would

    def step(self, action: str, params: dict[str, int], node: int | None) -> None:
        self.tick()
        s = params.get("s")
        if action in AUTOMATIC:
            pass
        elif action in ("take", "take_busy", "take_any", "take_any_none"):
            assert s is not None
            ini_node = self.nodes[self.spec[s]["initiator"]]
            by_nonce = action in ("take", "take_busy")
            nonce, peer = (params["p"] + 1, None) if by_nonce else (None, NODES[1 - self.spec[s]["initiator"]])
            handle = ini_node.take(nonce, peer)
            if action in ("take", "take_any"):
                if handle.end is None:
                    assert not self.strict, (action, params)
                    assert isinstance(handle.outcome, PairBusy)
                    self.diverged.append(f"{action}({params}) -> PairBusy")
                else:
                    self.takes[s] = handle
            else:
                assert isinstance(handle.outcome, PairBusy) and handle.end is None
        elif action in ("lock_claim", "lock_yield", "lock_refuse", "lock_unknown", "recv_take"):
            assert s is not None
            if not self.deliver_to(self.ends(s)[1]):
                assert not self.strict
                self.diverged.append(f"{action}({params}): nothing queued to the responder")
        elif action in ("recv_locked", "recv_busy", "recv_unknown", "recv_taken"):
            assert s is not None
            if not self.deliver_to(self.ends(s)[0]):
                assert not self.strict
                self.diverged.append(f"{action}({params}): nothing queued to the initiator")
        elif action == "chan_break":
            assert s is not None
            ini_end, _ = self.ends(s)
            assert ini_end is not None
            ini_end.channel.break_()
        elif action in ("ini_fail", "resp_fail"):
            assert s is not None
            session = self.ini(s) if action == "ini_fail" else self.resp(s)
            end = self.ends(s)[0 if action == "ini_fail" else 1]
            if session is None or end is None:
                assert not self.strict
                self.diverged.append(f"{action}({params}): no such session")
                return
            if end.closed and not session.done:  # the break or the peer's close reaches it
                while not session.done and self.deliver_to(end):
                    pass
            if not session.done:  # the model's lock timeout
                self.fire(self.node_of(session), session)
            assert session.done, (action, s)
        elif action in ("remove", "expire_idle"):
            sim_node = self.nodes[params["n"]]
            nonce = params["p"] + 1
            if action == "remove":
                sim_node.remove(nonce)
            else:
                with sim_node.pool.lock:
                    sim_node.entry(nonce).expire(ExpiryReason.NO_INBOUND, self.now)
                sim_node.pump()
        elif action == "ping_send":
            p = params["p"]
            ping = self.unsent_ping(p)
            if ping is None:  # the next ping is due on the entry's own timer
                self.fire(self.nodes[self.trace["pinger"][p]])
                ping = self.unsent_ping(p)
            assert ping is not None
            self.pings[p] += self.copies(ping, params.get("c", 1))
        elif action in ("ping_answer", "ping_drop"):
            self.deliver(params["p"], ping=True, copies=params.get("c", 1))
        elif action == "pong_recv":
            self.deliver(params["p"], ping=False)
        elif action in ("lose_ping", "lose_pong"):
            dg = (self.pings if action == "lose_ping" else self.pongs)[params["p"]].pop(0)
            self.sim.network.drop(self.index(dg))
        elif action == "ping_timeout":
            self.fire(self.nodes[self.trace["pinger"][params["p"]]])
        else:
            raise AssertionError(f"unknown model action {action!r}")
        self.check_symmetry()

    # --- keepalive frames ---

    def index(self, dg: InFlight) -> int:
        return next(i for i, x in enumerate(self.sim.network.in_flight) if x is dg)

    def frames(self, p: int, kind: str) -> list[InFlight]:
        """Pair ``p``'s frames of ``kind`` in flight (from the pinger for pings, to it for pongs)."""
        pinger = self.trace["pinger"][p]
        src = self.pairs[p].local(NODES[pinger if kind == "ping" else 1 - pinger]).addr
        return [dg for dg in self.sim.network.in_flight if dg.src == src and frame_kind(dg.data) == kind]

    def unsent_ping(self, p: int) -> InFlight | None:
        """The oldest ping of pair ``p`` the pinger produced and the trace has not put on the wire yet."""
        sent = {id(dg) for dg in self.pings[p]}
        return next((dg for dg in self.frames(p, "ping") if id(dg) not in sent), None)

    def copies(self, dg: InFlight, c: int) -> list[InFlight]:
        """``dg`` and ``c - 1`` duplicates of it, in the order they will be delivered."""
        for _ in range(c - 1):
            self.sim.network.duplicate(self.index(dg))
        i = self.index(dg)
        return self.sim.network.in_flight[i:i + c]

    def deliver(self, p: int, ping: bool, copies: int = 1) -> None:
        """The head frame of pair ``p`` reaches its side; a ponger's answers (``copies`` each) go back."""
        queue = self.pings[p] if ping else self.pongs[p]
        if not queue:
            assert not self.strict
            self.diverged.append(f"no {'ping' if ping else 'pong'} in flight for pair {p}")
            return
        before = {id(dg) for dg in self.frames(p, "pong")}
        self.sim.network.deliver(self.index(queue.pop(0)))
        if ping:
            for pong in [dg for dg in self.frames(p, "pong") if id(dg) not in before]:
                self.pongs[p] += self.copies(pong, copies)

    # --- the end ---

    def run_to_quiescence(self) -> None:
        """Deliver every queued frame and signal in order, then let closes and lock timeouts end what is left."""
        for _ in range(100):
            progressed = False
            for p in range(self.k):
                if self.pings[p] or self.pongs[p]:
                    self.deliver(p, ping=bool(self.pings[p]))
                    progressed = True
            for s in self.takes:
                ini_end, resp_end = self.ends(s)
                if self.deliver_to(resp_end) or self.deliver_to(ini_end):
                    progressed = True
            self.check_symmetry()
            if progressed:
                continue
            live = [x for x in self.sessions() if not x.done]
            if not live:
                return
            for session in live:
                if not session.done and session.get_timer() is not None:
                    self.fire(self.node_of(session), session)
            self.check_symmetry()
        raise AssertionError("replay did not quiesce")

    def state(self, n: int, p: int) -> str:
        return self.nodes[n].state(p + 1) or "Expired"

    def check_symmetry(self) -> None:
        for p in range(self.k):
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
    assert replay.sessions()
    for session in replay.sessions():
        assert session.done, (session.role, session.state)
    if path.stem.startswith("design-01") and settle_time > 0:
        # The responder was still Settling when its entry was removed: it must fail, not wait forever.
        [resp] = [r for s in replay.spec if (r := replay.resp(s)) is not None]
        assert resp.state == "Failed"
    for n, node in enumerate(replay.nodes):
        assert not node.pool.handovers.sessions()
        for p in range(replay.k):
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
    k = replay.k
    for n, node in enumerate(replay.nodes):
        assert not node.pool.handovers.sessions()  # NoLeak: no session holds an entry
        for p in range(k):
            assert replay.state(n, p) in ("Idle", "InUse", "Expired")
    assert replay.sim.stray_deliveries() == []  # CleanHandover: no keepalive frame reached a handed-out pair
    assert replay.sim.silence_violations() == []  # StrictSilence
    # AtomicTake: per node and pair at most one lease, and both sides' leases come from one session.
    for p in range(k):
        sids = {n: [x.outcome.sid for x in replay.sessions()
                    if isinstance(x.outcome, Lease) and x.outcome.nonce == p + 1
                    and x.outcome.entry.local.identity == NODES[n]] for n in (0, 1)}
        assert len(sids[0]) <= 1 and len(sids[1]) <= 1, sids
        if sids[0] and sids[1]:
            assert sids[0] == sids[1]
