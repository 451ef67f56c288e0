"""One NAT-traversed pair on one node: keepalive and lifecycle, sans-IO.

The entry never touches a socket or a clock. The driver feeds it inbound
datagrams and the current time, collects ``datagrams_to_send`` and arms one
timer from ``get_timer`` (aioquic style). Lifecycle transitions go through the
generated :class:`natpool.machines.EntryMachine`, so the runtime cannot drift
from ``spec/entry.toml``, while an idle entry stays a few hundred bytes (a
bound machine costs ~10.7 KB and ~130-200 us to construct). The machine is
bound only while it transitions: one reusable instance per thread (and
listener set) is pointed at the entry through a small proxy model; see
:func:`_run_machine`.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from statemachine.exceptions import TransitionNotAllowed

from natpool.config import PairConfig
from natpool.core import binding
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, InvalidState, RemoteProtocolError
from natpool.machines import EntryMachine
from natpool.machines.entry import EntryEvent, EntryState
from natpool.machines.tables import ENTRY
from natpool.wire.frame import FRAME_SIZE, Frame, Kind, decode, encode

_log = logging.getLogger(__name__)

#: Event loops (uvloop) fire timers up to 1 ms early. A deadline that close
#: counts as due; otherwise it stays armed in the past and the driver spins.
TIMER_SLACK: Final = 0.001

#: Bound on pongs queued between two ``datagrams_to_send`` calls, so a ping
#: flood from the remote address cannot grow memory; extra pings are dropped.
MAX_QUEUED_PONGS: Final = 8

_TALKING: Final = ENTRY.sets["talking"]
_PINGING: Final = ENTRY.sets["pinging"]
_SILENT: Final = ENTRY.sets["silent"]
_LIVE: Final = ENTRY.sets["live"]
_IDLE: Final = cast(EntryState, ENTRY.initial)
_FINAL: Final = ENTRY.final
# States named in the runtime logic that no spec set covers on its own.
_IN_LOCKING: Final[EntryState] = "InLocking"
_LOCKED: Final[EntryState] = "Locked"
_EXPIRED: Final[EntryState] = "Expired"

# Hot path: a well-formed frame for this entry is recognised and built without
# going through Frame objects (decode/encode stay the authority for anything
# else). The layout (8-byte big-endian nonce, then the kind byte) is checked here.
_PING_BYTE: Final = int(Kind.PING)
_PONG_BYTE: Final = int(Kind.PONG)
assert encode(Frame(0x0102030405060708, Kind.PONG)) == (0x0102030405060708).to_bytes(8, "big") + bytes([_PONG_BYTE])
assert FRAME_SIZE == 9 and (_PING_BYTE, _PONG_BYTE) == (0, 1)
_PING_SUFFIX: Final = bytes([_PING_BYTE])
_PONG_SUFFIX: Final = bytes([_PONG_BYTE])

# The hand-written initial value must be the generated machine's initial state.
assert EntryMachine.initial_state is not None and EntryMachine.initial_state.value == _IDLE


def _same_host_port(addr: object, raddr: tuple[str, int]) -> bool:
    """``addr`` names ``raddr`` (IPv6 4-tuples included); False for anything malformed, never raises."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return False
    return bool(addr[0] == raddr[0] and addr[1] == raddr[1])


class ExpiryReason(enum.Enum):
    """Why an entry left the pool (or, for ``LOCK_TIMEOUT`` on abort, gave up a lock)."""

    NO_INBOUND = "no_inbound"
    SEND_FAILURES = "send_failures"
    LOCK_TIMEOUT = "lock_timeout"
    CLOSED = "closed"
    PEER_GONE = "peer_gone"
    #: NO_INBOUND on an entry that received its own keepalive frames from another address
    #: (``PairEntry.seen_from``): the path is not dead, the peer's address is not the expected one.
    ADDRESS_MISMATCH = "address_mismatch"


@dataclass(frozen=True, slots=True)
class StateChanged:
    """One lifecycle transition, as the generated machine performed it (states/events typed by the spec)."""

    nonce: int
    source: EntryState
    target: EntryState
    event: EntryEvent
    reason: ExpiryReason | None
    at: float


