"""The registry of pair entries on one node: lookup, claim (CAS) and one scheduler.

Sans-IO and thread-safe: one ``threading.Lock`` guards the registry and every
transition the pool makes; nothing blocks or awaits while holding it. Entries
report each event to the pool as it happens (:class:`EntryObserver`), which is
how the indexes, the timer heap and the event queue stay consistent even when
a handover session drives an entry directly (it must hold :attr:`PairPool.lock`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import natpool.fsm as fsm
from natpool.config import PairConfig
from natpool.core.entry import (
    TIMER_SLACK,
    Drained,
    EntryOutput,
    ExpiryReason,
    PairEntry,
    StateChanged,
)
from natpool.core.handover import HandoverRegistry, InitiatorSession, ResponderSession
from natpool.endpoints import EndpointPair
from natpool.errors import DropReason, DuplicateNonce, EventBacklog, PairBusy, UnknownPair
from natpool.machines.tables import ENTRY

_log = logging.getLogger(__name__)

_IDLE = ENTRY.initial
_FINAL = ENTRY.final
_IN_LOCKING: Final = "InLocking"
_new_event: Final = tuple.__new__  # StateChanged / Drained without a NamedTuple's keyword-parsing ``__new__``

#: How take_any's claim queues its two events: the plain tuple ``(nonce, at)`` (the payload of both) stands for
#: ``StateChanged(nonce, Idle, InLocking, begin_lock, None, at)`` and the ``None`` right behind it for
#: ``Drained(nonce, at)``. :meth:`PairPool.next_event` builds the events when it hands them out, so a driver
#: sees exactly what it saw before, and ``pending_events`` counts two; building two NamedTuples costs more
#: than the rest of the claim's bookkeeping, and the claim is the CAS every other take waits for.
_QueuedClaim = tuple[int, float] | None
_odict_popitem: Final = OrderedDict.popitem

#: Default bound on undrained events (``next_event``). A driver that drains after every call
#: never comes near it (one call adds at most one event per entry it touches); past it, inputs
#: that make events raise :class:`EventBacklog` before changing anything.
MAX_PENDING_EVENTS = 100_000

#: The scheduler rebuilds its timer containers when their stale slots outnumber the live ones by this many.
_REBUILD_EVERY = 1024
#: It checks for that every this many pushes. At most 256: the countdown then stays among CPython's cached
#: small ints, so a push allocates no int (the check itself is O(1)).
_CHECK_EVERY = 256
_INF: Final = math.inf


class _Observer:
    """The pool's side of :class:`EntryObserver`, kept off the public API."""

    __slots__ = ("_pool", "entry_claimed", "entry_event")

    def __init__(self, pool: PairPool) -> None:
        self._pool = pool
        # The pool's handlers themselves (one call less per event than a method forwarding to them).
        self.entry_event: Callable[[PairEntry, EntryOutput], None] = pool._on_event
        self.entry_claimed: Callable[[PairEntry, StateChanged, Drained], None] = pool._on_claimed

    def entry_drop(self, entry: PairEntry, reason: DropReason) -> None:
        self._pool.drops[reason] += 1


class _Claims:
    """The pool's side of :class:`~natpool.core.handover.EntryClaims`: what handover sessions may call.

    The sessions get this instead of the pool (lock held by the caller). It
    looks the pool's methods up at each call, so a test that patches
    ``PairPool._claim_locked`` on the class (tests/support/stateful/mutants.py) is seen.
    """

    __slots__ = ("_pool",)

    def __init__(self, pool: PairPool) -> None:
        self._pool = pool

    def lookup(self, nonce: int) -> PairEntry:
        return self._pool._get(nonce)

    def claim(self, nonce: int, now: float) -> PairEntry:
        return self._pool._claim_locked(nonce, now)

    def claim_any(self, peer: str, now: float) -> PairEntry:
        return self._pool._claim_any_locked(peer, now)

    def dispatch(self) -> None:
        if self._pool._route:
            self._pool._dispatch()


