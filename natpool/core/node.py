"""One sans-IO object per node: the registry of pairs, its handover sessions, one timer, one event queue.

The aioquic/quinn shape: a driver feeds inputs (``receive_datagram``,
``receive_signal``, ``channel_closed``, ``handle_timer``, local calls such
as ``start_take``) and after each one transmits the outputs
(``datagrams_to_send``, ``signals_to_send``), drains ``next_event`` (or
``drain_events``, all in one call) and re-arms ONE timer at ``get_timer()``. It needs no merge loop of its own:
which session has signals queued, which ended, whose channel must close,
the earliest deadline of entries *and* sessions — the node knows.

Why one object: before it, :class:`~natpool.core.pool.PairPool` and every
session each had their own timers and outputs, and every driver (the
simulator, asyncio, the test harnesses) hand-wrote the same loop around
them. And entries reported events through a callback chain that reached the
owning session *inside* the entry's own method (a pong ending a drain locked
the entry again before ``receive_datagram`` returned). Now entries and
sessions only append: an entry's event goes to the pool's queue (and, for an
entry a session owns, to the routing queue); a session's signal to its own
outbox. Each public method ends with one dispatch loop, in a fixed order —
entry events to their sessions (the pool's loop, oldest first; what a
session does there is queued behind, never nested), then the sessions'
signals and ends to the node's outputs — so no call ever re-enters an entry.

Channels are the driver's, named by an ``int`` id: the node picks the id of
a take's channel (:class:`OpenChannel` asks the driver to open it to the
peer) and of an incoming one (:meth:`new_channel_id`; the first
:meth:`receive_signal` on it opens the responder session; a message on any
other channel without a running session is dropped and counted). A
:class:`CloseChannel` follows a session's end; the driver closes the channel
after sending the signals of the same round (the session's last ones, e.g.
ABORT). Ids are never reused.

Datagrams: on an entry that is silent and live (``Locked`` / ``InUse``, from
spec/entry.toml's ``silent`` and ``live`` sets) every datagram except this
pair's own keepalive frame is the application's — the peer may be handed
over first and start talking — so :meth:`receive_datagram` returns it as
:class:`ApplicationData` for the lease instead of feeding the keepalive
machinery. The decision is the core's, from the entry's state; a driver
never guesses from sizes.

The event queue is the pool's (bounded by backpressure: ``EventBacklog``
before any change once ``max_pending_events`` wait; O(1) per event).
Remote drops are counters (:attr:`drops`, per entry ``stats.drops``), not
events: a flood of bad datagrams must not be able to fill the queue.

Not thread-safe beyond the pool: one driver thread (or loop) calls a node.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, deque
from functools import partial
from typing import Any, Final, NamedTuple, cast

from natpool.config import PairConfig
from natpool.core.entry import TIMER_SLACK, Drained, PairEntry, StateChanged
from natpool.core.handover import HandoverRegistry, Session
from natpool.core.lease import Lease, Role
from natpool.core.pool import MAX_PENDING_EVENTS, PairPool
from natpool.endpoints import EndpointPair
from natpool.errors import DropReason, HandoverError
from natpool.machines.tables import ENTRY

Addr = tuple[str, int]

_log = logging.getLogger("natpool.core.pool")  # the drop is the pool's, logged under its name as before

#: Entry states in which inbound datagrams belong to the application (spec/entry.toml: silent and live).
APPLICATION_STATES: Final[frozenset[str]] = ENTRY.sets["silent"] & ENTRY.sets["live"]
_IDLE: Final = ENTRY.initial
_new: Final = tuple.__new__  # the node's events without the keyword-parsing ``__new__`` of a NamedTuple


class OpenChannel(NamedTuple):
    """Open a signalling channel to ``peer`` for a take; its signals are in ``signals_to_send`` under ``channel``."""

    channel: int
    peer: str
    nonce: int


class CloseChannel(NamedTuple):
    """The session on ``channel`` ended: close the channel once its last signals (same round) are sent."""

    channel: int


class SessionStarted(NamedTuple):
    """A handover session began on ``channel`` (``start_take``, or the first signal of an incoming channel)."""

    channel: int
    session: Session


class LeaseReady(NamedTuple):
    """A handover succeeded: the pair is ``InUse`` and belongs to the application (just before SessionEnded)."""

    channel: int
    lease: Lease


class SessionEnded(NamedTuple):
    """A handover session ended, with its lease or its :class:`~natpool.errors.HandoverError`."""

    channel: int
    nonce: int
    role: Role
    outcome: Lease | HandoverError
    at: float


class ApplicationData(NamedTuple):
    """A datagram on a silent entry's socket that is not its keepalive: the lease's, kept by the driver."""

    nonce: int
    data: bytes
    addr: Addr


NodeEvent = StateChanged | Drained | OpenChannel | CloseChannel | SessionStarted | LeaseReady | SessionEnded


def is_own_keepalive(entry: PairEntry, data: bytes) -> bool:
    """``data`` is ``entry``'s own keepalive frame (a late ping/pong, never application data).

    Legacy pairs: the 9-byte frame with the pair's nonce. Keyed pairs: only a
    frame with a valid MAC — one forged with the (public) nonce is not ours and
    goes to the application like any other unauthenticated datagram.
    """
    return entry.is_own_frame(data)


class Node:
    """The sans-IO node: pairs (its :class:`PairPool`), handover sessions by channel, one timer, one queue.

    ``pool`` is the registry (exposed for reading and for code written against
    it); drive the node through its own methods so sessions and channels stay
    in step.
    """

    def __init__(self, local_identity: str, config: PairConfig | None = None, listeners: tuple[object, ...] = (),
                 *, max_pending_events: int = MAX_PENDING_EVENTS, pool: PairPool | None = None) -> None:
        self.pool = pool if pool is not None else PairPool(local_identity, config, listeners,
                                                           max_pending_events=max_pending_events)
        self.local_identity = self.pool.local_identity
        self.config = self.pool.config
        self._events = cast("deque[NodeEvent]", self.pool._events)  # one queue: entries' and node's events
        self._sessions: dict[int, Session] = {}  # channel -> running session
        self._dirty: dict[int, None] = {}  # channels whose session queued signals or ended (ordered set)
        self._signals: list[tuple[int, bytes]] = []
        self._peer_closed: set[int] = set()  # channels the peer closed: no CloseChannel for them
        # ids from new_channel_id() whose first signal has not come yet -> the channel's authenticated peer
        self._fresh: dict[int, str | None] = {}
        self._ids = itertools.count(1)

    # --- the registry (pass-through, each ending with the node's dispatch) ------------------------

    @property
    def drops(self) -> Counter[DropReason]:
        return self.pool.drops

    @property
    def handovers(self) -> HandoverRegistry:
        return self.pool.handovers

    def add(self, pair: EndpointPair, is_pinger: bool, now: float, **options: Any) -> PairEntry:
        """Register a punched pair as Idle (``PairPool.add``; ``options`` are its keyword arguments)."""
        return self.pool.add(pair, is_pinger, now, **options)

    def remove(self, nonce: int, now: float) -> PairEntry:
        entry = self.pool.remove(nonce, now)
        self._collect()
        return entry

    def get(self, nonce: int) -> PairEntry:
        return self.pool.get(nonce)

    def entries(self, peer: str | None = None) -> list[PairEntry]:
        return self.pool.entries(peer)

    def claim(self, nonce: int, now: float) -> PairEntry:
        return self.pool.claim(nonce, now)

    def claim_any(self, peer: str, now: float) -> PairEntry:
        return self.pool.claim_any(peer, now)

    def __len__(self) -> int:
        return len(self.pool)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self.pool

    # --- datagrams --------------------------------------------------------------------------------

    def receive_datagram(self, nonce: int, data: bytes, addr: Addr, now: float) -> ApplicationData | None:
        """A datagram arrived on pair ``nonce``'s socket; the application's (returned) or the keepalive's."""
        entry = self.pool._entries.get(nonce)
        if entry is not None and entry.state in APPLICATION_STATES and not entry.is_own_frame(data):
            return ApplicationData(nonce, data, addr)
        self.pool.receive_datagram(nonce, data, addr, now)
        if self._dirty:
            self._collect()
        return None

    def receive_and_reply(self, nonce: int, data: bytes, addr: Addr,
                          now: float) -> ApplicationData | list[tuple[bytes, Addr]]:
        """:meth:`receive_datagram` plus that entry's frames due now (the pong), for a driver answering at once.

        The per-datagram hot path of a keepalive driver, so ``PairPool.receive_and_reply`` is fused in here
        (the same steps under the same lock; one Python call per datagram less) and the common re-arm (a
        deadline that moved later, nothing queued) is an attribute write instead of ``PairPool._rearm``.
        """
        pool = self.pool
        entries = pool._entries
        lock = pool.lock
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            entry = entries.get(nonce)
            if entry is None:
                pool.drops[DropReason.WRONG_NONCE] += 1
                _log.debug("dropped datagram from %s for unknown pair %#x", addr, nonce)
                return []
            if entry.state in APPLICATION_STATES and not entry.is_own_frame(data):
                return ApplicationData(nonce, data, addr)
            if len(pool._events) >= pool.max_pending_events:
                pool._check_backlog()
            entry.receive_datagram(data, addr, now)
            out = entry.datagrams_to_send(now) if entry._ping_queued or entry._pongs else []
            if entries.get(nonce) is entry:  # else expired and gone meanwhile
                # PairPool._rearm's common case inlined: the deadline moved later (or stayed), nothing queued.
                if entry.state == _IDLE and not entry._pings:
                    # PairEntry.get_timer's rule for an Idle entry with no ping outstanding, without the call:
                    # liveness, or the pinger's next ping (tests/core/test_node.py checks they agree).
                    live = entry.last_seen + entry.config.no_inbound_timeout
                    deadline: float | None = (entry._next_ping if entry._pings is not None
                                              and entry._next_ping < live else live)
                else:
                    deadline = entry.get_timer()
                current = entry._armed
                if (deadline is not None and current is not None and current <= deadline
                        and not (entry._ping_queued or entry._pongs)):
                    entry._armed = deadline
                else:
                    pool._rearm(entry)
            if pool._route:
                pool._dispatch()
        finally:
            lock.release()
        if self._dirty:
            self._collect()
        return out

    def datagrams_to_send(self, now: float) -> list[tuple[int, bytes, Addr]]:
        """Every keepalive frame due now, as (nonce, data, addr)."""
        return self.pool.datagrams_to_send(now)

    def has_pending_output(self) -> bool:
        return self.pool.has_pending_output() or bool(self._signals)

    def send_failed(self, nonce: int, now: float) -> None:
        self.pool.send_failed(nonce, now)
        if self._dirty:
            self._collect()

    # --- handover -----------------------------------------------------------------------------------

    def new_channel_id(self, peer: str | None = None) -> int:
        """A fresh id for an incoming channel; its first :meth:`receive_signal` opens a responder session.

        ``peer``: the channel's authenticated peer identity (``SignalChannel.peer_identity``; None when the
        transport cannot tell). The responder refuses a LOCK for a pair whose remote identity is another one.
        """
        channel = next(self._ids)
        self._fresh[channel] = peer
        return channel

    def start_take(self, nonce: int | None = None, peer: str | None = None, *, now: float,
                   sid: bytes | None = None) -> int:
        """Claim a pair (by ``nonce``, or any Idle one with ``peer``) and start its take; returns the channel id.

        Raises PairBusy / UnknownPair (nothing changed, nothing queued: rule 1).
        Queues :class:`OpenChannel` (to the pair's remote identity), then
        :class:`SessionStarted`; the LOCK waits in :meth:`signals_to_send`.
        """
        self.pool._check_backlog()
        session = self.pool.start_take(nonce, peer, now, sid=sid)
        assert session.entry is not None  # an initiator always owns its entry
        channel = next(self._ids)
        self._events.append(_new(OpenChannel, (channel, session.entry.remote.identity, session.nonce)))
        self._start(channel, session)
        self._collect()
        return channel

    def receive_signal(self, channel: int, data: bytes, now: float) -> None:
        """One message from ``channel``; the first on a new channel opens a responder. Never raises on bad input."""
        session = self._sessions.get(channel)
        if session is None:
            if channel not in self._fresh:  # a late message on a channel whose session ended: dropped
                self.pool.drops[DropReason.UNEXPECTED] += 1
                return
            self.pool._check_backlog()
            peer = self._fresh.pop(channel)
            self._start(channel, self.pool.accept_session(data, now, peer=peer))
        else:
            session.receive_signal(data, now)
        if self._dirty:
            self._collect()

    def channel_closed(self, channel: int, now: float) -> None:
        """``channel`` broke or the peer closed it; a channel without a running session is ignored."""
        self._fresh.pop(channel, None)
        session = self._sessions.get(channel)
        if session is None:
            return
        self._peer_closed.add(channel)
        session.channel_closed(now)
        self._collect()

    def cancel(self, channel: int, now: float) -> None:
        """Local shutdown of one session: ABORT(CANCELLED) where the handshake still allows it."""
        session = self._sessions.get(channel)
        if session is not None:
            session.cancel(now)
            self._collect()

    def cancel_all(self, now: float) -> None:
        """Cancel every session (the pool is closing): the running ones, then the abandoned ones.

        An abandoned session (:meth:`abandon`: a take cancelled while Settling)
        has no channel here any more but still owns its Locked entry; cancelling
        it ends that ownership now rather than at the lock timeout.
        """
        for session in list(self._sessions.values()):
            session.cancel(now)
        running = set(map(id, self._sessions.values()))
        for session in self.pool.handovers.sessions():
            if id(session) not in running:
                session.cancel(now)
        self._collect()

    def abandon(self, channel: int) -> None:
        """Stop driving the session on ``channel`` (its driver gave up on it, e.g. a take cancelled while Settling).

        The session stays the owner of its entry but gets no timer here any
        more: a Locked entry then waits for its own lock timeout, as
        spec/runtime-api.md's cancellation table says. A :class:`CloseChannel` follows.
        """
        session = self._sessions.pop(channel, None)
        if session is None:
            return
        session.waker = None
        self._dirty.pop(channel, None)
        for data in session.signals_to_send():
            self._signals.append((channel, data))
        self._events.append(CloseChannel(channel))

    def session(self, channel: int) -> Session | None:
        """The running session on ``channel`` (None once it ended)."""
        return self._sessions.get(channel)

    def sessions(self) -> dict[int, Session]:
        """channel -> running session (a copy)."""
        return dict(self._sessions)

    def signals_to_send(self) -> list[tuple[int, bytes]]:
        """Every signal queued since the last call, as (channel, data), in the order the sessions made them."""
        out, self._signals = self._signals, []
        return out

    # --- the one timer ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """Earliest deadline of any entry or session."""
        pool = self.pool
        lock = pool.lock  # one hold for the entries' scheduler and every session (the driver re-arms per round)
        lock.acquire()  # not ``with``: its __enter__/__exit__ calls cost ~0.15 µs per hold
        try:
            t = pool._earliest()
            for session in self._sessions.values():
                st = session._timer()
                if st is not None and (t is None or st < t):
                    t = st
        finally:
            lock.release()
        return t

    def earlier_timer(self, armed: float | None = None) -> float | None:
        """For a driver that re-arms after every input: the earliest deadline if it is earlier than ``armed``.

        ``armed`` is the driver's armed wake-up, or None when none is armed
        (then this is :meth:`get_timer`). Returns None when nothing is due
        before ``armed``: the armed wake-up stands.

        Why: re-arming after every round read the whole scheduler each time.
        ``armed`` came from an earlier call of this method (or lies before
        one's result), and every entry's deadline was at or after that
        result then; an entry can only become due earlier by getting a new
        timer slot, and the pool records the earliest slot it gave since that
        read. So the entries are read again only when some slot is earlier
        than ``armed``; the sessions (one or two during a handover) are always
        checked. A deadline that moved later needs no earlier wake-up: the
        armed one finds nothing due and the driver reads again then.

        One driver per node: a second caller would reset the other's record.
        :meth:`get_timer` never resets it and may be called by anyone.
        """
        pool = self.pool
        if armed is None or pool._min_pushed < armed:
            pool._min_pushed = math.inf  # from this read on (a re-slot while reading lowers it again)
            t = self.get_timer()
            return t if armed is None or (t is not None and t < armed) else None
        lock = pool.lock
        lock.acquire()  # not ``with``: once per driver round
        try:
            t = None
            for session in self._sessions.values():
                st = session._timer()
                if st is not None and st < armed and (t is None or st < t):
                    t = st
        finally:
            lock.release()
        return t

    def handle_timer(self, now: float, max_entries: int | None = None) -> None:
        """Run every entry and session due by ``now`` (entries first; ``max_entries`` bounds the entries run)."""
        self.pool.handle_timer(now, max_entries)
        due = now + TIMER_SLACK
        for session in list(self._sessions.values()):
            st = session.get_timer()
            if st is not None and st <= due:
                session.handle_timer(now)
        self._collect()

    # --- events -------------------------------------------------------------------------------------

    def next_event(self) -> NodeEvent | None:
        """Oldest undelivered event (entries' and sessions'), O(1)."""
        return self.pool.next_event()  # the one queue: entries' events and the node's own

    def drain_events(self) -> list[NodeEvent]:
        """Every undelivered event, oldest first (:meth:`next_event` until None, in one call and one lock hold)."""
        events: list[Any] = self.pool.drain_events()  # the one queue: entries' events and the node's own
        return events

    @property
    def pending_events(self) -> int:
        return len(self._events)

    # --- the node's half of the dispatch loop ------------------------------------------------------

    def _start(self, channel: int, session: Session) -> None:
        self._sessions[channel] = session
        session.waker = partial(self._dirty.__setitem__, channel, None)  # an append, never a call back
        self._events.append(_new(SessionStarted, (channel, session)))
        self._dirty[channel] = None

    def _collect(self) -> None:
        """Move the signals and ends of every session that made any into the node's outputs, in channel order.

        Runs after the pool's dispatch loop (entry events already delivered to
        their sessions inside the call that just returned).
        """
        dirty, sessions, signals, events = self._dirty, self._sessions, self._signals, self._events
        lock = self.pool.lock
        while dirty:
            # A snapshot per pass: nothing below calls into a session, so none is made dirty meanwhile.
            channels = list(dirty)
            dirty.clear()
            for channel in channels:
                session = sessions.get(channel)
                if session is None:
                    continue
                lock.acquire()  # Session.signals_to_send, lock held (once per session per round); not ``with``
                out, session._out = session._out, []
                lock.release()  # (nothing between can raise)
                for data in out:
                    signals.append((channel, data))
                outcome = session.outcome
                if outcome is not None:
                    del sessions[channel]
                    session.waker = None
                    if isinstance(outcome, Lease):
                        events.append(_new(LeaseReady, (channel, outcome)))
                    ended = session.ended_at if session.ended_at is not None else session.started_at
                    events.append(_new(SessionEnded, (channel, session.nonce, session.role, outcome, ended)))
                    if channel in self._peer_closed:
                        self._peer_closed.discard(channel)
                    else:
                        events.append(_new(CloseChannel, (channel,)))


__all__ = [
    "APPLICATION_STATES",
    "ApplicationData",
    "CloseChannel",
    "LeaseReady",
    "Node",
    "NodeEvent",
    "OpenChannel",
    "SessionEnded",
    "SessionStarted",
    "is_own_keepalive",
]