@dataclass(frozen=True, slots=True)
class Drained:
    """An InLocking entry has nothing outstanding: ``finish_lock`` will now succeed.

    Emitted once per lock attempt: at ``begin_lock`` when nothing is
    outstanding (always for the ponger), else when the last ping is
    answered or times out.
    """

    nonce: int
    at: float


EntryOutput = StateChanged | Drained


@dataclass(slots=True)
class EntryStats:
    """Per-entry traffic counters (frames, not bytes: every frame is 9 bytes)."""

    sent: int = 0
    received: int = 0
    send_failures: int = 0
    ping_timeouts: int = 0
    drops: Counter[DropReason] = field(default_factory=Counter)


class EntryObserver(Protocol):
    """Who owns the entry (the pool): told of every event and drop as it happens.

    Called synchronously from inside the entry's method, under whatever lock
    the caller holds; it must not call back into a transition of the entry.
    """

    def entry_event(self, entry: PairEntry, event: EntryOutput) -> None: ...

    def entry_drop(self, entry: PairEntry, reason: DropReason) -> None: ...


def _run_machine(entry: PairEntry, event: EntryEvent, listeners: tuple[object, ...]) -> None:
    """Fire ``event`` through the generated :class:`EntryMachine` (see :mod:`natpool.core.binding`)."""
    binding.fire(EntryMachine, ENTRY, entry, event, listeners)


