"""Handover sessions (spec/handover.md), sans-IO.

One :class:`InitiatorSession` runs per ``take``; one :class:`ResponderSession`
per incoming LOCK. Every protocol step fires on a generated machine
(``InitiatorMachine`` / ``ResponderMachine``) whose model is the session, so
it goes through the spec's transition table and guards (``entry_claimed``,
``entry_locked``, ``peer_may_proceed``, ``settled`` are properties here). The
runtime steps the compiled tables (:mod:`natpool.fsm`: a python-statemachine
event costs ~120 µs and a take fires nine on the sessions alone); the class
itself runs the transition when listeners are bound or in strict mode.

The session drives its entry's lifecycle (``finish_lock``, ``abort_lock``,
``use``, ``expire``); the pool performs the initial claim (CAS) and queues
the entry's events (``Drained``, ``StateChanged``) for the owning session;
the dispatch loop that ends every public call (the pool's, a session's,
:class:`natpool.core.node.Node`'s) delivers them, so a draining session
advances in the same call as the last pong instead of polling, and never
from inside the entry's own method (no re-entrance, no guard flags).

Failure rule (rule 4): an InLocking entry aborts to Idle, a Locked entry
expires; ABORT(UNKNOWN_PAIR) expires even an InLocking entry (the pair is
gone remotely). Remote bad input never raises out of ``receive_signal``: it
is counted, logged, and ends the session with :class:`SignalProtocolError`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Protocol

from natpool.core.entry import ExpiryReason, PairEntry, StateChanged
from natpool.core.lease import Lease, Role
from natpool.errors import (
    ChannelBroken,
    DropReason,
    HandoverCancelled,
    HandoverError,
    HandoverTimeout,
    LocalError,
    PairBusy,
    PeerRefused,
    RemoteProtocolError,
    SignalProtocolError,
    UnknownPair,
)
from natpool.fsm import Compiled
from natpool.machines import InitiatorMachine, ResponderMachine
from natpool.machines.tables import INITIATOR, RESPONDER
from natpool.wire import signal as wire
from natpool.wire.keys import SIGNAL, derive
from natpool.wire.signal import NO_RAND, AbortReason, Signal, SignalType

logger = logging.getLogger(__name__)

#: Entry states that mean a session lost its entry (:meth:`Session._entry_lost`'s test, checked inline first).
_LOST: frozenset[str] = frozenset(("Idle", "Expired"))


Lookup = Callable[[int], PairEntry]
"""``nonce -> entry`` (raises UnknownPair); the pool passes its lock-free variant, lock held."""
Claim = Callable[[int, float], PairEntry]
"""The claim CAS (raises UnknownPair / PairBusy); lock-free variant, lock held."""


class EntryClaims(Protocol):
    """What the sessions need of the pool that owns the entries: lookup and the claim CAS.

    Narrow on purpose, so this module never imports the pool (no import
    cycle) and never reaches into its private state. Every method is called
    with the pool's lock held (the registry's :attr:`HandoverRegistry.lock`
    is that lock) and raises :class:`UnknownPair` / :class:`PairBusy`.
    """

    def lookup(self, nonce: int) -> PairEntry: ...

    def claim(self, nonce: int, now: float) -> PairEntry: ...

    def claim_any(self, peer: str, now: float) -> PairEntry: ...

    def dispatch(self) -> None:
        """Deliver the queued events of owned entries to their sessions (the end of every public call)."""


# --- registry: owner of each claimed entry + event routing -------------------


class HandoverRegistry:
    """nonce -> owning session; the pool creates one and forwards entry events here.

    Ownership is the ``owner[self] = session`` of the ``entry_claimed`` guard:
    the tie-break hands an entry from a local initiator to a responder by
    rebinding it here, without the entry ever leaving InLocking.

    ``claims`` is the pool's side (:class:`EntryClaims`); without it the
    registry only tracks sessions (:meth:`start_take` / :meth:`accept` raise).
    """

    def __init__(self, lock: AbstractContextManager[object] | None = None,
                 drops: Counter[DropReason] | None = None, listeners: tuple[object, ...] = (),
                 claims: EntryClaims | None = None) -> None:
        self.lock: AbstractContextManager[object] = lock if lock is not None else threading.Lock()
        self._claims = claims
        #: Run the pool's dispatch loop (lock held): the events the ending call raised reach their sessions.
        #: The pool's own method itself (every session call ends with it: no forwarding call in between).
        self.dispatch: Callable[[], None] = claims.dispatch if claims is not None else self._no_dispatch
        self._owners: dict[int, Session] = {}
        #: nonce -> owning session, read-only (the pool skips routing while it is empty).
        self.owners: Mapping[int, Session] = MappingProxyType(self._owners)
        self.drops: Counter[DropReason] = drops if drops is not None else Counter()
        self.outcomes: Counter[str] = Counter()  # "lease" or the HandoverError class name
        self.messages_sent = 0
        #: python-statemachine listeners bound to every session machine (trace validation).
        self.listeners = listeners

    def owner(self, nonce: int) -> Session | None:
        return self._owners.get(nonce)

    def sessions(self) -> list[Session]:
        return list(self._owners.values())

    def bind(self, nonce: int, session: Session) -> None:
        self._owners[nonce] = session

    def unbind(self, nonce: int, session: Session) -> None:
        if self._owners.get(nonce) is session:
            del self._owners[nonce]

    def _no_dispatch(self) -> None:
        """:attr:`dispatch` of a registry without a pool: no entries, nothing to deliver."""

    def start_take(self, nonce: int | None, peer: str | None, now: float,
                   sid: bytes | None = None) -> InitiatorSession:
        """Claim (CAS) an entry and open an initiator session on it; LOCK is queued.

        Raises :class:`PairBusy` / :class:`UnknownPair` (nothing sent, nothing
        changed) — rule 1: losers of the claim fail at once.
        """
        if (nonce is None) == (peer is None):
            raise LocalError("start_take needs exactly one of nonce or peer")
        if sid is not None:
            wire.check_sid(sid)  # ValueError before the claim: nothing changed
        claims = self._need_claims()
        with self.lock:
            entry = claims.claim(nonce, now) if nonce is not None else claims.claim_any(str(peer), now)
            session = InitiatorSession(self, entry, now, sid=sid)
            claims.dispatch()
            return session

    def accept(self, data: bytes, now: float, peer: str | None = None) -> ResponderSession:
        """Open a responder session from the first signal of an incoming channel; never raises on bad input.

        ``peer`` is the authenticated identity of the channel's other end
        (None: the channel cannot tell, legacy); a LOCK for a pair whose
        remote identity is another one is refused, nothing claimed.
        """
        claims = self._need_claims()
        with self.lock:
            session = ResponderSession(self, claims.lookup, claims.claim, data, now, peer=peer)
            claims.dispatch()
            return session

    def _need_claims(self) -> EntryClaims:
        if self._claims is None:
            raise LocalError("this HandoverRegistry has no pool (claims=): it cannot start sessions")
        return self._claims


# --- sessions ---------------------------------------------------------------


class Session:
    """What both roles share: framing, sequence checks, timers, the failure rule.

    The public methods take the pool lock (the session drives the entry
    directly); :meth:`on_entry_event` is called by the pool with it held.
    """

    role: Role
    state: str  # written by the bound generated machine (its model field)

    def __init__(self, registry: HandoverRegistry, now: float) -> None:
        self._registry = registry
        self.entry: PairEntry | None = None
        self.nonce = 0
        self.sid = b""
        self.started_at = now
        self.deadline: float | None = None
        self.outcome: Lease | HandoverError | None = None
        self.ended_at: float | None = None
        self._drops: Counter[DropReason] | None = None  # made on the first drop (most sessions never drop)
        self.sent: list[Signal] = []  # every signal this session emitted, in order
        self.received: list[Signal] = []  # every well-formed signal accepted
        #: Set by a driver: called (pool lock held) when output is queued or the session ended.
        #: It must only schedule work (e.g. ``Event.set``), never call back into the session.
        self.waker: Callable[[], None] | None = None
        self._out: list[bytes] = []
        self._send_seq = 0
        self._recv_seq = 0
        self._settle_start: float | None = None  # when this role entered Settling (spec: settle_start)
        self._now = now  # last time seen, for the property guards the generated machine evaluates
        self._entry_reason: ExpiryReason | None = None  # ExpiryReason of the last foreign entry transition
        self._machine_binding: object = None  # natpool.fsm: the class bound here, only with listeners/strict
        # Keyed pairs (issue 10): the signal sub-key, and the two session randoms (wire/signal.py, version 2).
        self._key: bytes | None = None
        self._ri: bytes | None = None  # the initiator's random (ours as initiator; from LOCK as responder)
        self._rr: bytes | None = None  # the responder's random (ours as responder; from the first answer)

    # -- public sans-IO surface --

    @property
    def drops(self) -> Counter[DropReason]:
        """This session's dropped inputs by reason (the registry counts them too)."""
        if self._drops is None:
            self._drops = Counter()
        return self._drops

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def signals_to_send(self) -> list[bytes]:
        with self._registry.lock:
            out, self._out = self._out, []
            return out

    def get_timer(self) -> float | None:
        with self._registry.lock:
            return self._timer()

    def _timer(self) -> float | None:
        """:meth:`get_timer`, lock held (the node reads every session's under one hold)."""
        if self.outcome is not None:
            return None
        # The lock deadline only matters while failing is still allowed (not in Settling).
        deadline = self.deadline if self.state in self._abortable else None  # _can_fail(), inlined
        settle = None if self.state != "Settling" else self._settle_at()
        if deadline is None or settle is None:
            return settle if deadline is None else deadline
        return min(deadline, settle)

    def handle_timer(self, now: float) -> None:
        with self._registry.lock:
            if not (self.outcome is not None or self._timed_out(now)):
                self._advance(now)
            self._registry.dispatch()

    def receive_signal(self, data: bytes, now: float) -> None:
        """Feed one message from the channel. Never raises on bad input."""
        registry = self._registry
        with registry.lock:
            try:
                try:
                    sig = wire.decode(data)
                    # _authentic: a legacy session and an unsigned signal is the common case, tested inline.
                    if (self._key is not None or sig.ri is not None) and not self._authentic(sig):
                        return  # forged or from another session: dropped (counted), this session goes on
                    self._check_binding(sig)
                except RemoteProtocolError as exc:
                    if self._key is not None and exc.reason in (DropReason.MALFORMED, DropReason.OVERSIZED,
                                                                DropReason.REPLAY):
                        # Keyed: what is not a fresh signal of our peer cannot come from it; it must not end
                        # the session.
                        self._drop(exc.reason, exc.detail)
                        return
                    self._protocol_failure(exc, now)  # after the end: only counted
                    return
                deadline = self.deadline
                if self.outcome is not None or (deadline is not None and now >= deadline and self._timed_out(now)):
                    # a late driver must not carry us past lock_timeout
                    self._drop(DropReason.UNEXPECTED, f"{sig.type.name} after the session ended")
                    return
                self.received.append(sig)
                self._on_signal(sig, now)
            finally:
                registry.dispatch()  # whatever the message caused, delivered once it is fully handled

    def channel_closed(self, now: float) -> None:
        """The channel broke or the peer closed it: fail unless past the point of no return."""
        with self._registry.lock:
            if self.outcome is None and self._can_fail():
                self._fail(ChannelBroken(f"signalling channel closed during handover of {self.nonce:#x}"), now)
            # Settling: both sides are past the take; settle still completes on its timer.
            self._registry.dispatch()

    def cancel(self, now: float) -> None:
        """Local shutdown (pool close): fail with ABORT(CANCELLED) if still possible."""
        with self._registry.lock:
            if self.outcome is None and self._can_fail():
                self._fail(HandoverCancelled("handover cancelled locally"), now, abort=AbortReason.CANCELLED)
            self._registry.dispatch()

    def on_entry_event(self, event: object, now: float) -> None:
        """Called by the pool's dispatch loop (lock held) for each event of the owned entry: re-evaluate the guards.

        Never from inside an entry's method: the events of our own calls into
        the entry arrive here after those calls returned, and re-evaluating
        the guards then is harmless (every step is guarded by the state).
        """
        if self.outcome is not None:
            return
        if isinstance(event, StateChanged):
            self._entry_reason = event.reason
        self._advance(now)

    # -- shared mechanics (lock held) --

    def _timed_out(self, now: float) -> bool:
        """Fail with HandoverTimeout if ``lock_timeout`` has passed (and failing is still allowed)."""
        if self.deadline is None or now < self.deadline or not self._can_fail():
            return False
        self._fail(HandoverTimeout(f"handover of {self.nonce:#x} exceeded lock_timeout"), now,
                   abort=AbortReason.TIMEOUT)
        return True

    def _emit(self, stype: SignalType, reason: AbortReason | None = None) -> None:
        self._send_seq += 1
        key = self._key
        if key is None or self._ri is None:
            # The fields are this session's own (nonce from its entry or a decoded LOCK, a checked sid).
            sig, data = wire.encode_fields(stype, self.nonce, self.sid, self._send_seq, reason)
        else:
            rr = self._rr if self._rr is not None else NO_RAND
            sig, data = wire.encode_signed(stype, self.nonce, self.sid, self._send_seq, reason, self._ri, rr,
                                           key, self.role == "responder")
        self.sent.append(sig)
        self._out.append(data)
        self._registry.messages_sent += 1
        waker = self.waker  # output queued: tell the driver (an append, never a call back)
        if waker is not None:
            waker()

    def _authentic(self, sig: Signal) -> bool:
        """Keyed pair: the MAC is valid and the signal is bound to this session's randoms; else dropped.

        Without a key only the legacy format is accepted (a signed signal
        raises: the peer has a key we lack, a mismatch to report, not to
        parse around). With one, an unsigned, forged or earlier session's
        signal is dropped and counted (BAD_MAC / REPLAY) and returns False:
        it cannot be the peer's, so it neither advances nor ends the session.
        """
        key = self._key
        if key is None:
            if sig.ri is not None:  # sig.signed, inlined (every signal)
                raise RemoteProtocolError(DropReason.BAD_MAC, "signed signal for a pair without a key")
            return True
        if not sig.signed:
            self._drop(DropReason.BAD_MAC, f"unsigned (legacy) {sig.type.name} for a keyed pair")
            return False
        if not wire.verify(sig, key, by_responder=self.role == "initiator"):
            self._drop(DropReason.BAD_MAC, f"{sig.type.name}: MAC does not verify")
            return False
        if sig.sid != self.sid or sig.nonce != self.nonce or sig.ri != self._ri:
            self._drop(DropReason.REPLAY, f"{sig!r}: signed for another session")
            return False
        if self.role == "initiator":
            if self._rr is None:
                if sig.rr == NO_RAND:
                    self._drop(DropReason.MALFORMED, f"{sig!r}: answer without the responder's random")
                    return False
                self._rr = sig.rr  # the first answer, bound to our fresh ri: it is live
            elif sig.rr != self._rr:
                self._drop(DropReason.REPLAY, f"{sig!r}: bound to another responder random")
                return False
        elif sig.rr != self._rr and not (sig.type is SignalType.ABORT and sig.rr == NO_RAND):
            # Only an ABORT the initiator sent before our answer reached it may lack our random.
            self._drop(DropReason.REPLAY, f"{sig!r}: not bound to this session's responder random")
            return False
        return True

    def _check_binding(self, sig: Signal) -> None:
        """Session id, nonce and sequence must match this session exactly (the channel is FIFO)."""
        if sig.sid != self.sid:
            raise RemoteProtocolError(DropReason.UNEXPECTED, f"signal for foreign session {sig.sid.hex()}")
        if sig.nonce != self.nonce:
            raise RemoteProtocolError(DropReason.WRONG_NONCE, f"signal for nonce {sig.nonce:#x}")
        if sig.type is SignalType.ABORT:
            # Terminal, so accepted whatever its sequence number: a cancelled send may have used numbers
            # that never went out (spec/handover.md, "Sequence numbers, and why ABORT ignores them").
            self._recv_seq = max(self._recv_seq, sig.seq)
            return
        if sig.seq <= self._recv_seq:
            raise RemoteProtocolError(DropReason.REPLAY, f"sequence {sig.seq} already seen (last {self._recv_seq})")
        if sig.seq != self._recv_seq + 1:
            raise RemoteProtocolError(DropReason.UNEXPECTED, f"sequence {sig.seq}, expected {self._recv_seq + 1}")
        self._recv_seq = sig.seq

    def _drop(self, reason: DropReason, detail: str) -> None:
        self.drops[reason] += 1
        self._registry.drops[reason] += 1
        logger.debug("handover %s %#x: dropped signal (%s): %s", self.role, self.nonce, reason.value, detail)

    def _protocol_failure(self, exc: RemoteProtocolError, now: float) -> None:
        self._drop(exc.reason, exc.detail)
        if self._can_fail():
            self._fail(SignalProtocolError(str(exc)), now, abort=AbortReason.PROTOCOL)

    def _unexpected(self, sig: Signal, now: float) -> None:
        self._protocol_failure(
            RemoteProtocolError(DropReason.UNEXPECTED, f"{sig.type.name} in state {self.state}"), now)

    def _settle_at(self) -> float | None:
        """Settle deadline: counted from entering Settling, when both sides are known silent (rule 7)."""
        if self.state != "Settling" or self.entry is None or self._settle_start is None:
            return None
        return self._settle_start + self.entry.config.settle_time

    def _lock_entry(self, now: float) -> None:
        """InLocking -> Locked if the entry's own guard (drained) allows it."""
        entry = self.entry
        if entry is not None and entry.state == "InLocking" and entry.drained:
            entry.finish_lock(now)

    def _release_entry(self, now: float, gone: bool) -> None:
        """Rule 4: InLocking -> Idle (or Expired if the pair is gone remotely); Locked -> Expired.

        Only while this session owns the entry (the model's ``owner[n][p] == s``):
        an entry handed to a responder by the tie-break is no longer ours.
        """
        entry = self.entry
        if entry is None or self._registry.owner(self.nonce) is not self:
            return
        if entry.state == "InLocking" and not gone:
            entry.abort_lock(now)
        elif entry.state in ("InLocking", "Locked"):
            entry.expire(ExpiryReason.PEER_GONE if gone else ExpiryReason.LOCK_TIMEOUT, now)

    def _enter_settling(self, event: str, now: float) -> None:
        """Enter Settling and start the settle: the role's timer and the entry's ``settled`` count from here."""
        self._machine.fire(self, event, self._registry.listeners)
        self._settle_start = now
        if self.entry is not None:
            self.entry.start_settle(now)

    def _try_settle(self, now: float) -> None:
        entry = self.entry
        self._now = now
        if entry is None or self.state != "Settling" or not self.settled:
            return
        # guard `settled` is evaluated while the entry is still Locked
        self._machine.fire(self, "settle", self._registry.listeners)
        ok = entry.use(now)  # same guard as the machine's: cannot refuse now
        assert ok, f"entry {entry!r} refused use although settled"
        self._finish(Lease(entry.pair, entry, self.role, sid=self.sid, lock=self._registry.lock), now)

    def _entry_lost(self, now: float) -> bool:
        """The owned entry left the claimed states under us (its own lock timer, expiry, removal)."""
        entry = self.entry
        if entry is None or entry.state not in _LOST:
            return False
        timed_out = self._entry_reason is ExpiryReason.LOCK_TIMEOUT
        err = (HandoverTimeout(f"pair {self.nonce:#x}: the entry's lock timed out") if timed_out
               else HandoverError(f"pair {self.nonce:#x} left the lock ({entry.state}) during the handover"))
        # Also fails in Settling (spec: only losing the entry fails a role there).
        self._fail(err, now, abort=AbortReason.TIMEOUT if timed_out else AbortReason.ENTRY_GONE)
        return True

    def _fail(self, err: HandoverError, now: float, abort: AbortReason | None = None,
              gone: bool = False, release: bool = True) -> None:
        self._machine.fire(self, "fail", self._registry.listeners)
        if abort is not None and self.sid:
            self._emit(SignalType.ABORT, abort)
        if release:
            self._release_entry(now, gone)
        self._finish(err, now)

    def _finish(self, outcome: Lease | HandoverError, now: float) -> None:
        self.outcome = outcome
        self.ended_at = now
        self.deadline = None
        leased = isinstance(outcome, Lease)
        self._registry.outcomes["lease" if leased else type(outcome).__name__] += 1
        if self.nonce:
            self._registry.unbind(self.nonce, self)
        if not leased:
            logger.debug("handover %s %#x ended: %s: %s", self.role, self.nonce, type(outcome).__name__, outcome)
        waker = self.waker  # ended: tell the driver
        if waker is not None:
            waker()

    # -- role hooks --

    #: Every session transition goes through it: ``self._machine.fire(self, event, listeners)`` steps the
    #: compiled table, or the generated class with listeners / in strict mode (see :mod:`natpool.fsm`).
    _machine: Compiled


    #: The role's ``abortable`` set (spec): where failing is still allowed.
    _abortable: frozenset[str] = frozenset()

    def _can_fail(self) -> bool:
        return self.state in self._abortable

    def _on_signal(self, sig: Signal, now: float) -> None:
        raise NotImplementedError

    def _advance(self, now: float) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        """Short enough for a shrunk hypothesis trace: role, pair, session id prefix, state, outcome."""
        outcome = "" if self.outcome is None else f", -> {type(self.outcome).__name__}"
        return f"{type(self).__name__}({self.nonce:#x}, sid={self.sid[:4].hex()}.., {self.state}{outcome})"

    @property
    def settled(self) -> bool:
        """Guard ``settled``: entry Locked and ``settle_time`` elapsed since entering Settling.

        The entry's own ``settled`` counts from the same start (set by
        ``_enter_settling``), and ``use(now)`` re-checks it at the same ``now``;
        reading the entry's property here would use its last-seen time.
        """
        entry = self.entry
        if entry is None or entry.state != "Locked" or self._settle_start is None:
            return False
        return self._now >= self._settle_start + entry.config.settle_time

    @property
    def entry_claimed(self) -> bool:
        """Guard ``entry_claimed``: the entry is InLocking and this session owns it."""
        return (self.entry is not None and self.entry.state == "InLocking"
                and self._registry.owner(self.nonce) is self)