class PairPool:
    """All pairs this node holds, indexed by nonce and by peer identity.

    Per peer the pool keeps an insertion-ordered index of the Idle nonces
    (an ``OrderedDict``: a plain dict's ``next(iter(d))`` degrades to O(n)
    after deletions at its front), so ``claim_any`` is O(1).

    Events queue until the driver drains them with :meth:`next_event` (O(1)
    each). The queue is bounded by backpressure, not by dropping: once
    ``max_pending_events`` are waiting, the inputs that make events
    (``receive_datagram``, ``receive_and_reply``, ``handle_timer``, ``claim``,
    ``claim_any``) raise :class:`EventBacklog` and change nothing, until the
    driver drains. Removal and close are never refused.

    Drivers use :class:`natpool.core.node.Node`, not this: the node owns a
    pool (``node.pool``) and its handover sessions, and merges their outputs
    and timers into one. :meth:`start_take` / :meth:`accept_session` return
    a bare session whose signals, timer and end the caller must handle
    itself; the node is built on them, and tests of the session logic call
    them directly. The class stays public for those and for compatibility.
    """

    def __init__(
        self, local_identity: str, config: PairConfig | None = None, listeners: Sequence[object] = (),
        *, max_pending_events: int = MAX_PENDING_EVENTS,
    ) -> None:
        self.local_identity = local_identity
        self.config = config if config is not None else PairConfig()
        self.listeners = tuple(listeners)
        self.drops: Counter[DropReason] = Counter()
        self.lock = threading.Lock()
        self._observer = _Observer(self)
        self._entries: dict[int, PairEntry] = {}
        self._by_peer: dict[str, dict[int, PairEntry]] = {}
        # peer -> its Idle entries by nonce, longest-idle first (the value saves take_any a lookup in _entries)
        self._idle: dict[str, OrderedDict[int, PairEntry]] = {}
        # Undelivered events, oldest first. take_any's claim queues its two events as markers that
        # ``next_event`` turns into the events (see _QueuedClaim): the claim holds the lock ~0.3 µs less.
        self._events: deque[EntryOutput | _QueuedClaim] = deque()
        self._claim_marker: tuple[int, float] = (0, 0.0)  # the last (nonce, at) next_event expanded
        self._markers = False  # a claim marker may be queued (else drain_events copies the queue as it is)
        # The earliest deadline given a timer slot since the driver last read the earliest (Node.earlier_timer
        # resets it): a wake-up armed no later than this needs no new read. Every slot goes through _push or
        # one of its two inlined copies: _push and claim_any's lower it; _rearm's appends behind a FIFO tail.
        self._min_pushed = math.inf
        self.max_pending_events = max_pending_events
        self._outbox: dict[int, None] = {}  # nonces with queued datagrams (an ordered set)
        # Deadlines live in three containers: two FIFOs for the (common) pushes that are no earlier
        # than one's tail — every deadline is "now + a constant", so a run of adds or expiries arrives
        # in order, and so does a run of claims (now + lock_timeout, earlier than the Idle deadlines
        # in the first: hence the second) at an O(1) append/popleft each — and a heap for the rest.
        # All are lazily invalidated against ``PairEntry._armed`` the same way; the earliest item is the timer.
        # Items hold the entry itself, not its nonce: checking a slot is an attribute read, not a lookup in a
        # dict as large as the pool (cold in the CPU cache at 100k pairs).
        self._heap: list[tuple[float, int, PairEntry]] = []  # (deadline, seq, entry)
        self._fifo: deque[tuple[float, PairEntry]] = deque()  # (deadline, entry), deadlines non-decreasing
        self._fifo2: deque[tuple[float, PairEntry]] = deque()  # the same, for the runs that fit no tail of _fifo
        # _fifo2's last deadline while it is non-empty (both appends set it); once it empties, a bound that may
        # be too high, which only sends claim_any's append to _push. It saves claim_any a deque index.
        self._fifo2_tail = -math.inf
        # ``entry._armed``: the entry's deadline as this pool scheduled it (None: not armed, or gone). Its slot may
        # carry an earlier time: a deadline that moved later (the ponger's no-inbound deadline on every ping) is
        # not pushed again but re-pushed when the old slot reaches the top, so most datagrams cost no push.
        # Items whose time is not the entry's ``_armed`` are stale. ``get_timer`` stays exact.
        self._pushes = _CHECK_EVERY  # pushes left until the next stale-item check
        self._seq = itertools.count()
        #: The handover sessions of this pool: each event of an entry a session owns waits here until
        #: the end of the public call that raised it (:meth:`_dispatch`), so an entry's method always
        #: returns before its owner reacts: nothing re-enters an entry from inside its own transition.
        self._handovers = HandoverRegistry(self.lock, self.drops, self.listeners, claims=_Claims(self))
        self._session_owners = self._handovers.owners
        self._route: deque[EntryOutput] = deque()

    # --- registry ---------------------------------------------------------------

    def add(self, pair: EndpointPair, is_pinger: bool, now: float, key: bytes | None = None) -> PairEntry:
        """Register a freshly punched pair as Idle; raises InvalidPair/DuplicateNonce/InvalidKey, changing nothing.

        ``key``: the per-pair secret (16..64 bytes) both ends got from the traversal layer's authenticated
        session (see ``natpool.core.entry.check_key``): keepalives are then keyed frames that only the peer
        can make (natpool.wire.keepalive). None: the legacy astrald frame, unauthenticated.
        """
        pair.validate()
        pair.local(self.local_identity)
        with self.lock:
            if pair.nonce in self._entries:
                raise DuplicateNonce(f"pair {pair.nonce:#x} is already in the pool")
            entry = PairEntry(
                pair, self.local_identity, is_pinger, self.config, now, self.listeners, observer=self._observer,
                key=key,
            )
            peer = entry.remote.identity
            self._entries[pair.nonce] = entry
            self._by_peer.setdefault(peer, {})[pair.nonce] = entry
            self._idle.setdefault(peer, OrderedDict())[pair.nonce] = entry
            self._touched(entry)
            return entry

    def get(self, nonce: int) -> PairEntry:
        with self.lock:
            return self._get(nonce)

    def entries(self, peer: str | None = None) -> list[PairEntry]:
        """Live entries, all or with one peer."""
        with self.lock:
            if peer is None:
                return list(self._entries.values())
            return list(self._by_peer.get(peer, {}).values())

    def idle_count(self, peer: str | None = None) -> int:
        with self.lock:
            if peer is None:
                return sum(len(idle) for idle in self._idle.values())
            return len(self._idle.get(peer, ()))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._entries

    def remove(self, nonce: int, now: float) -> PairEntry:
        """Close a pair for good: expire(CLOSED), which also drops it from the pool."""
        with self.lock:
            entry = self._get(nonce)
            entry.expire(ExpiryReason.CLOSED, now)
            if self._route:
                self._dispatch()
            return entry

    def _get(self, nonce: int) -> PairEntry:
        entry = self._entries.get(nonce)
        if entry is None:
            raise UnknownPair(f"no pair {nonce:#x} in the pool")
        return entry

    # --- claim (the CAS of Take) -------------------------------------------------

    def claim(self, nonce: int, now: float) -> PairEntry:
        """Claim one pair (Idle -> InLocking); UnknownPair, or PairBusy if not Idle."""
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            self._check_backlog()
            return self._claim_locked(nonce, now)
        finally:
            lock.release()

    def claim_any(self, peer: str, now: float) -> PairEntry:
        """Claim the longest-idle pair with ``peer``; PairBusy if none is Idle.

        take_any's hot path, written out in one frame (a call into a locked
        helper cost ~5 % of it). The claim of a drained entry (every ponger, a
        pinger between pings) steps the table's row here (what
        ``PairEntry.claim_drained`` does) and indexes it as :meth:`_on_claimed`
        would, with the peer's idle index and the entry at hand; its two events
        are queued as markers (:data:`_QueuedClaim`). Pings outstanding,
        listeners or strict mode: ``begin_lock``, the general transition.
        ``tests/core/test_pool.py`` checks that both give the same events,
        order and timer.
        """
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            events = self._events
            if len(events) >= self.max_pending_events:
                self._check_backlog()
            try:
                # The longest-idle one, out of the index in one call. The unbound method: an OrderedDict has an
                # instance dict, so ``idle.popitem`` is a lookup the interpreter cannot specialise (~0.1 µs).
                nonce, entry = _odict_popitem(self._idle[peer], False)
            except KeyError:  # no index for this peer, or an empty one
                raise PairBusy(f"no Idle pair with peer {peer!r}") from None
            if entry._pings or entry._listeners or fsm._strict:
                # Pings outstanding, listeners or strict mode: the general transition (its event re-indexes).
                idle = self._idle[peer]
                idle[nonce] = entry
                idle.move_to_end(nonce, False)
                if not entry.begin_lock(now):  # pragma: no cover - the index follows every transition
                    raise AssertionError(f"idle index lists pair {nonce:#x} in state {entry.state}")
                return entry
            # PairEntry.claim_drained inlined (the table's (Idle, begin_lock) row, checked at import in entry.py):
            # no ping outstanding, none queued, so all of its bookkeeping is the lock start.
            entry.state = _IN_LOCKING
            entry._now = entry._lock_started = now
            events.append((nonce, now))  # StateChanged(Idle -> InLocking), built by next_event (see _QueuedClaim)
            events.append(None)  # Drained(nonce, now), likewise
            self._markers = True  # drain_events must expand them
            if entry._pongs:  # has_output: a drained claim has no ping queued, only pongs may wait
                self._outbox[nonce] = None
            deadline = now + self.config.lock_timeout
            current = entry._armed
            if current is None or current > deadline:  # the usual case: an Idle deadline is later
                entry._armed = deadline
                # _push inlined for the claims' own FIFO (their deadlines arrive in order; any container
                # whose order it keeps will do). Not counted towards the stale-slot check: the entry's
                # becoming Idle was (see _check_stale).
                if self._fifo2_tail <= deadline:
                    self._fifo2.append((deadline, entry))
                    self._fifo2_tail = deadline
                    if deadline < self._min_pushed:
                        self._min_pushed = deadline
                else:
                    self._push(deadline, entry)
            elif current != deadline:  # later: its slot stays, and re-slots when it reaches the top
                entry._armed = deadline
            # No routing: an Idle entry has no session (a take's session binds after its claim).
            return entry
        finally:
            lock.release()

    def _claim_locked(self, nonce: int, now: float) -> PairEntry:
        """``claim`` body; the caller holds :attr:`lock`."""
        entry = self._get(nonce)
        if not entry.begin_lock(now):
            raise PairBusy(f"pair {nonce:#x} is {entry.state}, not Idle")
        return entry

    def _claim_any_locked(self, peer: str, now: float) -> PairEntry:
        """A session's ``take_any`` claim; the caller holds :attr:`lock`.

        The general transition on the longest-idle pair, not :meth:`claim_any`'s
        inlined row: a take pays ~0.4 ms in messages, and one copy of the
        inlined bookkeeping is enough to keep in step with the table.
        """
        idle = self._idle.get(peer)
        if not idle:
            raise PairBusy(f"no Idle pair with peer {peer!r}")
        return self._claim_locked(next(iter(idle)), now)

    # --- aggregate sans-IO driving -------------------------------------------------

    def receive_datagram(self, nonce: int, data: bytes, addr: tuple[str, int], now: float) -> None:
        """Hand a datagram that arrived on pair ``nonce``'s socket to its entry; never raises on bad input."""
        lock = self.lock  # hot: the same inlining as receive_and_reply
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            if len(self._events) >= self.max_pending_events:
                self._check_backlog()
            entries = self._entries
            entry = entries.get(nonce)
            if entry is None:
                self.drops[DropReason.WRONG_NONCE] += 1
                _log.debug("dropped datagram from %s for unknown pair %#x", addr, nonce)
                return
            entry.receive_datagram(data, addr, now)
            if entries.get(nonce) is entry:  # else expired and gone meanwhile
                self._rearm(entry)
            if self._route:
                self._dispatch()
        finally:
            lock.release()

    def receive_and_reply(self, nonce: int, data: bytes, addr: tuple[str, int],
                          now: float) -> list[tuple[bytes, tuple[str, int]]]:
        """``receive_datagram``, returning that entry's frames due now (the pong) in the same lock hold.

        The hot path of a driver that answers on the socket the datagram came in on:
        no outbox round trip. Other entries' queued output stays for ``datagrams_to_send``.
        """
        # Hot path: ``_check_backlog`` and ``_touched`` inlined (one call per datagram saved each).
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            if len(self._events) >= self.max_pending_events:
                self._check_backlog()
            entries = self._entries
            entry = entries.get(nonce)
            if entry is None:
                self.drops[DropReason.WRONG_NONCE] += 1
                _log.debug("dropped datagram from %s for unknown pair %#x", addr, nonce)
                return []
            entry.receive_datagram(data, addr, now)
            out = entry.datagrams_to_send(now) if entry.has_output else []
            if entries.get(nonce) is entry:  # else expired and gone meanwhile
                self._rearm(entry)
            if self._route:
                self._dispatch()
            return out
        finally:
            lock.release()

    def has_pending_output(self) -> bool:
        """True when ``datagrams_to_send`` has something to return."""
        return bool(self._outbox)

    def datagrams_to_send(self, now: float) -> list[tuple[int, bytes, tuple[str, int]]]:
        """Every frame due now, as (nonce, data, addr); only entries with queued output are visited."""
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            out: list[tuple[int, bytes, tuple[str, int]]] = []
            append, entries = out.append, self._entries
            for nonce in self._outbox:
                entry = entries.get(nonce)
                if entry is not None:
                    for data, addr in entry.datagrams_to_send(now):
                        append((nonce, data, addr))
            self._outbox.clear()
            return out
        finally:
            lock.release()

    def send_failed(self, nonce: int, now: float) -> None:
        """The driver could not send on pair ``nonce``; a stale nonce (already gone) is ignored."""
        with self.lock:
            entry = self._entries.get(nonce)
            if entry is not None:
                entry.send_failed(now)
                self._touched(entry)
                if self._route:
                    self._dispatch()

    def get_timer(self) -> float | None:
        """Earliest deadline of any entry."""
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            return self._earliest()
        finally:
            lock.release()

    def handle_timer(self, now: float, max_entries: int | None = None) -> None:
        """Run every entry due by ``now`` (+ :data:`TIMER_SLACK`), each once, earliest deadline first.

        ``max_entries`` bounds how many run in this call (a driver's way to keep
        one callback short when thousands are due at once); the rest stay due,
        so :meth:`get_timer` returns a deadline at or before ``now`` and the
        driver calls again. Entries that are not due are never touched.
        """
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            self._check_backlog()
            heap, fifo, fifo2, push = self._heap, self._fifo, self._fifo2, self._push
            limit = now + TIMER_SLACK
            budget = -1 if max_entries is None else max_entries
            due: dict[PairEntry, None] = {}
            while budget:
                # The earliest of the three tops (heap, then _fifo, then _fifo2 on a tie), if due, and how far
                # that container may run on: its heads up to the others' tops (ties kept in the same order).
                # Those tops only change by pushes later than ``limit``, so one bound serves the whole run (the
                # common case: the pings of one grid point lie in order in _fifo).
                ht = heap[0][0] if heap else _INF
                ft = fifo[0][0] if fifo else _INF
                f2t = fifo2[0][0] if fifo2 else _INF
                if ht <= ft and ht <= f2t:
                    src, top, run_to, strict = 0, ht, min(ft, f2t), False
                elif ft <= f2t:
                    src, top, run_to, strict = 1, ft, min(ht, f2t), ht <= f2t
                else:
                    src, top, run_to, strict = 2, f2t, min(ht, ft), True
                if top > limit:
                    break
                if run_to > limit:
                    run_to, strict = limit, False
                queue = fifo if src == 1 else fifo2
                while budget:
                    if src == 0:
                        if not heap or heap[0][0] > run_to or (strict and heap[0][0] == run_to):
                            break
                        entry = heapq.heappop(heap)[2]
                    else:
                        if not queue or queue[0][0] > run_to or (strict and queue[0][0] == run_to):
                            break
                        entry = queue.popleft()[1]
                    real = entry._armed
                    if real is None:
                        continue
                    if real <= limit:
                        entry._armed = None
                        due[entry] = None
                        budget -= 1
                    else:  # moved later: re-slotted (at the tail of a FIFO or on the heap, past ``limit``)
                        push(real, entry)
            entries, rearm = self._entries, self._rearm
            for entry in due:
                nonce = entry.nonce
                if entries.get(nonce) is entry:
                    entry.handle_timer(now)
                    if entries.get(nonce) is entry:  # ``_touched`` inlined: else it expired and left
                        rearm(entry)
            if self._route:
                self._dispatch()
        finally:
            lock.release()

    def next_event(self) -> EntryOutput | None:
        """Oldest undelivered event of any entry (including the final one of removed entries)."""
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            events: deque[Any] = self._events  # markers and events alike; typed per branch below
            if not events:
                return None
            event = events.popleft()
            if type(event) is tuple:  # a claim's marker (_QueuedClaim); no event is a plain tuple
                marker: tuple[int, float] = event
                self._claim_marker = marker
                return _new_event(StateChanged, (marker[0], _IDLE, _IN_LOCKING, "begin_lock", None, marker[1]))
            if event is None:  # right behind its claim's marker: the claim's Drained
                return _new_event(Drained, self._claim_marker)
            result: EntryOutput = event
            return result
        finally:
            lock.release()

    def drain_events(self) -> list[EntryOutput]:
        """Every undelivered event, oldest first, in one lock hold: :meth:`next_event` until None, batched.

        What a driver that acts on all pending events after each input wants:
        one call and one lock acquisition per round instead of one per event
        (a take's round hands out up to five). Claim markers are expanded
        exactly as :meth:`next_event` expands them.
        """
        lock = self.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            events: deque[Any] = self._events  # markers and events alike; typed per branch below
            if not events:
                return []
            if not self._markers:  # no claim marker queued (only take_any's fast claim makes them): as it is
                out: list[EntryOutput] = list(events)
                events.clear()
                return out
            self._markers = False
            out = []
            append = out.append
            marker = self._claim_marker
            for event in events:
                if type(event) is tuple:  # a claim's marker (_QueuedClaim)
                    marker = event
                    append(_new_event(StateChanged, (marker[0], _IDLE, _IN_LOCKING, "begin_lock", None, marker[1])))
                elif event is None:  # the claim's Drained, right behind its marker
                    append(_new_event(Drained, marker))
                else:
                    append(event)
            events.clear()
            self._claim_marker = marker
            return out
        finally:
            lock.release()

    @property
    def pending_events(self) -> int:
        """Events waiting for :meth:`next_event`."""
        return len(self._events)

    def _check_backlog(self) -> None:
        """Backpressure (lock held): refuse an input that would add events past the bound."""
        if len(self._events) >= self.max_pending_events:
            raise EventBacklog(f"{len(self._events)} events wait for next_event() "
                               f"(max_pending_events={self.max_pending_events}): drain them first")

    # === handover sessions (natpool/core/handover.py; section owned by the handover work) ===
    # Sessions claim through the CAS above (via ``_Claims``) and then drive their entry
    # directly under :attr:`lock`; the registry owns nonce -> session and receives every
    # entry event from ``_on_event``, after :attr:`on_entry_event`.

    @property
    def handovers(self) -> HandoverRegistry:
        """The session registry (owners, drop/outcome counters)."""
        return self._handovers

    def start_take(self, nonce: int | None, peer: str | None, now: float,
                   sid: bytes | None = None) -> InitiatorSession:
        """Claim a pair (by ``nonce``, or any Idle one with ``peer``) and open an initiator session.

        Raises PairBusy / UnknownPair at once, sending nothing (rule 1).
        The caller ships ``session.signals_to_send()`` over a fresh channel.
        """
        return self._handovers.start_take(nonce, peer, now, sid=sid)

    def accept_session(self, data: bytes, now: float, peer: str | None = None) -> ResponderSession:
        """Open a responder session from the first signal of an incoming channel; never raises on bad input.

        ``peer``: the authenticated identity of the channel's far end, if the
        signalling knows it; a LOCK for another identity's pair is refused
        (``DropReason.UNEXPECTED_PEER``), nothing claimed.
        """
        return self._handovers.accept(data, now, peer=peer)

    # === end of handover section ===

    # --- bookkeeping (caller holds the lock) -----------------------------------------

    def _touched(self, entry: PairEntry) -> None:
        """After any call into ``entry``: re-arm its timer slot and note queued output."""
        if self._entries.get(entry.nonce) is entry:  # else expired and gone meanwhile
            self._rearm(entry)

    def _rearm(self, entry: PairEntry) -> None:
        """``_touched`` for an entry known to be in the pool (its transition to a live state just ran)."""
        nonce = entry.nonce
        if entry.has_output:
            self._outbox[nonce] = None
        deadline = entry.get_timer()
        if deadline is None:
            entry._armed = None
            return
        current = entry._armed
        if current == deadline:
            return
        entry._armed = deadline
        if current is not None and current < deadline:
            return  # its earlier slot is re-pushed at ``deadline`` when it reaches the top
        fifo = self._fifo
        if fifo and fifo[-1][0] <= deadline and self._pushes:  # _push inlined: the common in-order case
            # (No _min_pushed here: a slot behind the FIFO's tail is no earlier than a slot that exists,
            # and every slot is at or after the driver's armed wake-up or lowered _min_pushed itself.)
            fifo.append((deadline, entry))
            self._pushes -= 1
        else:
            self._push(deadline, entry)

    def _push(self, deadline: float, entry: PairEntry) -> None:
        """One timer slot: appended to the FIFO when in order (O(1)), else pushed on the heap."""
        if deadline < self._min_pushed:
            self._min_pushed = deadline
        fifo = self._fifo
        if not fifo or fifo[-1][0] <= deadline:
            fifo.append((deadline, entry))
        else:
            fifo2 = self._fifo2
            if not fifo2 or fifo2[-1][0] <= deadline:
                fifo2.append((deadline, entry))
                self._fifo2_tail = deadline
            else:
                heapq.heappush(self._heap, (deadline, next(self._seq), entry))
        self._pushes -= 1
        if self._pushes <= 0:
            self._check_stale()

    def _check_stale(self) -> None:
        """Every _CHECK_EVERY counted pushes: too many stale slots (lazy invalidation)? Rebuild.

        The rebuild reads the entries' ``_armed``, in place (callers hold
        references to the containers); ``_entries`` bounds the armed ones.
        What counts: every push except claim_any's (its inlined append), and
        every transition to Idle (``_on_event``), pushed or not. A claim needs
        an entry that became Idle since its last claim, so the uncounted slots
        never outnumber the counted events, and the check still bounds the
        containers (``test_scheduler_stays_bounded_under_claim_abort_churn``).
        """
        self._pushes = _CHECK_EVERY
        heap, fifo, fifo2 = self._heap, self._fifo, self._fifo2
        if len(heap) + len(fifo) + len(fifo2) > 2 * len(self._entries) + _REBUILD_EVERY:
            seq = self._seq
            heap[:] = [(e._armed, next(seq), e) for e in self._entries.values() if e._armed is not None]
            heapq.heapify(heap)
            fifo.clear()
            fifo2.clear()

    def _earliest(self) -> float | None:
        """Drop stale tops (re-slotting the ones that moved later); the earliest live deadline."""
        heap, fifo, fifo2 = self._heap, self._fifo, self._fifo2
        # The usual case first, read-only: every top is live (the driver asks after each round, most of
        # which moved no deadline). Any stale top sends it to the cleaning loop below. Written out per
        # container, not looped: this runs after every driver round that reads the timer.
        t: float | None = None
        if heap:
            top = heap[0]
            t = top[0]
            if top[2]._armed != t:
                return self._earliest_cleaning()
        if fifo:
            head = fifo[0]
            d = head[0]
            if head[1]._armed != d:
                return self._earliest_cleaning()
            if t is None or d < t:
                t = d
        if fifo2:
            head = fifo2[0]
            d = head[0]
            if head[1]._armed != d:
                return self._earliest_cleaning()
            if t is None or d < t:
                t = d
        return t

    def _earliest_cleaning(self) -> float | None:
        """:meth:`_earliest` when some top is stale: drop or re-slot stale tops until all three are live."""
        heap, fifo, fifo2 = self._heap, self._fifo, self._fifo2
        while True:
            while heap:
                deadline, _, entry = heap[0]
                real = entry._armed
                if real == deadline:
                    break
                if real is not None and real > deadline:  # moved later: re-slot it now
                    heapq.heapreplace(heap, (real, next(self._seq), entry))
                else:
                    heapq.heappop(heap)
            for queue in (fifo, fifo2):  # same rule for both FIFOs: drop stale heads, re-slot moved ones
                while queue:
                    deadline, entry = queue[0]
                    real = entry._armed
                    if real == deadline:
                        break
                    queue.popleft()
                    if real is not None and real > deadline:
                        self._push(real, entry)
            # A re-slot (or a rebuild) may have changed a checked top: look again until all three hold.
            if ((not heap or heap[0][2]._armed == heap[0][0])
                    and (not fifo or fifo[0][1]._armed == fifo[0][0])
                    and (not fifo2 or fifo2[0][1]._armed == fifo2[0][0])):
                break
        t = heap[0][0] if heap else None
        if fifo and (t is None or fifo[0][0] < t):
            t = fifo[0][0]
        if fifo2 and (t is None or fifo2[0][0] < t):
            t = fifo2[0][0]
        return t

    def _on_event(self, entry: PairEntry, event: EntryOutput) -> None:
        """Keep the indexes and the scheduler in step with every transition (hot: two calls per claim)."""
        self._events.append(event)
        if type(event) is StateChanged:
            target = event.target
            if event.source == _IDLE:
                idle = self._idle.get(entry.remote.identity)
                if idle is not None:
                    idle.pop(entry.nonce, None)
            if target in _FINAL:
                self._forget(entry, entry.remote.identity)
            else:
                if target == _IDLE:
                    self._idle.setdefault(entry.remote.identity, OrderedDict())[entry.nonce] = entry
                    # Counted towards the stale-slot check, pushed or not: claim_any's slots are not (_check_stale).
                    self._pushes -= 1
                    if self._pushes <= 0:
                        self._check_stale()
                self._rearm(entry)
        # The owning session sees it later, from the dispatch loop that ends the public call.
        if self._session_owners and entry.nonce in self._session_owners:
            self._route.append(event)

    def _on_claimed(self, entry: PairEntry, changed: StateChanged, drained: Drained) -> None:
        """``_on_event`` for a claim's two events (Idle -> InLocking, then Drained), fused: take_any's hot path."""
        self._events.extend((changed, drained))
        nonce = entry.nonce
        idle = self._idle.get(entry.remote.identity)
        if idle is not None:
            idle.pop(nonce, None)
        # _rearm inlined; an InLocking entry with no ping outstanding has one deadline: the lock timeout.
        if entry.has_output:
            self._outbox[nonce] = None
        deadline = changed.at + entry.config.lock_timeout
        current = entry._armed
        if current != deadline:
            entry._armed = deadline
            if current is None or current > deadline:
                self._push(deadline, entry)
        owners = self._session_owners
        if owners and nonce in owners:  # pragma: no cover - a session claims before it binds
            self._route.append(changed)
            self._route.append(drained)

    def _dispatch(self) -> None:
        """Hand the queued events of owned entries to their sessions, oldest first (lock held).

        The one place a session reacts to its entry: the entry call that
        raised the event has returned, so a session may drive the entry again
        here (``finish_lock`` after the last pong), and what that raises is
        queued behind and delivered by this same loop, never nested.
        """
        route, owners = self._route, self._session_owners
        while route:
            event = route.popleft()
            session = owners.get(event.nonce)
            if session is not None:
                session.on_entry_event(event, event.at)

    def _forget(self, entry: PairEntry, peer: str) -> None:
        nonce = entry.nonce
        if self._entries.get(nonce) is not entry:
            return
        del self._entries[nonce]
        entry._armed = None  # its timer slots are stale from now on
        self._outbox.pop(nonce, None)
        peer_entries = self._by_peer.get(peer)
        if peer_entries is not None:
            peer_entries.pop(nonce, None)
            if not peer_entries:
                del self._by_peer[peer]
        idle = self._idle.get(peer)
        if idle is not None:
            idle.pop(nonce, None)
            if not idle:
                del self._idle[peer]