class PairEntry:
    """The keepalive and lifecycle of one pair (see ``spec/entry.toml``).

    ``state`` is written only by the generated ``EntryMachine``; every
    transition method pre-checks the generated table (cheap ``False`` for a
    refused CAS) and then fires the machine, which re-checks the guard.
    With an ``observer`` (the pool) events go to it instead of this entry's
    own queue, so exactly one consumer sees each event.
    """

    __slots__ = (
        "_events",
        "_failed_round",
        "_listeners",
        "_lock_started",
        "_next_ping",
        "_now",
        "_observer",
        "_ping_queued",
        "_pings",
        "_pongs",
        "_raddr",
        "_send_failures",
        "_settle_at",
        "config",
        "is_pinger",
        "last_seen",
        "local",
        "locked_at",
        "nonce",
        "pair",
        "remote",
        "seen_from",
        "srtt",
        "state",
        "stats",
    )

    def __init__(
        self,
        pair: EndpointPair,
        local_identity: str,
        is_pinger: bool,
        config: PairConfig,
        now: float,
        listeners: Sequence[object] = (),
        *,
        observer: EntryObserver | None = None,
    ) -> None:
        self.pair = pair
        self.nonce = pair.nonce
        self.local: Endpoint = pair.local(local_identity)
        self.remote: Endpoint = pair.remote(local_identity)
        # Compare against the form a socket reports (e.g. "::1", not "0::1").
        self._raddr = (ipaddress.ip_address(self.remote.host).compressed, self.remote.port)
        self.is_pinger = is_pinger
        self.config = config
        self.state: EntryState = _IDLE
        self.last_seen = now
        self.srtt: float | None = None
        self.stats = EntryStats()
        self.locked_at: float | None = None
        # First address this pair's own keepalive frame came from instead of ``remote`` (kept; see _foreign).
        self.seen_from: tuple[str, int] | None = None
        self._listeners = tuple(listeners)
        self._observer = observer
        self._events: list[EntryOutput] | None = None
        self._now = now
        self._lock_started: float | None = None
        self._settle_at: float | None = None
        self._send_failures = 0
        self._failed_round = False
        self._pongs = 0
        # Send times of outstanding pings, oldest first. A list, not a deque:
        # it holds one or two floats, and an empty deque alone is 760 bytes.
        self._pings: list[float] | None = [] if is_pinger else None
        self._ping_queued = False
        self._next_ping = now
        if is_pinger:
            self._queue_ping(now)

    # --- guards (named in spec/entry.toml, evaluated by the generated machine) ---

    @property
    def outstanding(self) -> int:
        """Pings sent and neither answered nor timed out."""
        return len(self._pings) if self._pings is not None else 0

    @property
    def drained(self) -> bool:
        """Guard of ``finish_lock``: the pinger has no ping whose pong could still arrive."""
        return not self._pings

    @property
    def settled(self) -> bool:
        """Guard of ``use``: ``settle_time`` has passed since the entry went silent."""
        settle = self.config.settle_time
        if settle == 0:
            return True
        return self.locked_at is not None and self._now >= self.locked_at + settle

    @property
    def has_output(self) -> bool:
        """True when ``datagrams_to_send`` would return something."""
        return self._ping_queued or self._pongs > 0

    # --- datagrams -------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """Account for one inbound datagram; bad or unexpected input is dropped and counted."""
        raddr = self._raddr
        # An IPv4 address is exactly (host, port); IPv6 adds flowinfo and scope, compared on host/port only.
        if addr != raddr and not _same_host_port(addr, raddr):
            self._foreign(data, addr)
            return
        # Fast path: a valid frame carrying our nonce (the nonce is never 0), no Frame object.
        if len(data) == FRAME_SIZE and data[8] <= _PONG_BYTE and int.from_bytes(data[:8], "big") == self.nonce:
            is_ping = data[8] == _PING_BYTE
        else:
            try:
                frame = decode(data)
            except RemoteProtocolError as exc:
                self._drop(exc.reason, addr)
                return
            if frame.nonce != self.nonce:
                self._drop(DropReason.WRONG_NONCE, addr)
                return
            is_ping = frame.kind is Kind.PING  # pragma: no cover - the fast path takes every valid frame
        state = self.state
        if state not in _TALKING:
            self._drop(DropReason.SILENT_STATE, addr)
            return
        self._now = now
        if is_ping:
            if self.is_pinger or self._pongs >= MAX_QUEUED_PONGS:
                self._drop(DropReason.UNEXPECTED, addr)
                return
            self._pongs += 1
        else:
            pings = self._pings
            if not pings:  # the ponger never expects a pong; the pinger only with one outstanding
                self._drop(DropReason.UNEXPECTED, addr)
                return
            sample = now - pings.pop(0)
            if sample < 0.0:
                sample = 0.0
            srtt = self.srtt
            self.srtt = sample if srtt is None else 0.875 * srtt + 0.125 * sample
            if state == _IN_LOCKING and not pings:
                self._emit(Drained(self.nonce, now))
        self.last_seen = now
        self.stats.received += 1
        self._send_failures = 0

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        """Frames due now. Always empty in a silent state."""
        if not (self._ping_queued or self._pongs):
            return []
        if self.state not in _TALKING:  # defensive: leaving the talking states clears the queue
            self._ping_queued = False
            self._pongs = 0
            return []
        raddr = self._raddr
        prefix = self.nonce.to_bytes(8, "big")
        if self._ping_queued:
            self._ping_queued = False
            out = [(prefix + _PING_SUFFIX, raddr)]
            if self._pongs:  # pragma: no cover - an entry is either the pinger or the ponger
                out.extend([(prefix + _PONG_SUFFIX, raddr)] * self._pongs)
        else:
            out = [(prefix + _PONG_SUFFIX, raddr)] * self._pongs
        self._pongs = 0
        # A round is known to have succeeded once the next one starts with no
        # failure reported in between; only then do consecutive failures reset.
        if not self._failed_round:
            self._send_failures = 0
        self._failed_round = False
        self.stats.sent += len(out)
        return out

    def send_failed(self, now: float) -> None:
        """The driver could not send a frame; enough consecutive failures expire the entry."""
        if self.state not in _TALKING:
            return  # a late report for a frame sent before going silent
        self.stats.send_failures += 1
        self._send_failures += 1
        self._failed_round = True
        if self._send_failures >= self.config.max_send_failures:
            self.expire(ExpiryReason.SEND_FAILURES, now)

    # --- timers ---------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest deadline this entry needs ``handle_timer`` for, or None."""
        state = self.state
        cfg = self.config
        if state == _IDLE:  # the hot case: plain comparisons, no min() calls
            t = self.last_seen + cfg.no_inbound_timeout
            pings = self._pings
            if pings is not None:
                if state in _PINGING and self._next_ping < t:
                    t = self._next_ping
                if pings and pings[0] + cfg.ping_lifespan < t:
                    t = pings[0] + cfg.ping_lifespan
            return t
        if state == _IN_LOCKING:
            assert self._lock_started is not None
            t = self._lock_started + cfg.lock_timeout
            if self._pings:
                t = min(t, self._pings[0] + self._ping_life(state))
            return t
        if state == _LOCKED:
            assert self._lock_started is not None
            t = self._lock_started + cfg.lock_timeout
            if self._settle_at is not None:
                t = min(t, self._settle_at)
            return t
        return None  # InUse belongs to the application; Expired is over

    def handle_timer(self, now: float) -> None:
        """Act on every deadline due at ``now`` (within :data:`TIMER_SLACK`)."""
        state = self.state
        if state not in _TALKING and state != _LOCKED:
            return
        self._now = now
        due = now + TIMER_SLACK
        cfg = self.config
        if self._lock_started is not None and due >= self._lock_started + cfg.lock_timeout:
            if state == _IN_LOCKING:
                self._fire("abort_lock", now, ExpiryReason.LOCK_TIMEOUT)
                state = self.state
            else:
                self.expire(ExpiryReason.LOCK_TIMEOUT, now)
                return
        if state == _LOCKED:
            if self._settle_at is not None and due >= self._settle_at:
                self._settle_at = None
            return
        pings = self._pings
        if pings:
            life = cfg.ping_lifespan if state != _IN_LOCKING else self._ping_life(state)
            expired = 0
            while expired < len(pings) and pings[expired] + life <= due:
                expired += 1
            if expired:
                del pings[:expired]
                self.stats.ping_timeouts += expired
                if state == _IN_LOCKING and not pings:
                    self._emit(Drained(self.nonce, now))
        if state == _IDLE and due >= self.last_seen + cfg.no_inbound_timeout:
            self.expire(ExpiryReason.NO_INBOUND, now)
            return
        if pings is not None and state in _PINGING and due >= self._next_ping:
            self._queue_ping(now)

    def _ping_life(self, state: str) -> float:
        """How long an outstanding ping may wait for its pong in ``state``."""
        cfg = self.config
        if state != _IN_LOCKING or self.srtt is None:
            return cfg.ping_lifespan
        return min(cfg.ping_lifespan, max(cfg.min_drain_grace, cfg.drain_grace_rtts * self.srtt))

    def _queue_ping(self, now: float) -> None:
        assert self._pings is not None
        if not self._ping_queued:  # two due intervals before a send still make one ping
            self._ping_queued = True
            self._pings.append(now)
        self._next_ping = now + self.config.ping_interval

    # --- events ---------------------------------------------------------------

    def next_event(self) -> EntryOutput | None:
        """Oldest undelivered event (always None when an observer takes them)."""
        if not self._events:
            return None
        return self._events.pop(0)

    def _emit(self, event: EntryOutput) -> None:
        if self._observer is not None:
            self._observer.entry_event(self, event)
            return
        if self._events is None:
            self._events = []
        self._events.append(event)

    def _foreign(self, data: bytes, addr: tuple[str, int]) -> None:
        """Drop a datagram from another address than ``remote``; tell a misplaced peer from noise.

        Our own well-formed keepalive frame (our nonce) from elsewhere means the
        peer is alive but seen from another (host, port): a symmetric NAT that
        maps each destination to a new port, or a pair built with a wrong port.
        Counted as ADDRESS_MISMATCH, remembered in ``seen_from`` (the first such
        address), and logged once per entry at WARNING: the operator must act
        (the pair cannot work as configured), while a flood of such frames still
        yields one line per entry, never one per datagram. Anything else from a
        foreign address is FOREIGN_ADDRESS, logged at DEBUG like every drop.
        """
        try:
            ours = decode(data).nonce == self.nonce
        except RemoteProtocolError:
            ours = False
        if not (ours and isinstance(addr, tuple) and len(addr) >= 2
                and isinstance(addr[0], str) and isinstance(addr[1], int)):
            self._drop(DropReason.FOREIGN_ADDRESS, addr)
            return
        if self.seen_from is None:
            self.seen_from = (addr[0], addr[1])
            _log.warning("pair %#x: its keepalive frames arrive from %s, not from %s (symmetric NAT or wrong "
                         "port?); dropped", self.nonce, self.seen_from, self._raddr)
        self._drop(DropReason.ADDRESS_MISMATCH, addr)

    def _drop(self, reason: DropReason, addr: tuple[str, int]) -> None:
        self.stats.drops[reason] += 1
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("pair %#x (%s): dropped datagram from %s: %s", self.nonce, self.state, addr, reason.value)
        if self._observer is not None:
            self._observer.entry_drop(self, reason)

    # --- lifecycle ------------------------------------------------------------

    def begin_lock(self, now: float) -> bool:
        """Claim (CAS Idle -> InLocking); False if not Idle. Atomic only under the pool lock."""
        return self._fire("begin_lock", now)

    def finish_lock(self, now: float) -> bool:
        """Go silent (InLocking -> Locked); False unless InLocking and ``drained``."""
        return self._fire("finish_lock", now)

    def abort_lock(self, now: float) -> None:
        """Return a claimed, still talking entry to the pool (InLocking -> Idle)."""
        if not self._fire("abort_lock", now):
            self._refuse("abort_lock")

    def use(self, now: float) -> bool:
        """Hand over to the application (Locked -> InUse); False unless Locked and ``settled``."""
        return self._fire("use", now)

    def expire(self, reason: ExpiryReason, now: float) -> None:
        """Any live state -> Expired; a no-op on an Expired entry.

        NO_INBOUND becomes ADDRESS_MISMATCH once ``seen_from`` is set: the peer
        was heard, from the wrong address, so the path is not simply dead.
        """
        if reason is ExpiryReason.NO_INBOUND and self.seen_from is not None:
            reason = ExpiryReason.ADDRESS_MISMATCH
        if self.state in _LIVE:
            self._fire("expire", now, reason)

    def _refuse(self, event: EntryEvent) -> None:
        """Let the generated machine reject ``event``, reported as local misuse."""
        try:
            EntryMachine(model=self, start_value=self.state).fire(event)
        except TransitionNotAllowed as exc:
            raise InvalidState(f"pair {self.nonce:#x}: {event} not allowed in {self.state}") from exc
        raise AssertionError(f"generated machine accepted {event} that the table refused")  # pragma: no cover

    def _fire(self, event: EntryEvent, now: float, reason: ExpiryReason | None = None) -> bool:
        """Pre-check with the table, then let the generated machine transition."""
        self._now = now
        source = self.state
        hit = ENTRY.transitions.get((source, event))
        if hit is None:
            return False
        guard = hit[1]
        if guard and not getattr(self, guard):
            return False
        _run_machine(self, event, self._listeners)
        target = self.state
        self._entered(source, target, now)
        self._emit(StateChanged(self.nonce, source, target, event, reason, now))
        if target == _IN_LOCKING and not self._pings:
            self._emit(Drained(self.nonce, now))
        return True

    def _entered(self, source: str, target: str, now: float) -> None:
        """Bookkeeping after the machine moved ``source`` -> ``target``."""
        if target == _IN_LOCKING:
            self._lock_started = now
            if self._ping_queued and self._pings:  # not sent yet: InLocking starts no new ping
                self._ping_queued = False
                self._pings.pop()
        elif target == _IDLE:
            self._lock_started = None
        elif target == _LOCKED:
            self.locked_at = now
            settle = self.config.settle_time
            self._settle_at = now + settle if settle > 0 else None
        if target in _SILENT:
            self._ping_queued = False
            self._pongs = 0
            if target != _LOCKED:
                self._settle_at = None
            if target == _EXPIRED and self._pings:
                self._pings.clear()

    def __repr__(self) -> str:
        role = "pinger" if self.is_pinger else "ponger"
        return f"PairEntry({self.nonce:#x}, {self.state}, {role}, {self.local!r} -> {self.remote!r})"
