"""A tiny deterministic two-node harness for the sans-IO handover tests.

Two real :class:`PairPool` s, one shared virtual clock, a heap of pending
deliveries. UDP datagrams travel between the pair's endpoints after
``udp_delay`` (a filter may drop or duplicate them); signals travel over
per-session FIFO links after ``sig_delay`` and can be broken. Nothing here
reads a wall clock: every ``now`` is the harness's.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from natpool.config import PairConfig
from natpool.core.entry import EntryOutput, StateChanged
from natpool.core.handover import InitiatorSession, ResponderSession, Session
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair
from natpool.wire import signal as wire
from natpool.wire.frame import Kind
from natpool.wire.frame import decode as decode_frame

A, B = "alice", "bob"
HOSTS = {A: "10.0.0.1", B: "10.0.0.2"}


@dataclass(frozen=True)
class Sent:
    """One keepalive datagram as it left a node."""

    at: float
    sender: str
    nonce: int
    kind: Kind
    state: str  # the sender entry's state when it sent


@dataclass
class Link:
    """One session's signalling channel: initiator end on ``a``, responder end on ``b``."""

    net: Net
    a: str
    b: str
    initiator: InitiatorSession
    responder: ResponderSession | None = None
    broken: bool = False
    closed: dict[str, bool] = field(default_factory=dict)  # end node -> it closed its end
    notified: dict[str, bool] = field(default_factory=dict)  # end node -> saw channel_closed
    messages: list[tuple[float, str, wire.Signal | bytes]] = field(default_factory=list)
    break_after: Callable[[str, bytes], bool] | None = None  # (sender, data) -> break once delivered
    drop_in_flight: Callable[[str, bytes], bool] | None = None  # (sender, data) -> break before delivery
    tamper: Callable[[str, bytes], list[bytes]] | None = None  # (sender, data) -> what is delivered instead

    def session(self, node: str) -> Session | None:
        return self.initiator if node == self.a else self.responder

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a

    def send(self, sender: str, data: bytes) -> None:
        if self.broken or self.closed.get(sender):
            return
        try:
            logged: wire.Signal | bytes = wire.decode(data)
        except Exception:
            logged = data
        self.messages.append((self.net.now, sender, logged))
        if self.drop_in_flight is not None and self.drop_in_flight(sender, data):
            self.break_()
            return
        for out in self.tamper(sender, data) if self.tamper is not None else [data]:
            self.net.after(self.net.sig_delay, partial(self._deliver, sender, out))

    def _deliver(self, sender: str, data: bytes) -> None:
        if self.broken:
            return
        dst = self.other(sender)
        now = self.net.now
        if dst == self.b and self.responder is None:
            self.responder = self.net.pools[dst].accept_session(data, now)
        else:
            session = self.session(dst)
            assert session is not None
            session.receive_signal(data, now)
        if self.break_after is not None and self.break_after(sender, data):
            self.break_()

    def close(self, node: str) -> None:
        """Graceful close: in-flight messages still arrive, then the peer sees the close."""
        if self.closed.get(node) or self.broken:
            return
        self.closed[node] = True
        peer = self.other(node)
        self.net.after(self.net.sig_delay, lambda: self._notify(peer))

    def break_(self) -> None:
        """The channel fails: in-flight messages are lost, both ends notice now."""
        if self.broken:
            return
        self.broken = True
        for node in (self.a, self.b):
            self._notify(node)

    def _notify(self, node: str) -> None:
        if self.notified.get(node):
            return
        self.notified[node] = True
        session = self.session(node)
        if session is not None:
            session.channel_closed(self.net.now)


