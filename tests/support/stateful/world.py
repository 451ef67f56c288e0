"""Two simulated nodes on a manual network with manual signalling, plus a spec-trace recorder.

Everything the stateful test can do to the system is a method here; the
:class:`~tests.support.stateful.machine.HandoverMachine` only chooses which one runs next.
The system under test is :mod:`natpool.sim` itself - two :class:`~natpool.sim.SimNode` s
driving the real pools and sessions - in its manual modes: this module only chooses which
datagram, signal or timer moves next and checks the properties after each one; it
has no driver loop of its own.

* **Network**: :class:`natpool.sim.Simulation` with every link in manual
  mode, so keepalive datagrams wait in ``network.in_flight`` until a rule
  delivers, drops, duplicates or reorders them. One assumption of the spec
  is enforced, as in the model (``ping_timeout`` is honest): a datagram copy
  lives at most :data:`MAX_LIFETIME` after it was sent, and twice that is
  shorter than any ping lifespan, so a ping that timed out has no pong left.
* **Signalling**: ``Simulation(signalling_manual=True)``: every take opens
  a :class:`~natpool.sim.Channel` (a :class:`Link` here) whose two FIFO
  directions only move when a rule delivers their head; a link can break
  (everything queued lost, both ends told at once). A session that ends
  closes its end gracefully: the peer sees the close after everything sent
  before it (the node does that, as every driver must).
* **Trace**: every node's pool gets a :class:`TraceListener`, a
  python-statemachine listener that is bound to every Entry, Initiator and
  Responder machine the runtime fires; each step is checked against the
  spec's tables as it happens, and CleanHandover is checked at the very
  transition into InUse against the network's in-flight set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from natpool import props
from natpool.config import PairConfig
from natpool.core.entry import PairEntry
from natpool.core.handover import InitiatorSession, ResponderSession, Session
from natpool.core.lease import Lease
from natpool.endpoints import EndpointPair
from natpool.errors import HandoverError, UnknownPair
from natpool.machines.tables import TABLES
from natpool.sim import INJECTED, Channel, ChannelEnd, NetConfig, SimNode, Simulation, TakeHandle
from natpool.wire.frame import Frame, Kind
from natpool.wire.frame import encode as encode_frame

A: Final = "a"
B: Final = "b"
NODES: Final = (A, B)
Node = Literal["a", "b"]

#: High byte of the session ids of channels the test opens without an initiator.
BOGUS_SID_TAG: Final = 0xB0

#: Maximum lifetime of a datagram copy in the network (virtual seconds).
MAX_LIFETIME: Final = 0.2


def config(settle: bool) -> PairConfig:
    """Short timers so a few rules reach every timeout.

    2 * MAX_LIFETIME (0.4) < min_drain_grace (0.5) <= any ping life, so a
    timed-out ping and its pong are both gone (the spec's honest timeout).
    With ``settle`` (needed once the network duplicates), settle_time
    exceeds MAX_LIFETIME, so every copy sent before a side locked is gone
    before it hands the pair out.
    """
    return PairConfig(ping_interval=1.0, no_inbound_timeout=6.0, ping_lifespan=0.8, drain_grace_rtts=4.0,
                      min_drain_grace=0.5, lock_timeout=2.0, settle_time=0.3 if settle else 0.0)


@dataclass(frozen=True)
class PairRef:
    """A pair the test created; ``label`` keeps shrunk programs readable (P1, P2, ...)."""

    label: str
    pair: EndpointPair = field(repr=False)
    pinger: str
    sides: tuple[str, ...]  # nodes that added it

    @property
    def nonce(self) -> int:
        return self.pair.nonce

    def __repr__(self) -> str:
        return f"{self.label}(pinger={self.pinger}, on={'+'.join(self.sides)})"


@dataclass(frozen=True)
class Step:
    """One transition the runtime made through a generated machine."""

    seq: int
    at: float
    node: str
    machine: str
    who: str
    source: str
    event: str
    target: str

    def __repr__(self) -> str:
        return (f"#{self.seq} t={self.at:.3f} {self.node}:{self.machine}[{self.who}] "
                f"{self.source} --{self.event}--> {self.target}")


class Violation(AssertionError):
    """A spec property failed on the runtime; the message carries the offending trace."""

    def __init__(self, prop: str, detail: str, trace: list[Step]) -> None:
        self.prop = prop
        self.detail = detail
        lines = "\n".join(f"    {s!r}" for s in trace[-30:])
        super().__init__(f"{prop} violated: {detail}\n  last transitions:\n{lines}")


_MACHINE_OF: Final[dict[type, str]] = {PairEntry: "Entry", InitiatorSession: "Initiator",
                                       ResponderSession: "Responder"}


class TraceListener:
    """python-statemachine listener for one node's pool (entries and sessions)."""

    def __init__(self, world: World, node: str) -> None:
        self.world = world
        self.node = node

    def after_transition(self, event: Any, source: Any, target: Any, model: Any) -> None:
        self.world.record(self.node, model, str(event), str(source.value), str(target.value))


@dataclass(eq=False)
class Link:
    """One take's signalling channel: initiator end on ``ini_node``, responder end on the other node.

    ``handle`` is None for a bogus channel the test opened itself (its
    ``ini_end`` belongs to no session; the messages it sends are the test's).
    """

    id: int
    ini_node: str
    handle: TakeHandle | None
    ini_end: ChannelEnd
    resp_end: ChannelEnd
    world: World = field(repr=False)

    @property
    def channel(self) -> Channel:
        return self.ini_end.channel

    @property
    def broken(self) -> bool:
        return self.channel.broken

    @property
    def resp_node(self) -> str:
        return B if self.ini_node == A else A

    @property
    def initiator(self) -> InitiatorSession | None:
        return self.handle.session if self.handle is not None else None

    @property
    def responder(self) -> ResponderSession | None:
        """The responder session the first message on this channel opened (None before that)."""
        for sim_link in self.world.nodes[self.resp_node].links:
            if sim_link.end is self.resp_end:
                session = sim_link.session
                assert isinstance(session, ResponderSession)
                return session
        return None

    def session(self, node: str) -> Session | None:
        return self.initiator if node == self.ini_node else self.responder

    def end_at(self, node: str) -> ChannelEnd:
        return self.ini_end if node == self.ini_node else self.resp_end

    def __repr__(self) -> str:
        return f"L{self.id}({self.ini_node}->{self.resp_node}{', broken' if self.broken else ''})"


class World:
    """Two nodes, the manual network, the links, and what the invariants need to know."""

    def __init__(self, settle: bool) -> None:
        self.settle = settle
        self.config = config(settle)
        self.sim = Simulation(0, NetConfig(manual=True), config=self.config, record_deliveries=False,
                              signalling_manual=True)
        self.steps: list[Step] = []
        self.violations: list[tuple[str, str]] = []
        self.nodes: dict[str, SimNode] = {
            n: self.sim.add_node(n, listeners=[TraceListener(self, n)]) for n in NODES
        }
        self.pairs: list[PairRef] = []
        self.labels: dict[int, str] = {}  # nonce -> P<k>
        self.entries: dict[tuple[str, int], PairEntry] = {}  # every entry ever added
        self.links: list[Link] = []
        self.sid_names: dict[bytes, str] = {}  # session id -> link label, for readable traces
        self.take_errors: list[tuple[str, str]] = []  # takes refused at once (PairBusy / UnknownPair)
        self.last_state: dict[int, tuple[object, str]] = {}  # id(model) -> (model, last recorded target)
        self.handed: dict[tuple[str, int], int] = {}  # entries that entered InUse, per (node, nonce)
        self._sent_by_pool: set[int] = set()  # datagram ids a pool (not the test) sent
        self._log_seen = 0
        self._silence_seen = 0
        self._outcomes: dict[int, tuple[Session, object]] = {}  # id(session) -> (session, first outcome)
        self._snapshot: dict[tuple[str, int], str] = {}  # entry states as of the last check

    @property
    def now(self) -> float:
        return self.sim.now()

    # --- trace -------------------------------------------------------------------

    def who(self, model: object) -> str:
        if isinstance(model, PairEntry):
            return self.labels.get(model.nonce, f"{model.nonce:#x}")
        if isinstance(model, Session):
            sid = int.from_bytes(model.sid, "big") if model.sid else -1
            if model.sid and model.sid in self.sid_names:
                name = self.sid_names[model.sid]  # a take's channel (named once the take returned)
            elif sid >> 120 == BOGUS_SID_TAG:
                name = f"L{sid & 0xFFFFFFFF}"
            else:
                name = "L?"
            return f"{name}.{model.role[:3]}"
        return type(model).__name__

    def record(self, node: str, model: object, event: str, source: str, target: str) -> None:
        """Called from inside every runtime transition: check it against the spec at once."""
        machine = _MACHINE_OF.get(type(model), type(model).__name__)
        step = Step(len(self.steps) + 1, self.now, node, machine, self.who(model), source, event, target)
        self.steps.append(step)
        if machine not in _MACHINE_OF.values() or not props.spec_allows(machine, source, event, target):
            self.violations.append((props.TRACE, f"the spec does not allow {step!r}"))
        prev = self.last_state.get(id(model))
        if prev is not None and prev[1] != source:
            if not props.symmetry_step(prev[1], source):
                self.violations.append((props.SYMMETRY, f"{step.who} went Locked -> Idle outside the "
                                                        f"generated machine, then {step!r}"))
            self.violations.append((props.TRACE, f"{step!r} starts from {source}, but the last recorded "
                                                 f"state of {step.who} was {prev[1]}"))
        elif prev is None and machine in TABLES and source != TABLES[machine].initial:
            self.violations.append((props.TRACE, f"{step!r} is the first step of {step.who}, "
                                                 f"but does not start from {TABLES[machine].initial}"))
        self.last_state[id(model)] = (model, target)
        if isinstance(model, PairEntry):
            if not props.symmetry_step(source, target):
                self.violations.append((props.SYMMETRY, f"Locked entry returned to Idle: {step!r}"))
            if target == props.IN_USE:
                key = (node, model.nonce)
                self.handed[key] = self.handed.get(key, 0) + 1
                frames = self.keepalive_in_flight(model.pair)
                if not props.clean_handover(source, target, len(frames)):
                    self.violations.append((props.CLEAN_HANDOVER,
                                            f"{step!r} while in flight: {frames}"))

    def keepalive_in_flight(self, pair: EndpointPair) -> list[str]:
        """Keepalive frames of ``pair`` that an entry sent and that are still in the network."""
        log = self.sim.log
        for rec in log[self._log_seen:]:
            if rec.sender != INJECTED:
                self._sent_by_pool.add(rec.id)
        self._log_seen = len(log)
        ends = {(pair.a.addr, pair.b.addr), (pair.b.addr, pair.a.addr)}
        out = []
        for dg in self.sim.network.in_flight:
            if dg.id in self._sent_by_pool and (dg.src, dg.dst) in ends:
                out.append(f"{dg.src[0]}->{dg.dst[0]} {dg.data.hex()} sent@{dg.sent_at:.3f}")
        return out

    def fail(self, prop: str, detail: str) -> None:
        raise Violation(prop, detail, self.steps)

    # --- pairs -------------------------------------------------------------------

    def _ref(self, pair: EndpointPair, pinger: str, sides: tuple[str, ...]) -> PairRef:
        ref = PairRef(f"P{len(self.pairs) + 1}", pair, pinger, sides)
        self.pairs.append(ref)
        self.labels[pair.nonce] = ref.label
        return ref

    def punch(self, pinger: str) -> PairRef:
        """A hole punch that succeeded on both sides."""
        a, b = self.nodes[A], self.nodes[B]
        nonce = self.sim.new_nonce()
        self.labels[nonce] = f"P{len(self.pairs) + 1}"
        pair = self.sim.punch(a, b, nonce=nonce, pinger=self.nodes[pinger])
        for n in NODES:
            self.entries[(n, nonce)] = self.nodes[n].pool.get(nonce)
        return self._ref(pair, pinger, NODES)

    def add_one_side(self, node: str, is_pinger: bool) -> PairRef:
        """A pair only ``node`` knows (the peer never added it, or lost it)."""
        a, b = self.nodes[A], self.nodes[B]
        nonce = self.sim.new_nonce()
        self.labels[nonce] = f"P{len(self.pairs) + 1}"
        pair = EndpointPair(a.endpoint(), b.endpoint(), nonce)
        other = B if node == A else A
        self.entries[(node, nonce)] = self.nodes[node].add(pair, is_pinger)
        return self._ref(pair, node if is_pinger else other, (node,))

    def remove(self, node: str, ref: PairRef) -> None:
        try:
            self.nodes[node].remove(ref.nonce)
        except UnknownPair:
            pass
        self.sync()

    def state(self, node: str, nonce: int) -> str | None:
        """The entry's state, or None when the node does not hold the pair (never added, or gone)."""
        return self.nodes[node].state(nonce)

    # --- takes and sessions ----------------------------------------------------------

    def take(self, node: str, ref: PairRef | None) -> Link | None:
        """take(nonce) with ``ref``, take_any(peer) without; a refusal at once is recorded, not raised."""
        link_id = len(self.links) + 1
        peer = B if node == A else A
        mark = len(self.steps)
        try:
            if ref is None:
                handle = self.nodes[node].take(None, peer)
            else:
                handle = self.nodes[node].take(ref.nonce, None)
        except HandoverError as exc:
            self.take_errors.append((node, type(exc).__name__))
        except UnknownPair:
            self.take_errors.append((node, "UnknownPair"))
        else:
            if handle.end is None:  # the local claim was lost: nothing sent, no channel
                self.take_errors.append((node, type(handle.outcome).__name__))
            else:
                assert handle.session is not None
                link = Link(link_id, node, handle, handle.end, handle.end.peer, self)
                self.links.append(link)
                self.sid_names[handle.session.sid] = f"L{link_id}"
                # The initiator's first step (send_lock) ran inside take(), before its name was known.
                self.steps[mark:] = [replace(st, who=f"L{link_id}.ini") if st.who == "L?.ini" else st
                                     for st in self.steps[mark:]]
                self.sync()
                return link
        self.sync()
        return None

    def open_bogus(self, node: str, data: bytes) -> Link:
        """A channel opened by someone else whose first message is ``data`` (malformed, replayed...)."""
        other = B if node == A else A
        theirs, ours = self.sim.signalling.open(other, self.nodes[node])
        self.nodes[node].serve(ours)
        theirs.send(data)
        link = Link(len(self.links) + 1, other, None, theirs, ours, self)
        self.links.append(link)
        return link

    def sessions(self) -> list[tuple[str, Session]]:
        """Every session either node ran (takes, answers to takes and to bogus channels), in start order."""
        return [(n, sim_link.session) for n in NODES for sim_link in self.nodes[n].links]

    def leases(self) -> list[tuple[str, Lease]]:
        return [(n, s.outcome) for n, s in self.sessions() if isinstance(s.outcome, Lease)]

    def deliver_signal(self, link: Link, to_node: str) -> bool:
        """Deliver the head of ``link``'s direction towards ``to_node``; False if nothing is queued there."""
        sig = self.sim.signalling
        to = link.end_at(to_node)
        for i, pending in enumerate(sig.in_flight):
            if pending.to is to:
                sig.deliver(i)  # the first one queued towards ``to`` is that direction's head
                self.sync()
                return True
        return False

    def inject_signal(self, link: Link, to_node: str, data: bytes) -> None:
        """Put a forged/garbage message in ``link``'s queue towards ``to_node`` (behind what is queued)."""
        self.sim.signalling.inject(link.end_at(to_node), data)

    def break_link(self, link: Link) -> None:
        """The channel fails abruptly: queued messages are lost, both live ends are told now."""
        if link.broken:
            return
        link.channel.break_()
        while self.deliver_signal(link, link.ini_node) or self.deliver_signal(link, link.resp_node):
            pass  # only the two break notices are left on a broken channel
        self.sync()

    def release(self, lease: Lease) -> None:
        self.nodes[lease.entry.local.identity].release(lease)
        self.sync()

    # --- driving ---------------------------------------------------------------------

    def sync(self) -> None:
        """After any input: the nodes have already pumped (as drivers do); check every property.

        Every input, not only every rule: a macro rule (flush, advance, heal_and_run) may pass
        through a violation and out again before the rule ends.
        """
        self.check()

    def _next_deadline(self) -> tuple[float, str] | None:
        """The next thing time brings: a node's timer (entries and sessions), or a datagram's death."""
        cands: list[tuple[float, str]] = []
        t = self.sim.scheduler.next_time()
        if t is not None:
            cands.append((t, "sched"))
        if self.sim.network.in_flight:
            # Lifetime ends first at equal times: the datagram is gone before any timer sees it.
            cands.append((min(dg.sent_at for dg in self.sim.network.in_flight) + MAX_LIFETIME, "\0lifetime"))
        return min(cands) if cands else None

    def advance(self, dt: float) -> None:
        """Let ``dt`` virtual seconds pass: timers fire and old datagrams die, in time order."""
        target = self.now + dt
        for _ in range(100_000):
            nxt = self._next_deadline()
            if nxt is None or nxt[0] > target:
                break
            t, kind = nxt
            if kind == "sched":
                self.sim.step()
            else:
                self.sim.clock.advance_to(max(t, self.now))
                net = self.sim.network
                net.in_flight[:] = [dg for dg in net.in_flight if dg.sent_at + MAX_LIFETIME > self.now]
            self.sync()
        else:
            self.fail(props.LIVENESS, f"livelock: 100000 timer events without reaching t={target} "
                                      f"(a deadline stays due and handling it changes nothing: {nxt})")
        if target > self.now:
            self.sim.clock.advance_to(target)
        self.sync()

    def deliver_datagram(self, i: int) -> None:
        self.sim.network.deliver(i)
        self.sync()

    def drop_datagram(self, i: int) -> None:
        self.sim.network.drop(i)

    def duplicate_datagram(self, i: int) -> None:
        self.sim.network.duplicate(i)

    def inject_datagram(self, node: str, ref: PairRef, kind: str, junk: bytes) -> None:
        """A datagram from outside the pools towards ``node``'s end of ``ref``; never a keepalive of the pair.

        (A well-formed frame of the pair from the peer's own address would be
        indistinguishable from a keepalive: the spec's network has no forger.)
        """
        dst = ref.pair.local(node).addr
        host, port = ref.pair.remote(node).addr
        if kind == "garbage":
            src, data = (host, port), junk
        elif kind == "wrong_nonce":
            src, data = (host, port), encode_frame(Frame((ref.nonce ^ 0x5A5A) or 1, Kind.PING))
        else:  # "foreign": a well-formed frame of the pair from another port
            src, data = (host, port % 65535 + 1), encode_frame(Frame(ref.nonce, Kind.PONG))
        self.sim.inject(src, dst, data)

    def flush(self) -> None:
        """Deliver every queued signal and in-flight datagram (and what they trigger) without time passing."""
        sig, net = self.sim.signalling, self.sim.network
        for _ in range(100_000):
            if sig.in_flight:
                sig.deliver(0)  # the oldest message overall: always the head of its direction
            elif net.in_flight:
                net.deliver(0)
            else:
                return
            self.sync()
        raise AssertionError("flush() did not quiesce")  # pragma: no cover

    def heal_and_run(self, duration: float) -> None:
        """Liveness run: no more faults; every message and datagram is delivered promptly while time runs on."""
        end = self.now + duration
        for _ in range(100_000):
            self.flush()
            nxt = self._next_deadline()
            if nxt is None or nxt[0] > end:
                break
            self.advance(max(0.0, nxt[0] - self.now))
        self.advance(max(0.0, end - self.now))

    # --- invariants ------------------------------------------------------------------

    def check(self) -> None:
        """Every safety property and the trace, after every step; raises :class:`Violation`.

        Properties first, so a bug that both breaks a property and bypasses the
        generated machines is reported by the property it breaks.
        """
        self.check_atomic_take()
        self.check_strict_silence()
        self.check_symmetry()
        self.check_no_leak()
        for prop, detail in self.violations:  # CleanHandover and Symmetry found at a transition
            if prop != props.TRACE:
                self.fail(prop, detail)
        if self.violations:
            self.fail(*self.violations[0])
        self.check_trace_projection()

    def check_trace_projection(self) -> None:
        """The runtime's own state equals the last target its machines recorded (or the initial state)."""
        models: list[tuple[str, object, str]] = [("Entry", e, e.state) for e in self.entries.values()]
        models += [(_MACHINE_OF[type(s)], s, s.state) for _, s in self.sessions()]
        for machine, model, state in models:
            rec = self.last_state.get(id(model))
            expected = rec[1] if rec is not None else TABLES[machine].initial
            if state != expected:
                self.fail(props.TRACE, f"{machine} {self.who(model)} is {state} at runtime, but its last "
                                       f"recorded transition left it {expected}")
        for node, n in self.nodes.items():
            for e in n.pool.entries():
                if self.entries.get((node, e.nonce)) is not e:
                    self.fail(props.TRACE, f"{node} holds an entry the test never added: {e!r}")

    def check_atomic_take(self) -> None:
        for node, n in self.nodes.items():
            nonces = [e.nonce for e in n.pool.entries()]
            if len(nonces) != len(set(nonces)):
                self.fail(props.ATOMIC_TAKE, f"{node} holds two entries with one nonce: {nonces}")
        holders: dict[tuple[str, int], list[str]] = {}
        for node, s in self.sessions():
            if not s.done and s.entry is not None:
                holders.setdefault((node, s.nonce), []).append(self.who(s))
        leases: dict[tuple[str, int], int] = {}
        for node, lease in self.leases():
            leases[(node, lease.nonce)] = leases.get((node, lease.nonce), 0) + 1
        for key in set(holders) | set(self.handed) | set(leases):
            handed = max(self.handed.get(key, 0), leases.get(key, 0))
            if not props.atomic_take(handed, len(holders.get(key, []))):
                self.fail(props.ATOMIC_TAKE, f"{key[0]}:{self.labels.get(key[1])} handed out {handed} times, "
                                             f"live holders {holders.get(key, [])}")

    def check_strict_silence(self) -> None:
        log = self.sim.log
        start, self._silence_seen = self._silence_seen, len(log)
        for rec in log[start:]:
            if not props.strict_silence(rec.state):
                self.fail(props.STRICT_SILENCE, f"{rec.sender} sent a {rec.kind} of "
                                                f"{self.labels.get(rec.nonce)} while {rec.state} at t={rec.time}")

    def check_symmetry(self) -> None:
        """State part on every pair; action part (never Locked -> Idle) on the runtime's own states
        between two steps, which also catches a change that bypassed the generated machine."""
        for ref in self.pairs:
            for node in NODES:
                other = B if node == A else A
                mine, theirs = self.state(node, ref.nonce), self.state(other, ref.nonce)
                if not props.symmetry(mine, theirs):
                    self.fail(props.SYMMETRY, f"{ref.label}: {node} is {mine} but {other} is {theirs}")
        for (node, nonce), entry in self.entries.items():
            before = self._snapshot.get((node, nonce))
            if not props.symmetry_step(before, entry.state):
                self.fail(props.SYMMETRY, f"{node}:{self.labels.get(nonce)} went from {before} to {entry.state}")
            self._snapshot[(node, nonce)] = entry.state

    def check_no_leak(self) -> None:
        """NoLeak: held entries have a live owner; a role is done exactly when its machine is final,
        and its outcome, once set, never changes (one outcome per side)."""
        for node, s in self.sessions():
            machine = _MACHINE_OF[type(s)]
            final = s.state in TABLES[machine].final
            if s.done != final:
                self.fail(props.NO_LEAK, f"{node}: {machine} {self.who(s)} is {s.state} but "
                                         f"{'done' if s.done else 'not done'} ({s.outcome!r})")
            first = self._outcomes.setdefault(id(s), (s, s.outcome))[1]
            if first is not None and s.outcome is not first:
                self.fail(props.NO_LEAK, f"{self.who(s)} changed its outcome from {first!r} to {s.outcome!r}")
            if first is None and s.outcome is not None:
                self._outcomes[id(s)] = (s, s.outcome)
        for node, n in self.nodes.items():
            reg = n.pool.handovers
            for e in n.pool.entries():
                owner = reg.owner(e.nonce)
                live = owner is not None and not owner.done and owner.entry is e
                if not props.no_leak(e.state, live):
                    self.fail(props.NO_LEAK, f"{node}:{self.labels.get(e.nonce)} is {e.state} "
                                             f"without a live owning session (owner {owner!r})")

    def check_liveness(self) -> None:
        """After :meth:`heal_and_run`: every take returned, every role ended, nothing InLocking/Locked."""
        for node, s in self.sessions():
            if not s.done:
                self.fail(props.LIVENESS, f"{node}: session {self.who(s)} still {s.state} after healing")
        for node, n in self.nodes.items():
            for e in n.pool.entries():
                if props.stuck(e.state):
                    self.fail(props.LIVENESS, f"{node}:{self.labels.get(e.nonce)} stuck {e.state} after healing")
            if n.pool.handovers.sessions():
                self.fail(props.LIVENESS, f"{node}: sessions still registered: {n.pool.handovers.sessions()}")
