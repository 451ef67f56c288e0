"""One NAT-traversed pair on one node: keepalive and lifecycle, sans-IO.

The entry never touches a socket or a clock. The driver feeds it inbound
datagrams and the current time, collects ``datagrams_to_send`` and arms one
timer from ``get_timer`` (aioquic style). Lifecycle transitions step the
compiled table of ``spec/entry.toml`` (:mod:`natpool.fsm`; ~0.1 µs instead of
~120 µs per python-statemachine event), which is checked against the generated
:class:`natpool.machines.EntryMachine` at import; with listeners bound, or in
strict mode, the generated class itself runs the transition. An idle entry
stays a few hundred bytes (a bound machine costs ~10.7 KB).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol, cast

from statemachine.exceptions import TransitionNotAllowed

import natpool.fsm as fsm
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, InvalidKey, InvalidState, RemoteProtocolError
from natpool.fsm import Compiled
from natpool.machines import EntryMachine
from natpool.machines.entry import EntryEvent, EntryState
from natpool.machines.tables import ENTRY
from natpool.wire.frame import FRAME_SIZE, is_ping_for, ping_bytes, pong_bytes
from natpool.wire.keepalive import KeepaliveKey, PairKeepalive, looks_keyed

_log = logging.getLogger(__name__)

#: Event loops (uvloop) fire timers up to 1 ms early. A deadline that close
#: counts as due; otherwise it stays armed in the past and the driver spins.
TIMER_SLACK: Final = 0.001

#: The ping schedule (see ``PairEntry._queue_ping``): every entry of one ``ping_interval`` pings on a grid of
#: PING_TICKS points per interval (absolute time), each at a fixed phase that it keeps. Entries due on one
#: point share one timer wake-up (at most PING_TICKS wake-ups per interval, whatever the pair count), and
#: phases never drift together: a schedule of ``now + interval`` after each (late) wake-up merges every
#: entry served by that wake-up into one group, until all pings of a pool leave in a few bursts.
PING_TICKS: Final = 64
#: A ping may leave up to this many ticks late and still keep its phase (the next one leaves one interval
#: after the *scheduled* time, so the gap is at least ``interval - PHASE_TOLERANCE_TICKS`` ticks); later
#: than that, the entry restarts on the grid one interval from now (the gap is never shorter).
PHASE_TOLERANCE_TICKS: Final = 4
#: A restart does not put every entry one late wake-up served on one point: each goes to one of the next
#: RESTART_SPREAD_TICKS points from ``now + interval`` on, by its old phase (old grid index modulo the
#: spread). With the whole grid as the spread that is the old phase itself, so a stall that made many
#: phases late leaves them as they were instead of merging them into one burst (a bench's 40 ms garbage
#: collection once merged a whole pool). The restart gap is then up to this many ticks (one interval)
#: longer than an interval; the spread shrinks so that the extra stays within half of
#: ``no_inbound_timeout - ping_interval`` (the defaults allow it all; a tight config spreads less, and a
#: config with less than two ticks of margin restarts every late entry on one point, as before).
RESTART_SPREAD_TICKS: Final = PING_TICKS
#: Compacting the outstanding-ping list once this many answered slots lead it keeps the
#: drain O(1) per ping without a deque (an empty deque alone costs ~760 bytes per entry).
_PING_COMPACT: Final = 16

#: Bound on pongs queued between two ``datagrams_to_send`` calls, so a ping
#: flood from the remote address cannot grow memory; extra pings are dropped.
MAX_QUEUED_PONGS: Final = 8

#: Pong rate limit (GCRA, one float per entry): sustained at most PONGS_PER_INTERVAL answers per
#: ``ping_interval`` of this entry's config, in bursts of at most PONG_BURST. An honest pinger with the same
#: config sends one ping per interval, so this leaves 4x headroom (a faster-pinging peer, a burst after
#: loss); a flood of pings (forged in legacy mode, where anyone can make them) is not reflected 1:1: the
#: excess is dropped as ``DropReason.RATE_LIMITED``, neither answered nor counted as inbound.
PONGS_PER_INTERVAL: Final = 4
PONG_BURST: Final = 8

#: Keyed ponger: ping ids accepted below the highest one seen (anti-replay window, IPsec style), so a
#: reordered ping is still answered once while any replay is refused.
REPLAY_WINDOW: Final = 64
_WINDOW_MASK: Final = (1 << REPLAY_WINDOW) - 1
#: A keyed pinger's slot of a ping answered out of order (``_pings``); never at ``_ping_head``.
_ANSWERED: Final = math.inf

#: Keys shorter than this cannot authenticate anything; BLAKE2b keys stop at 64 bytes.
MIN_KEY_SIZE: Final = 16
MAX_KEY_SIZE: Final = 64

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

_MACHINE: Final = Compiled(EntryMachine, ENTRY)
_TRANSITIONS: Final = ENTRY.transitions
# The claim's row, stepped inline by ``begin_lock`` (the hot path of take_any): unguarded Idle -> InLocking.
assert _TRANSITIONS[(cast(EntryState, ENTRY.initial), "begin_lock")] == ("InLocking", "")

# The hand-written initial value must be the generated machine's initial state.
assert EntryMachine.initial_state is not None and EntryMachine.initial_state.value == _IDLE


def check_key(key: object) -> None:
    """Raise :class:`InvalidKey` unless ``key`` is None or ``bytes`` of MIN_KEY_SIZE..MAX_KEY_SIZE.

    Where the key comes from: natpool does not make it. The traversal layer
    that punched the pair already runs an authenticated session with the peer
    (a Noise/TLS handshake, a signed rendezvous, ...); it exports a secret from
    that session bound to both endpoints and the nonce, e.g.
    ``hashlib.blake2b(b"natpool pair" + local_id + remote_id + nonce.to_bytes(8, "big"),
    key=session_secret).digest()`` with the identities in a fixed (sorted)
    order, or ``HKDF(session_secret, info=...)`` over the same fields. Both ends
    compute the same key without sending it, a key for one pair is useless for
    another, and nobody outside that session can compute it. natpool derives its
    own sub-keys from it (``natpool.wire.keys.derive``).
    """
    if key is None:
        return
    if not isinstance(key, bytes):
        raise InvalidKey(f"the pair key must be bytes, got {type(key).__name__}")
    if not MIN_KEY_SIZE <= len(key) <= MAX_KEY_SIZE:
        raise InvalidKey(f"the pair key must be {MIN_KEY_SIZE} to {MAX_KEY_SIZE} bytes, got {len(key)}")


def _legacy_nonce(data: bytes) -> int:
    """The nonce of a 9-byte legacy frame with a valid flag byte, else 0 (never a pair's nonce)."""
    if len(data) != FRAME_SIZE or data[8] > 1:
        return 0
    return int.from_bytes(data[:8], "big")


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
    #: NO_INBOUND on a keyed entry that, since its last valid frame, got this pair's keyed frames from the
    #: peer's address whose MAC did not verify (``DropReason.BAD_MAC``): the two ends hold different keys,
    #: or someone forges at the peer's address. Either way nothing authentic arrived: the entry expires on
    #: the same deadline as NO_INBOUND, only the reason says more.
    KEY_MISMATCH = "key_mismatch"
    #: NO_INBOUND on an entry that, since its last valid frame, got this pair's frames from the peer's
    #: address in the other format (``DropReason.FORMAT_MISMATCH``): one end was added with a key, the
    #: other without.
    FORMAT_MISMATCH = "format_mismatch"


class StateChanged(NamedTuple):
    """One lifecycle transition, as the generated machine performed it (states/events typed by the spec).

    Immutable; a named tuple, not a frozen dataclass, because one is made per
    transition on the hot paths (a take makes two events): built with
    ``tuple.__new__`` it costs ~0.1 µs, a frozen dataclass's ``__init__``
    (one ``object.__setattr__`` per field) ~1.3 µs.
    """

    nonce: int
    source: EntryState
    target: EntryState
    event: EntryEvent
    reason: ExpiryReason | None
    at: float


class Drained(NamedTuple):
    """An InLocking entry has nothing outstanding: ``finish_lock`` will now succeed (a named tuple, as above).

    Emitted once per lock attempt: at ``begin_lock`` when nothing is
    outstanding (always for the ponger), else when the last ping is
    answered or times out.
    """

    nonce: int
    at: float


EntryOutput = StateChanged | Drained

_new_event: Final = tuple.__new__  # StateChanged / Drained without the keyword-parsing ``__new__`` of a NamedTuple


@dataclass(slots=True)
class EntryStats:
    """Per-entry traffic counters (frames, not bytes: a legacy frame is 9 bytes, a keyed one 34)."""

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

    def entry_claimed(self, entry: PairEntry, changed: StateChanged, drained: Drained) -> None:
        """The claim (Idle -> InLocking) of a drained entry: its two events in one call (take_any's hot path)."""


class PairEntry:
    """The keepalive and lifecycle of one pair (see ``spec/entry.toml``).

    ``state`` is written only by :meth:`_fire`: it steps the compiled table
    (a refused CAS is a cheap ``False``), or lets the generated
    ``EntryMachine`` transition when listeners are bound or in strict mode.
    With an ``observer`` (the pool) events go to it instead of this entry's
    own queue, so exactly one consumer sees each event.
    """

    __slots__ = (
        "_armed",
        "_events",
        "_failed_round",
        "_ka",
        "_listeners",
        "_lock_started",
        "_machine_binding",
        "_mismatch",
        "_next_ping",
        "_now",
        "_observer",
        "_ping_head",
        "_ping_queued",
        "_pings",
        "_pong_ids",
        "_pong_tat",
        "_pongs",
        "_raddr",
        "_rx_frame",
        "_send_failures",
        "_seq",
        "_settle_start",
        "_tx_frame",
        "_window",
        "config",
        "is_pinger",
        "key",
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
        key: bytes | None = None,
    ) -> None:
        check_key(key)
        #: The per-pair key (None: the unauthenticated legacy astrald frame). See ``check_key`` for who makes it.
        self.key = key
        self._ka: PairKeepalive | None = KeepaliveKey(key).for_pair(pair.nonce) if key is not None else None
        # Keyed pinger: id of the newest ping in ``_pings``; keyed ponger: highest ping id accepted.
        self._seq = 0
        self._window = 0  # keyed ponger: bit i = ping id ``_seq - i`` was accepted (REPLAY_WINDOW)
        self._pong_ids: list[int] | None = [] if key is not None and not is_pinger else None
        # Legacy frames of this pair, built once: the one it expects (a ping at the ponger, a pong at the
        # pinger) is recognised by one bytes comparison, the one it sends is reused (the per-datagram path).
        if key is None:
            self._rx_frame = pong_bytes(pair.nonce) if is_pinger else ping_bytes(pair.nonce)
            self._tx_frame = ping_bytes(pair.nonce) if is_pinger else pong_bytes(pair.nonce)
        else:
            self._rx_frame = self._tx_frame = b""
        self._pong_tat = now  # GCRA's theoretical arrival time of the next allowed pong
        # (KEY_MISMATCH or FORMAT_MISMATCH, when) of the last such drop from the peer's address.
        self._mismatch: tuple[ExpiryReason, float] | None = None
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
        self._machine_binding: object = None  # natpool.fsm: the class bound here, only with listeners/strict
        self._observer = observer
        #: The deadline the owning pool scheduled for this entry (natpool.core.pool; None: none). The pool's.
        self._armed: float | None = None
        self._events: deque[EntryOutput] | None = None  # only without an observer
        self._now = now
        self._lock_started: float | None = None
        self._settle_start: float | None = None  # spec/entry.toml: settle_start, set by start_settle
        self._send_failures = 0
        self._failed_round = False
        self._pongs = 0
        # Send times of outstanding pings, oldest at ``_ping_head`` (answered ones before it are
        # dropped in bulk, see _PING_COMPACT). A list, not a deque: it holds one or two floats,
        # and an empty deque alone is 760 bytes.
        self._pings: list[float] | None = [] if is_pinger else None
        self._ping_head = 0
        self._ping_queued = False
        self._next_ping = -math.inf  # no phase yet: _queue_ping puts the next ping on the grid
        if is_pinger:
            self._queue_ping(now)  # at once: the path is checked on add

    # --- guards (named in spec/entry.toml, evaluated by the generated machine) ---

    @property
    def outstanding(self) -> int:
        """Pings sent and neither answered nor timed out."""
        pings = self._pings
        if pings is None:
            return 0
        n = len(pings) - self._ping_head
        return n if n <= 1 else n - pings.count(_ANSWERED)

    @property
    def drained(self) -> bool:
        """Guard of ``finish_lock``: the pinger has no ping whose pong could still arrive."""
        return not self._pings

    @property
    def settled(self) -> bool:
        """Guard of ``use``: ``settle_time`` has passed since the settle started (:meth:`start_settle`).

        spec/entry.toml counts from ``settle_start``, when the handover role
        entered Settling (both sides silent from then on), not from this
        side's own lock: the side that locked first could still receive a
        pong its peer sent before the peer's later lock.
        """
        settle = self.config.settle_time
        if settle == 0:
            return True
        return self._settle_start is not None and self._now >= self._settle_start + settle

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
        if self._ka is not None:
            self._receive_keyed(data, addr, now)
            return
        if data == self._rx_frame:  # the frame this side expects (the common case): no parse
            is_ping = not self.is_pinger
        else:
            try:
                is_ping = is_ping_for(data, self.nonce)  # natpool.wire.frame: any other frame of this pair
            except RemoteProtocolError as exc:
                if looks_keyed(data, self.nonce):  # our peer was added with a key, we without
                    self._mismatched(ExpiryReason.FORMAT_MISMATCH, DropReason.FORMAT_MISMATCH, addr, now)
                else:
                    self._drop(exc.reason, addr)
                return
        state = self.state
        if state not in _TALKING:
            self._drop(DropReason.SILENT_STATE, addr)
            return
        self._now = now
        if is_ping:
            if self.is_pinger or self._pongs >= MAX_QUEUED_PONGS:
                self._drop(DropReason.UNEXPECTED, addr)
                return
            tat = self._pong_tat  # GCRA (see PONGS_PER_INTERVAL), inlined
            if tat < now:
                tat = now
            step = self.config.ping_interval / PONGS_PER_INTERVAL
            if tat - now > (PONG_BURST - 1) * step:
                self._drop(DropReason.RATE_LIMITED, addr)
                return
            self._pong_tat = tat + step
            self._pongs += 1
        else:
            pings = self._pings
            if not pings:  # the ponger never expects a pong; the pinger only with one outstanding
                self._drop(DropReason.UNEXPECTED, addr)
                return
            head = self._ping_head
            sample = now - pings[head]
            head += 1
            if head == len(pings):  # the common case: the only outstanding ping answered
                pings.clear()
                head = 0
            elif head >= _PING_COMPACT:
                del pings[:head]
                head = 0
            self._ping_head = head
            if sample < 0.0:
                sample = 0.0
            srtt = self.srtt
            self.srtt = sample if srtt is None else 0.875 * srtt + 0.125 * sample
            if state == _IN_LOCKING and not pings:
                self._emit(_new_event(Drained, (self.nonce, now)))
        self.last_seen = now
        self.stats.received += 1
        self._send_failures = 0

    def _receive_keyed(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """``receive_datagram`` of a keyed entry (from the remote address): only MAC-valid, fresh frames count.

        Anything else is dropped before it touches liveness, the drain or the
        pong queue: BAD_MAC (forged, corrupted, other key: remembered as a
        KEY_MISMATCH), FORMAT_MISMATCH (a legacy frame of this pair: the peer
        has no key), REPLAY (a pong whose ping is not outstanding, i.e. already
        answered or given up; a ping id already accepted or older than the
        replay window), RATE_LIMITED (pong budget spent).
        """
        ka = self._ka
        assert ka is not None
        nonce = self.nonce
        try:
            is_ping, ping_id = ka.open(data)
        except RemoteProtocolError as exc:
            reason = exc.reason
            if reason is DropReason.BAD_MAC:
                self._mismatched(ExpiryReason.KEY_MISMATCH, reason, addr, now)
            elif len(data) == FRAME_SIZE and reason is DropReason.MALFORMED and _legacy_nonce(data) == nonce:
                self._mismatched(ExpiryReason.FORMAT_MISMATCH, DropReason.FORMAT_MISMATCH, addr, now)
            else:
                self._drop(reason, addr)
            return
        state = self.state
        if state not in _TALKING:
            self._drop(DropReason.SILENT_STATE, addr)
            return
        self._now = now
        pings = self._pings
        if is_ping:
            pong_ids = self._pong_ids
            if pong_ids is None or len(pong_ids) >= MAX_QUEUED_PONGS:  # the pinger never expects a ping
                self._drop(DropReason.UNEXPECTED, addr)
                return
            seq = self._seq
            if ping_id > seq:
                shift = ping_id - seq
                window = ((self._window << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            else:
                off = seq - ping_id
                if off >= REPLAY_WINDOW or (self._window >> off) & 1:
                    self._drop(DropReason.REPLAY, addr)
                    return
                window = self._window | (1 << off)
            tat = self._pong_tat
            if tat < now:
                tat = now
            step = self.config.ping_interval / PONGS_PER_INTERVAL
            if tat - now > (PONG_BURST - 1) * step:  # authentic but too many: not answered, id not used up
                self._drop(DropReason.RATE_LIMITED, addr)
                return
            self._pong_tat = tat + step
            if ping_id > seq:
                self._seq = ping_id
            self._window = window
            pong_ids.append(ping_id)
            self._pongs += 1
        else:
            if not pings:  # the ponger never expects a pong; the pinger only with one outstanding
                self._drop(DropReason.UNEXPECTED if pings is None else DropReason.REPLAY, addr)
                return
            head = self._ping_head
            n = len(pings)
            newest = self._seq - 1 if self._ping_queued else self._seq  # the id of the newest ping sent
            first = self._seq - (n - 1 - head)  # the id of pings[head]
            if ping_id > newest:  # sealed with our key, yet never sent: our peer's bug; refuse it all the same
                self._drop(DropReason.UNEXPECTED, addr)
                return
            i = head + (ping_id - first)
            if ping_id < first or pings[i] == _ANSWERED:
                self._drop(DropReason.REPLAY, addr)
                return
            sample = now - pings[i]
            if i == head:
                head += 1
                while head < n and pings[head] == _ANSWERED:  # answered out of order earlier
                    head += 1
                if head == n:
                    pings.clear()
                    head = 0
                elif head >= _PING_COMPACT:
                    del pings[:head]
                    head = 0
                self._ping_head = head
            else:
                pings[i] = _ANSWERED
            if sample < 0.0:
                sample = 0.0
            srtt = self.srtt
            self.srtt = sample if srtt is None else 0.875 * srtt + 0.125 * sample
            if state == _IN_LOCKING and not pings:
                self._emit(_new_event(Drained, (nonce, now)))
        self.last_seen = now
        self.stats.received += 1
        self._send_failures = 0

    def _mismatched(self, expiry: ExpiryReason, reason: DropReason, addr: tuple[str, int], now: float) -> None:
        """Drop a frame of this pair that cannot be authenticated; remembered for the expiry reason.

        KEY_MISMATCH outranks FORMAT_MISMATCH since the last valid frame: a
        keyed frame under another key is the more specific diagnosis (an
        attacker at the peer's address may send both kinds).
        """
        m = self._mismatch
        if (expiry is ExpiryReason.KEY_MISMATCH or m is None or m[0] is not ExpiryReason.KEY_MISMATCH
                or m[1] < self.last_seen):
            self._mismatch = (expiry, now)
        self._drop(reason, addr)

    def is_own_frame(self, data: bytes) -> bool:
        """``data`` is this pair's own keepalive frame: legacy frame with its nonce, or keyed with a valid MAC.

        The driver asks this of a datagram at a silent (handed-over) entry's
        socket: a late keepalive is the pool's to drop, anything else is the
        application's. Keyed, a frame forged with the (public) nonce is not
        ours and goes to the application like any other unauthenticated datagram.
        """
        ka = self._ka
        if ka is None:
            return len(data) == FRAME_SIZE and _legacy_nonce(data) == self.nonce
        return ka.verify(data)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        """Frames due now. Always empty in a silent state."""
        if not (self._ping_queued or self._pongs):
            return []
        if self.state not in _TALKING:  # defensive: leaving the talking states clears the queue
            self._ping_queued = False
            self._pongs = 0
            if self._pong_ids:
                self._pong_ids.clear()
            return []
        raddr = self._raddr
        ka = self._ka
        if ka is not None:
            pong_ids = self._pong_ids
            if self._ping_queued:
                self._ping_queued = False
                out = [(ka.ping(self._seq), raddr)]
            else:
                assert pong_ids is not None
                if len(pong_ids) == 1:  # the common case; no comprehension frame
                    out = [(ka.pong(pong_ids[0]), raddr)]
                else:
                    out = [(ka.pong(i), raddr) for i in pong_ids]
                pong_ids.clear()
        elif self._ping_queued:
            self._ping_queued = False
            out = [(self._tx_frame, raddr)]
            if self._pongs:  # pragma: no cover - an entry is either the pinger or the ponger
                out.extend([(pong_bytes(self.nonce), raddr)] * self._pongs)
        elif self._pongs == 1:
            out = [(self._tx_frame, raddr)]
        else:
            out = [(self._tx_frame, raddr)] * self._pongs
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
                if pings and pings[self._ping_head] + cfg.ping_lifespan < t:
                    t = pings[self._ping_head] + cfg.ping_lifespan
            return t
        if state == _IN_LOCKING:
            assert self._lock_started is not None
            t = self._lock_started + cfg.lock_timeout
            if self._pings:
                t = min(t, self._pings[self._ping_head] + self._ping_life(state))
            return t
        if state == _LOCKED:  # the settle wait is the handover session's timer, not the entry's
            assert self._lock_started is not None
            return self._lock_started + cfg.lock_timeout
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
            return
        pings = self._pings
        if pings:
            life = cfg.ping_lifespan if state != _IN_LOCKING else self._ping_life(state)
            limit = due
            if state == _IDLE and due >= self._next_ping:
                # A ping leaves now: one sent a little less than a lifespan ago (its slot kept the phase,
                # see _queue_ping) is given up first, so pings never overlap and a legacy pong, which
                # names no ping, retires the one it answers.
                limit = due + PHASE_TOLERANCE_TICKS * cfg.ping_interval / PING_TICKS
            head = start = self._ping_head
            timeouts = 0
            while head < len(pings):
                t = pings[head]
                if t + life <= limit:
                    timeouts += 1
                elif t != _ANSWERED:  # a keyed ping answered out of order is skipped, not timed out
                    break
                head += 1
            if head > start:
                self.stats.ping_timeouts += timeouts
                if head == len(pings) or head >= _PING_COMPACT:
                    del pings[:head]
                    head = 0
                self._ping_head = head
                if state == _IN_LOCKING and not pings:
                    self._emit(_new_event(Drained, (self.nonce, now)))
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
        """Queue the ping due now and schedule the next: one interval after this one's slot (phase kept).

        Late by more than PHASE_TOLERANCE_TICKS (a stalled loop, a resumed
        entry), the entry restarts on one of the RESTART_SPREAD_TICKS grid
        points from one interval after now, picked by its old phase (its
        phase itself when the timeout margin allows: the entries one late
        wake-up served stay apart): pings are never closer than ``interval``
        minus the tolerance, and
        :meth:`handle_timer` gives up an older ping that near its lifespan when
        the next one leaves, so at most one stays outstanding (see PairConfig).
        """
        assert self._pings is not None
        if not self._ping_queued:  # two due intervals before a send still make one ping
            self._ping_queued = True
            self._pings.append(now)
            self._seq += 1  # its id (keyed frames carry it; legacy ones do not)
        interval = self.config.ping_interval
        nxt = self._next_ping + interval
        tick = interval / PING_TICKS
        if nxt < now + interval - PHASE_TOLERANCE_TICKS * tick:
            point = math.ceil((now + interval) / tick)
            if self._next_ping > -math.inf:  # a phase to keep apart from the others' (not the ping of add)
                spread = min(RESTART_SPREAD_TICKS, int((self.config.no_inbound_timeout - interval) / (2 * tick)))
                if spread > 1:
                    point += (round(self._next_ping / tick) - point) % spread
            nxt = point * tick
        self._next_ping = nxt

    # --- events ---------------------------------------------------------------

    def next_event(self) -> EntryOutput | None:
        """Oldest undelivered event (always None when an observer takes them)."""
        if not self._events:
            return None
        return self._events.popleft()

    def _emit(self, event: EntryOutput) -> None:
        if self._observer is not None:
            self._observer.entry_event(self, event)
            return
        if self._events is None:
            self._events = deque()
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
        if not (self.is_own_frame(data) and isinstance(addr, tuple) and len(addr) >= 2
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
        """Claim (CAS Idle -> InLocking); False if not Idle. Atomic only under the pool lock.

        The hot path of take_any steps the table's (Idle, begin_lock) row
        inline (checked at import: unguarded, to InLocking) for an entry with
        no ping outstanding, an observer, no listeners and strict mode off;
        everything else goes through :meth:`_fire`. Same state, same events.
        """
        observer = self._observer
        if observer is None:
            return self._fire("begin_lock", now)
        claimed = self.claim_drained(now)
        if claimed is None:
            return self._fire("begin_lock", now)
        observer.entry_claimed(self, claimed[0], claimed[1])
        return True

    def claim_drained(self, now: float) -> tuple[StateChanged, Drained] | None:
        """The inline claim of :meth:`begin_lock`, for the pool only: its two events returned, not emitted.

        None, changing nothing, unless the entry is Idle with no ping
        outstanding, no listeners are bound and strict mode is off; then the
        caller (the pool, lock held) must index the events as ``entry_claimed``
        does, or call :meth:`begin_lock` instead.
        """
        if self.state != _IDLE or self._pings or self._listeners or fsm._strict:
            return None
        self.state = _IN_LOCKING
        self._now = self._lock_started = now  # all of _entered for this row: no ping outstanding, none queued
        nonce = self.nonce
        return (_new_event(StateChanged, (nonce, _IDLE, _IN_LOCKING, "begin_lock", None, now)),
                _new_event(Drained, (nonce, now)))

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
        if reason is ExpiryReason.NO_INBOUND:
            mismatch = self._mismatch
            if self.seen_from is not None:
                reason = ExpiryReason.ADDRESS_MISMATCH
            elif mismatch is not None and mismatch[1] >= self.last_seen:
                reason = mismatch[0]
        if self.state in _LIVE:
            self._fire("expire", now, reason)

    def start_settle(self, now: float) -> bool:
        """The handover role entered Settling: ``settled`` counts ``settle_time`` from ``now``.

        spec/entry.toml's ``settle_start``; the session calls this (it owns the
        settle timer). False, changing nothing, unless the entry is Locked.
        """
        if self.state != _LOCKED:
            return False
        self._settle_start = now
        return True

    def _refuse(self, event: EntryEvent) -> None:
        """Let the generated machine reject ``event``, reported as local misuse."""
        try:
            _MACHINE.refuse(self, event)
        except TransitionNotAllowed as exc:
            raise InvalidState(f"pair {self.nonce:#x}: {event} not allowed in {self.state}") from exc

    def _fire(self, event: EntryEvent, now: float, reason: ExpiryReason | None = None) -> bool:
        """Step the compiled table (False when it refuses); the generated class runs it when required."""
        self._now = now
        source = self.state
        hit = _TRANSITIONS.get((source, event))
        if hit is None:
            return False
        guard = hit[1]
        if guard and not getattr(self, guard):
            return False
        _MACHINE.enter(self, event, hit[0], self._listeners)
        target = self.state
        if target == _IN_LOCKING and self._pings is None:  # a ponger's claim, the hot case: all of _entered
            self._lock_started = now
        else:
            self._entered(source, target, now)
        changed = _new_event(StateChanged, (self.nonce, source, target, event, reason, now))
        drained = target == _IN_LOCKING and not self._pings
        observer = self._observer
        if observer is not None:  # _emit inlined: a claim's two events are the hot path
            observer.entry_event(self, changed)
            if drained:
                observer.entry_event(self, _new_event(Drained, (self.nonce, now)))
            return True
        self._emit(changed)
        if drained:
            self._emit(_new_event(Drained, (self.nonce, now)))
        return True

    def _entered(self, source: str, target: str, now: float) -> None:
        """Bookkeeping after the machine moved ``source`` -> ``target``."""
        if target == _IN_LOCKING:
            self._lock_started = now
            pings = self._pings
            if self._ping_queued and pings:  # not sent yet: InLocking starts no new ping
                self._ping_queued = False
                pings.pop()
                self._seq -= 1  # its id never went out: the next ping reuses it
                if len(pings) == self._ping_head:
                    pings.clear()
                    self._ping_head = 0
        elif target == _IDLE:
            self._lock_started = None
        elif target == _LOCKED:
            self.locked_at = now
            self._settle_start = None  # a new lock: the session starts the settle (start_settle)
        if target in _SILENT:
            self._ping_queued = False
            self._pongs = 0
            if self._pong_ids:
                self._pong_ids.clear()
            if target == _EXPIRED and self._pings:
                self._pings.clear()
                self._ping_head = 0

    def __repr__(self) -> str:
        role = "pinger" if self.is_pinger else "ponger"
        return f"PairEntry({self.nonce:#x}, {self.state}, {role}, {self.local!r} -> {self.remote!r})"