class InitiatorSession(Session):
    """One ``take``: LOCK -> (LOCKED) -> lock locally -> TAKE -> (TAKEN) -> use."""

    role: Role = "initiator"
    _machine = Compiled(InitiatorMachine, INITIATOR)
    _abortable = INITIATOR.sets["abortable"]

    def __init__(self, registry: HandoverRegistry, entry: PairEntry, now: float,
                 sid: bytes | None = None) -> None:
        super().__init__(registry, now)
        self.entry = entry
        self.nonce = entry.nonce
        if sid is None:
            sid = os.urandom(wire.SID_SIZE)  # what secrets.token_bytes returns, two Python calls fewer
            while not any(sid):  # pragma: no cover - probability 2**-128; Signal refuses an all-zero id
                sid = os.urandom(wire.SID_SIZE)
        else:
            wire.check_sid(sid)  # before anything changes: the signals are built unchecked (wire.encode_fields)
        self.sid = sid
        self.deadline = now + entry.config.lock_timeout
        if entry.key is not None:
            self._key = derive(entry.key, SIGNAL)
            self._ri = _session_random()
        self.state = INITIATOR.initial  # the machine's initial state; transitions go through it
        registry.bind(self.nonce, self)
        # guard entry_claimed: the caller's claim won
        self._machine.fire(self, "send_lock", self._registry.listeners)
        self._emit(SignalType.LOCK)

    @property
    def entry_locked(self) -> bool:
        """Guard ``entry_locked``: our entry finished its lock (drained, silent)."""
        return self.entry is not None and self.entry.state == "Locked"

    def lose_tie_break(self, now: float) -> None:
        """Rule 5, ponger side: the peer's (pinger's) session wins; our InLocking entry goes to the responder.

        The entry is *not* released: it stays InLocking and the caller rebinds
        it to the responder session. Our caller gets :class:`PairBusy`.
        """
        self._fail(PairBusy(f"pair {self.nonce:#x}: the peer's simultaneous take won the tie-break"), now,
                   release=False)

    def _on_signal(self, sig: Signal, now: float) -> None:
        st = self.state
        if sig.type is SignalType.ABORT and self._can_fail():
            assert sig.reason is not None
            gone = sig.reason is AbortReason.UNKNOWN_PAIR
            self._fail(PeerRefused(f"peer aborted the handover of {self.nonce:#x}: {sig.reason.name}"), now,
                       gone=gone)
        elif st == "Locking" and sig.type is SignalType.LOCKED:
            self._machine.fire(self, "recv_locked", self._registry.listeners)
            self._advance(now)
        elif st == "Locking" and sig.type is SignalType.BUSY:
            self._machine.fire(self, "recv_busy", self._registry.listeners)
            self._release_entry(now, gone=False)
            self._finish(PairBusy(f"peer refused pair {self.nonce:#x}: busy"), now)
        elif st == "Taking" and sig.type is SignalType.TAKEN:
            self._enter_settling("recv_taken", now)
            self._advance(now)
        elif self._can_fail():
            self._unexpected(sig, now)
        else:
            self._drop(DropReason.UNEXPECTED, f"{sig.type.name} while {st}")

    def _advance(self, now: float) -> None:
        entry = self.entry
        if self.outcome is not None or (entry is not None and entry.state in _LOST and self._entry_lost(now)):
            return
        if self.state == "Draining":
            self._lock_entry(now)  # pinger: once drained; ponger: at once (peer pinger is Locked)
            if self.entry_locked:
                self._machine.fire(self, "send_take", self._registry.listeners)  # point of no return
                self._emit(SignalType.TAKE)
        if self.state == "Settling":
            self._try_settle(now)