class Net:
    """Two pools, a virtual clock, a delivery heap and the session links."""

    def __init__(self, config: PairConfig | None = None, udp_delay: float = 0.005, sig_delay: float = 0.02) -> None:
        self.config = config if config is not None else PairConfig()
        self.now = 0.0
        self.udp_delay = udp_delay
        self.sig_delay = sig_delay
        self.pools = {n: PairPool(n, self.config) for n in (A, B)}
        self.links: list[Link] = []
        self.log: list[Sent] = []
        self.udp_copies: Callable[[Sent], int] = lambda _s: 1  # 0 = lost, 2 = duplicated
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._port = itertools.count(40000)
        self._event_log: dict[str, list[EntryOutput]] = {A: [], B: []}
        self.checks: list[Callable[[Net], None]] = [_symmetry_everywhere]  # run after every step

    # -- setup --

    def add_pair(self, nonce: int, pinger: str = A) -> EndpointPair:
        pair = EndpointPair(Endpoint(A, HOSTS[A], next(self._port)), Endpoint(B, HOSTS[B], next(self._port)), nonce)
        for node, pool in self.pools.items():
            pool.add(pair, node == pinger, self.now)
        self.flush()
        return pair

    def take(self, node: str, nonce: int | None = None, peer: str | None = None, *,
             break_after: Callable[[str, bytes], bool] | None = None,
             drop_in_flight: Callable[[str, bytes], bool] | None = None,
             tamper: Callable[[str, bytes], list[bytes]] | None = None) -> Link:
        """Start a take on ``node`` (raises PairBusy/UnknownPair like the pool) and open its link."""
        session = self.pools[node].start_take(nonce, peer, self.now)
        link = Link(self, node, B if node == A else A, session, break_after=break_after,
                    drop_in_flight=drop_in_flight, tamper=tamper)
        self.links.append(link)
        self.flush()
        return link

    # -- running --

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), fn))

    def sessions(self) -> list[tuple[Link, str, Session]]:
        out: list[tuple[Link, str, Session]] = []
        for link in self.links:
            for node in (link.a, link.b):
                s = link.session(node)
                if s is not None:
                    out.append((link, node, s))
        return out

    def flush(self) -> None:
        """Move every queued datagram and signal onto the wire, and close ended sessions' channels."""
        for node, pool in self.pools.items():
            for nonce, data, _addr in pool.datagrams_to_send(self.now):
                frame = decode_frame(data)
                entry = pool.get(nonce)
                sent = Sent(self.now, node, nonce, frame.kind, entry.state)
                self.log.append(sent)
                dst = B if node == A else A
                for _ in range(self.udp_copies(sent)):
                    self.after(self.udp_delay, partial(self._arrive, dst, nonce, data, entry.local.addr))
        for link, node, session in self.sessions():
            for data in session.signals_to_send():
                link.send(node, data)
            if session.done:
                link.close(node)

    def _arrive(self, node: str, nonce: int, data: bytes, src: tuple[str, int]) -> None:
        self.pools[node].receive_datagram(nonce, data, src, self.now)

    def _next_time(self) -> float | None:
        times = [self._heap[0][0]] if self._heap else []
        times += [t for p in self.pools.values() if (t := p.get_timer()) is not None]
        times += [t for _, _, s in self.sessions() if (t := s.get_timer()) is not None]
        return min(times) if times else None

    def step(self, limit: float) -> bool:
        t = self._next_time()
        if t is None or t > limit:
            return False
        self.now = max(self.now, t)
        while self._heap and self._heap[0][0] <= self.now:
            _, _, fn = heapq.heappop(self._heap)
            fn()
            self.flush()
        for pool in self.pools.values():
            pt = pool.get_timer()
            if pt is not None and pt <= self.now:
                pool.handle_timer(self.now)
        for _, _, s in self.sessions():
            st = s.get_timer()
            if st is not None and st <= self.now:
                s.handle_timer(self.now)
        self.flush()
        for check in self.checks:
            check(self)
        return True

    def run_until(self, limit: float, until: Callable[[], bool] | None = None) -> None:
        steps = 0
        while not (until is not None and until()) and self.step(limit):
            steps += 1
            assert steps < 100_000, "harness did not quiesce"
        if until is None or not until():
            self.now = max(self.now, limit)

    def run_sessions(self, limit: float = 30.0) -> None:
        """Run until every session has ended and its channel traffic is delivered."""
        self.run_until(self.now + limit, lambda: all(s.done for _, _, s in self.sessions()) and not self._heap)

    # -- inspection --

    def state(self, node: str, nonce: int) -> str:
        pool = self.pools[node]
        return pool.get(nonce).state if nonce in pool else "Expired"

    def locked_at(self, node: str, nonce: int) -> float | None:
        for ev in self.events(node):
            if isinstance(ev, StateChanged) and ev.nonce == nonce and ev.target == "Locked":
                return ev.at
        return None

    def events(self, node: str) -> list[EntryOutput]:
        """Every event of ``node``'s pool so far (drained from the pool into a log)."""
        pool = self.pools[node]
        out: list[EntryOutput] = []
        while (ev := pool.next_event()) is not None:
            out.append(ev)
        self._event_log[node].extend(out)
        return self._event_log[node]


# --- assertions shared by the handover tests ---


def types(link: Link) -> list[str]:
    """The decodable signal types that crossed ``link``, in send order."""
    return [m.type.name for _, _, m in link.messages if not isinstance(m, bytes)]


def _symmetry_everywhere(net: Net) -> None:
    nonces = {e.nonce for pool in net.pools.values() for e in pool.entries()}
    for nonce in nonces:
        assert_symmetry(net, nonce)


def assert_symmetry(net: Net, nonce: int) -> None:
    """Never one side InUse while the other is Idle (spec Symmetry)."""
    states = {net.state(A, nonce), net.state(B, nonce)}
    assert states != {"InUse", "Idle"}, states


def assert_no_leak(net: Net, nonce: int) -> None:
    """Every session ended, none still owns an entry, and no entry is stuck claimed."""
    for _, _, s in net.sessions():
        assert s.done
    for node, pool in net.pools.items():
        assert not pool.handovers.sessions(), node
        assert net.state(node, nonce) in ("Idle", "InUse", "Expired"), (node, net.state(node, nonce))


def assert_silent_after_lock(net: Net, nonce: int) -> None:
    """StrictSilence: no keepalive frame leaves a side after its entry locked."""
    for node in (A, B):
        locked = net.locked_at(node, nonce)
        assert locked is not None, node
        late = [s for s in net.log if s.sender == node and s.nonce == nonce and s.at >= locked]
        assert late == [], late


def leases(link: Link) -> list[Lease]:
    out = []
    for node in (link.a, link.b):
        s = link.session(node)
        if s is not None and isinstance(s.outcome, Lease):
            out.append(s.outcome)
    return out