class ResponderSession(Session):
    """One incoming LOCK: accept (or refuse) -> LOCKED -> (TAKE) -> lock -> TAKEN -> use."""

    role: Role = "responder"
    _machine = Compiled(ResponderMachine, RESPONDER)
    _abortable = RESPONDER.sets["abortable"]

    def __init__(self, registry: HandoverRegistry, lookup: Lookup, claim: Claim, data: bytes, now: float,
                 peer: str | None = None) -> None:
        """Process the session's first signal; call with the pool lock held (the pool's accept_session does).

        Before anything is claimed (or a local take yields in the tie-break):
        the channel's ``peer`` must be the pair's remote identity, and on a
        keyed pair the LOCK must be signed. A LOCK proves no freshness (it may
        be a recording); the TAKE does, being bound to our random: nothing
        irrecoverable happens before it (spec/handover.md, "Authenticated signals").
        """
        super().__init__(registry, now)
        self.state = RESPONDER.initial  # the machine's initial state; transitions go through it
        try:
            sig = wire.decode(data)
        except RemoteProtocolError as exc:
            self._refuse(SignalProtocolError(str(exc)), now, drop=exc)
            return
        self.nonce, self.sid = sig.nonce, sig.sid
        if sig.type is SignalType.ABORT:
            # The initiator gave up before its LOCK got here (e.g. a cancelled send): nothing to answer.
            assert sig.reason is not None
            self.received.append(sig)
            self._refuse(PeerRefused(f"initiator aborted before LOCK ({sig.reason.name})"), now)
            return
        if sig.type is not SignalType.LOCK or sig.seq != 1:
            bad = RemoteProtocolError(DropReason.UNEXPECTED, f"session opened with {sig!r}, expected LOCK #1")
            self._refuse(SignalProtocolError(str(bad)), now, drop=bad, reply=AbortReason.PROTOCOL)
            return
        self._recv_seq = 1
        self.received.append(sig)
        try:
            entry = lookup(sig.nonce)
        except UnknownPair:
            self._refuse(HandoverError(f"unknown pair {sig.nonce:#x}"), now, reply=AbortReason.UNKNOWN_PAIR)
            return
        if peer is not None and peer != entry.remote.identity:
            # Answered like an unknown nonce: for this peer there is no such pair (and no existence oracle).
            self._refuse(HandoverError(f"pair {sig.nonce:#x} is not shared with {peer!r}"), now,
                         drop=RemoteProtocolError(DropReason.UNEXPECTED_PEER,
                                                  f"LOCK for {sig.nonce:#x} from {peer!r}, its peer is "
                                                  f"{entry.remote.identity!r}"),
                         reply=AbortReason.UNKNOWN_PAIR)
            return
        if entry.key is not None or sig.signed:
            forged = self._keyed_lock(entry, sig)
            if forged is not None:
                self._refuse(SignalProtocolError(str(forged)), now, drop=forged)  # silence: no reply to sign
                return
        self.deadline = now + entry.config.lock_timeout
        owner = registry.owner(sig.nonce)
        if (isinstance(owner, InitiatorSession) and owner.state == "Locking" and not entry.is_pinger
                and entry.state == "InLocking"):
            owner.lose_tie_break(now)  # rule 5: the pinger's session wins; take over its InLocking entry
        else:
            try:
                entry = claim(sig.nonce, now)
            except UnknownPair:
                self._refuse(HandoverError(f"unknown pair {sig.nonce:#x}"), now, reply=AbortReason.UNKNOWN_PAIR)
                return
            except PairBusy:
                self._refuse(PairBusy(f"pair {sig.nonce:#x} is not Idle here"), now, reply=None, busy=True)
                return
        self.entry = entry
        registry.bind(self.nonce, self)
        self._machine.fire(self, "accept", self._registry.listeners)  # guard entry_claimed
        self._advance(now)

    def _keyed_lock(self, entry: PairEntry, sig: Signal) -> RemoteProtocolError | None:
        """A keyed pair's LOCK must be signed and verify; then this session signs with our own random."""
        if entry.key is None:
            return RemoteProtocolError(DropReason.BAD_MAC, "signed LOCK for a pair without a key")
        if not sig.signed:
            return RemoteProtocolError(DropReason.BAD_MAC, "unsigned (legacy) LOCK for a keyed pair")
        key = derive(entry.key, SIGNAL)
        if not wire.verify(sig, key, by_responder=False):
            return RemoteProtocolError(DropReason.BAD_MAC, "LOCK: MAC does not verify")
        if sig.rr != NO_RAND:
            return RemoteProtocolError(DropReason.MALFORMED, "LOCK carries a responder random")
        self._key, self._ri, self._rr = key, sig.ri, _session_random()
        return None

    @property
    def peer_may_proceed(self) -> bool:
        """Guard ``peer_may_proceed``: a pinger must be drained (silent, nothing in flight) before LOCKED goes out.

        It stays InLocking until TAKE proves the session fresh (TAKE is bound
        to our random): a recorded LOCK replayed to a pinger ends with the
        entry back in Idle, never Locked and expired.
        """
        entry = self.entry
        return entry is not None and (not entry.is_pinger or entry.state == "Locked"
                                      or (entry.state == "InLocking" and entry.drained))

    def _refuse(self, err: HandoverError, now: float, drop: RemoteProtocolError | None = None,
                reply: AbortReason | None = None, busy: bool = False) -> None:
        if drop is not None:
            self._drop(drop.reason, drop.detail)
        self._machine.fire(self, "refuse", self._registry.listeners)
        if busy:
            self._emit(SignalType.BUSY)
        elif reply is not None:
            self._emit(SignalType.ABORT, reply)
        self._finish(err, now)

    def _on_signal(self, sig: Signal, now: float) -> None:
        st = self.state
        if sig.type is SignalType.ABORT and self._can_fail():
            assert sig.reason is not None
            self._fail(PeerRefused(f"initiator aborted the handover of {self.nonce:#x}: {sig.reason.name}"), now)
        elif st == "Committed" and sig.type is SignalType.TAKE:
            # The initiator is Locked; we lock now (a pinger drained before LOCKED, a ponger has nothing in flight).
            self._lock_entry(now)
            if self.entry is None or self.entry.state != "Locked":
                self._fail(HandoverError(f"pair {self.nonce:#x} could not lock on TAKE"), now,
                           abort=AbortReason.ENTRY_GONE)
                return
            self._enter_settling("recv_take", now)  # point of no return: TAKEN goes out
            self._emit(SignalType.TAKEN)
            self._advance(now)
        elif self._can_fail():
            self._unexpected(sig, now)
        else:
            self._drop(DropReason.UNEXPECTED, f"{sig.type.name} while {st}")

    def _advance(self, now: float) -> None:
        entry = self.entry
        if self.outcome is not None or (entry is not None and entry.state in _LOST and self._entry_lost(now)):
            return
        if self.state == "Draining":
            # A pinger responder drains, then answers LOCKED still InLocking; both roles lock on TAKE.
            if self.peer_may_proceed:
                self._machine.fire(self, "send_locked", self._registry.listeners)
                self._emit(SignalType.LOCKED)
        if self.state == "Settling":
            self._try_settle(now)


def _session_random() -> bytes:
    """A fresh, non-zero session random (wire/signal.py version 2)."""
    while True:
        r = os.urandom(wire.RAND_SIZE)
        if any(r):
            return r
