"""``AsyncPairPool``: the sans-IO :class:`~natpool.core.node.Node` on a running asyncio loop.

A thin driver: it feeds the node its inputs (datagrams, signals, the timer),
transmits its outputs, re-arms ONE timer (entries and handover sessions
alike) and maps sockets and signalling channels to the node's nonces and
channel ids; every protocol decision is the node's.

What the driver adds to the core, and why it is shaped this way
(figures: shared/notes/measured-facts.md):

* **One UDP socket per entry**, opened with a bare ``socket()`` + ``bind()``
  and then adopted with ``loop.create_datagram_endpoint(sock=...)`` — the
  cheapest way to open an endpoint (~4 µs vs ~20 µs with ``local_addr=``).
  A bind failure raises :class:`~natpool.errors.BindFailed` and leaves the
  pool unchanged. Callers that already own a bound socket (the hole punch's)
  pass it as ``sock=``.
* **One scheduler for every entry**: a single ``loop.call_at`` handle re-armed
  to ``node.get_timer()`` (which covers the handover sessions too). A task or timer per entry costs ~1.7 KB and ~6 µs
  more per ping. Everything due within 1 ms is taken in the same wake-up
  (uvloop fires up to 1 ms early; without this a heap scheduler spins), up
  to :data:`TIMER_BATCH` entries: when more are due at once (a peer vanished
  with thousands of pairs) the rest run on the next loop iteration, so one
  callback never blocks the loop for long. That stall is what the drain
  grace must outlast (``min_drain_grace``, 0.2 s: CleanHandover's timing
  assumption); a batch costs a few ms whatever the number due, and every
  iteration runs one, so the last due entry waits ceil(due / TIMER_BATCH)
  iterations — late expiry only ever keeps an entry longer, never sends.
* **Small receive buffer**: asyncio's selector transport reads every datagram
  into a 256 KiB buffer (``max_size``), which costs an mmap/munmap per
  datagram; 2 KiB (far above the 9-byte frame) is ~3x cheaper. ``max_size``
  is a *private* attribute of ``asyncio.selector_events._SelectorDatagramTransport``,
  so it is set only when present (uvloop has none and needs none).
* After every input (datagram or timer) the core's outgoing datagrams are
  written to the right transports; a send error is reported to the entry
  (``send_failed``) so repeated failures expire it.
* Events are drained after every input that produced one (the common pong
  produces none: it costs one peek at the queue) — entry events
  (``StateChanged`` / ``Drained``) are fanned out to callbacks and
  subscribers and an expired entry's socket is closed at once; session
  events resolve the waiting ``take`` / ``serve_handover`` and close
  channels. Events go first in each round, signals after them.
* Once an entry is silent (Locked/InUse, from the generated ``silent`` and
  ``live`` sets) every datagram on its socket is the application's — the
  peer may be handed over first and start talking while this side still
  waits for its last signal — whatever its size, so it is kept (bounded,
  overflow counted in ``DriverStats.lease_buffer_drops``) for the lease and
  replayed by :meth:`Lease.set_protocol`. The one exception is a datagram
  that decodes as this pair's own keepalive: a ping still in flight when the
  ponger went silent, which must not leak into the application's stream;
  the core drops it (``silent_state``) as before. The node decides which
  (``ApplicationData`` from ``Node.receive_and_reply``), from the entry's state.
* The receive buffer is widened to :data:`LEASE_RECV_BUFFER` (every UDP
  payload fits) when the entry's transition to silent is drained, which is
  before any signal of the same round goes out (the one that lets the peer
  go InUse and talk), so an application datagram above 2 KiB is never cut to
  ``max_size``: on a datagram socket the kernel discards the excess silently.
* Handover: :meth:`take` / :meth:`take_any` / :meth:`serve_handover` start
  sessions in the node and map their channels (a user-supplied
  :class:`~natpool.signalling.Signalling`) through
  :class:`natpool.aio.handover.NodeChannels`. The lease hands the still-bound
  socket over *open*; from then on it belongs to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import warnings
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

from natpool.aio.handover import CANCEL_SEND_TIMEOUT, NodeChannels, first_signal
from natpool.config import PairConfig
from natpool.core.entry import Drained, PairEntry, StateChanged, check_key
from natpool.core.lease import Lease
from natpool.core.node import ApplicationData, CloseChannel, Node, SessionEnded
from natpool.endpoints import EndpointPair
from natpool.errors import (
    BindFailed,
    ChannelBroken,
    DuplicateNonce,
    HandoverCancelled,
    HandoverError,
    InvalidSocket,
    LocalError,
    PoolClosed,
    UnknownPair,
)
from natpool.machines.entry import EntryState
from natpool.machines.tables import ENTRY
from natpool.mux import MuxChannel
from natpool.signalling import SignalChannel, Signalling

log = logging.getLogger(__name__)

RECV_BUFFER = 2048
TIMER_SLACK = 0.001  # take every timer due within 1 ms in one wake-up
# At most this many due entries per timer callback; the rest run on the next loop iteration. Each one costs
# the core's step, its events and (for an expiry) a transport close, ~5-10 us: a batch blocks the loop for
# a few ms whatever the number due (2,000 expiring at once in one callback blocked it for 30-50 ms).
TIMER_BATCH = 256
EARLY_LIMIT = 256  # application datagrams kept for a lease between Locked and set_protocol
EARLY_BYTES = 1 << 20  # ... and at most this many bytes of them (a 64 KiB datagram flood stays bounded)
# Above the largest UDP payload (65,527 bytes): a leased socket never truncates. Not asyncio's 256 KiB default:
# measured (blocking loopback, 9-byte exchange + recvfrom(n), median of 3 x 30k): 2 KiB 10.5 us, 64 KiB 11.1 us,
# 256 KiB 39.4 us — 64 KiB stays under malloc's mmap threshold, so it costs the lease almost nothing.
LEASE_RECV_BUFFER = 65_536
EARLY_BEFORE_ADD = 8  # datagrams kept that arrive between opening the socket and registering the entry
# spec/entry.toml: silent and live (Locked, InUse) — no keepalive goes out, inbound datagrams are the app's.
LEASE_STATES: frozenset[str] = ENTRY.sets["silent"] & ENTRY.sets["live"]
_FINAL: frozenset[str] = ENTRY.final

Event = StateChanged | Drained
Addr = tuple[str, int]
WireObserver = Callable[[str, int, bytes, Addr, str], None]
"""``observer(direction, nonce, data, addr, entry_state)``; direction is "send" or "recv"."""


@dataclass(frozen=True, slots=True)
class EntrySnapshot:
    """Per-entry statistics at one instant (a copy: safe to keep)."""

    nonce: int
    peer: str
    state: EntryState
    is_pinger: bool
    srtt: float | None
    last_seen: float
    frames_sent: int
    frames_received: int
    drops: dict[str, int]
    send_errors: int
    #: Where this pair's own keepalive frames came from instead of the expected address (symmetric NAT?).
    seen_from: tuple[str, int] | None = None


@dataclass(slots=True)
class DriverStats:
    """Counters of the driver itself (the core counts per-entry frames and drops)."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    send_errors: int = 0
    timer_wakeups: int = 0
    sockets_opened: int = 0
    sockets_closed: int = 0
    events: int = 0
    events_lost: int = 0  # subscriber queues that were full
    lease_buffer_drops: int = 0  # application datagrams a full lease buffer refused (before set_protocol)


class _EntryProtocol(asyncio.DatagramProtocol):
    """Feeds one entry's datagrams into the pool; nothing else lives here (kept tiny on purpose)."""

    __slots__ = ("_feed", "_nonce", "_owner", "early", "entry", "sock", "transport")

    def __init__(self, owner: AsyncPairPool, nonce: int) -> None:
        self._owner = owner
        self._feed = owner._on_datagram  # bound once: one attribute lookup less per datagram
        self._nonce = nonce
        self.entry: PairEntry | None = None  # set once the core registered it
        self.sock: socket.socket | None = None  # the real socket, for the lease (asyncio exposes a wrapper)
        self.early: list[tuple[bytes, Any]] | None = None  # arrived before that (uvloop reads at once)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: CPython 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        # Private asyncio attribute (see module docstring): guarded, absent on uvloop.
        if hasattr(transport, "max_size"):
            transport.max_size = RECV_BUFFER

    def datagram_received(self, data: bytes, addr: Any) -> None:
        entry = self.entry
        if entry is None:
            # The socket reads before add() registered the entry (the peer pinged first): keep a few.
            if self.early is None:
                self.early = []
            if len(self.early) < EARLY_BEFORE_ADD:
                self.early.append((data, addr))
            return
        self._feed(self._nonce, entry, data, addr)

    def error_received(self, exc: Exception) -> None:
        self._owner._on_socket_error(self._nonce, exc)


class LeasedProtocol(asyncio.DatagramProtocol):
    """A leased transport's protocol until the application calls :meth:`Lease.set_protocol`: it only buffers.

    It starts collecting while the entry is still pooled (the first datagram
    after the entry went silent) and becomes the transport's protocol at the
    hand-over. Bounded by count and bytes; when full it refuses the *newest*
    datagram (counted in :attr:`dropped` and ``DriverStats.lease_buffer_drops``),
    so what the application replays is the unbroken start of the peer's stream.
    """

    def __init__(self, stats: DriverStats | None = None, limit: int = EARLY_LIMIT,
                 max_bytes: int = EARLY_BYTES) -> None:
        self.buffer: deque[tuple[bytes, Any]] = deque()
        self.dropped = 0
        self._bytes = 0
        self._limit = limit
        self._max_bytes = max_bytes
        self._stats = stats

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(self.buffer) >= self._limit or self._bytes + len(data) > self._max_bytes:
            self.dropped += 1
            if self._stats is not None:
                self._stats.lease_buffer_drops += 1
            log.debug("lease buffer full: dropped a %d-byte datagram from %s", len(data), addr)
            return
        self.buffer.append((data, addr))
        self._bytes += len(data)

    def drain(self) -> list[tuple[bytes, Any]]:
        """Everything buffered, oldest first; the buffer is empty afterwards."""
        items = list(self.buffer)
        self.buffer.clear()
        self._bytes = 0
        return items

    def error_received(self, exc: Exception) -> None:
        log.debug("leased socket error before the application's protocol: %s", exc)


class Subscription:
    """An async iterator over pool events; bounded, so a slow consumer loses events (counted) not memory."""

    def __init__(self, owner: AsyncPairPool, maxsize: int) -> None:
        self._owner = owner
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self.lost = 0

    def _put(self, event: Event | None) -> bool:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost += 1
            return False
        return True

    def close(self) -> None:
        self._owner._subscriptions.discard(self)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event


class AsyncPairPool:
    """A pool of NAT-traversed UDP pairs kept alive on the running event loop.

    Use as ``async with AsyncPairPool("alice") as pool:``; ``close`` closes
    every socket the pool still owns (handed-over sockets belong to their
    lease, except responder leases never accepted, which close with the
    pool). ``signalling`` is needed only for :meth:`take` / :meth:`take_any`;
    responder leases go to ``on_lease`` if given, else queue for :meth:`accept`.
    """

    def __init__(
        self,
        local_identity: str,
        config: PairConfig | None = None,
        *,
        signalling: Signalling | None = None,
        listeners: Sequence[object] = (),
        wire_observer: WireObserver | None = None,
        on_lease: Callable[[Lease], None] | None = None,
    ) -> None:
        self.local_identity = local_identity
        self.config = config if config is not None else PairConfig()
        #: The sans-IO node this driver runs: pairs, handover sessions, one timer, one event queue.
        self.node = Node(local_identity, self.config, tuple(listeners))
        self.core = self.node.pool  # the registry (read-only use; drive the node)
        self._channels = NodeChannels(self.node, self.now, self._after_input)
        self.signalling = signalling
        self.stats = DriverStats()
        self.wire_observer = wire_observer
        #: Called with each lease this side hands out as responder; without it they queue for accept().
        self.on_lease = on_lease
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = _unbound_clock
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._send_errors: Counter[int] = Counter()
        self._pending: set[int] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_when: float | None = None
        self._callbacks: list[Callable[[Event], None]] = []
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self._changed: asyncio.Event | None = None
        self._waiting = 0
        self._handover_tasks: set[asyncio.Task[Any]] = set()  # tasks inside take/serve_handover
        self._cancelled_by_close: set[asyncio.Task[Any]] = set()  # ... that close() cancelled
        self._handovers_done: asyncio.Event | None = None  # set whenever _handover_tasks empties
        self._incoming: deque[Lease] = deque()  # responder leases waiting for accept()
        self._acceptors: deque[asyncio.Future[Lease]] = deque()  # accept() calls waiting for a lease
        #: "lease", or the HandoverError class name; "HandoverCancelled" counts takes/serves that were
        #: cancelled (by their caller or by close()).
        self.handover_outcomes: Counter[str] = Counter()
        # Entries that went silent (Locked/InUse): the datagrams on their socket are the application's
        # (the peer went InUse first), kept here for the lease instead of dropped.
        self._early: dict[int, LeasedProtocol] = {}
        self._core_events = self.core._events  # the core's queue: non-empty when events wait (hot path peek)

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncPairPool:
        self._bind_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            # Bound once: the datagram path reads the clock on every datagram, the signal path on every signal.
            # asyncio's own loops tell time with time.monotonic (BaseEventLoop.time): called directly, that is
            # one Python frame less per read; any other loop (uvloop) keeps its own clock, which its timers use.
            clock = time.monotonic if getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time else loop.time
            self._clock = self._channels._clock = clock
            self._changed = asyncio.Event()
        elif self._loop is not loop:
            raise LocalError("AsyncPairPool is bound to another event loop")
        return loop

    def now(self) -> float:
        """The driver's clock (the loop's monotonic time); every ``now`` given to the core comes from here."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        return loop.time()

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("the pool is closed")

    async def close(self) -> None:
        """Expire every entry (CLOSED), close every socket the pool owns, stop the scheduler. Idempotent.

        From the moment it is called no session claims an entry any more:
        a pending :meth:`accept` and every later call raise :class:`PoolClosed`;
        a pending :meth:`take` / :meth:`take_any` raises :class:`PoolClosed`
        (not ``CancelledError``: its caller's task is not left cancelled) after
        sending ABORT(CANCELLED) where the handshake still allows it; a
        :meth:`serve_handover` returns None. ``close`` returns once all of
        them have ended (each ends within a bounded ABORT send), not when
        their callers' code after them has.
        """
        if self._closed:
            return
        self._closed = True
        for waiter in self._acceptors:
            if not waiter.done():
                waiter.set_exception(PoolClosed("the pool closed while accept() waited"))
        self._acceptors.clear()
        if self._loop is not None:
            # Fail every running session now (ABORT(CANCELLED) queued), under the core's lock, so none can
            # go on to claim or lock an entry even if its task's cancellation below is swallowed somewhere.
            now = self.now()
            self.node.cancel_all(now)  # the running sessions and the abandoned ones that still own an entry
            self._after_input(now)
        current = asyncio.current_task()
        for t in self._handover_tasks:
            if t is not current:
                self._cancelled_by_close.add(t)
                t.cancel()
        while self._handover_tasks - {current} and self._handovers_done is not None:
            self._handovers_done.clear()
            await self._handovers_done.wait()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        now = self.now() if self._loop is not None else 0.0
        for entry in self.core.entries():
            with contextlib.suppress(LocalError):
                self.core.remove(entry.nonce, now)
        self._drain_events()
        for nonce in list(self._transports):
            self._close_transport(nonce)
        # Responder leases nobody accepted yet have no owner but us: close their sockets too.
        while self._incoming:
            _close_lease_transport(self._incoming.popleft())
        for sub in list(self._subscriptions):
            sub.close()
        # Let the loop run the transports' connection_lost callbacks so the fds are really gone.
        await asyncio.sleep(0)

    def _enter_handover(self) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self._handover_tasks.add(task)
            if self._handovers_done is None:
                self._handovers_done = asyncio.Event()
        return task

    def _leave_handover(self, task: asyncio.Task[Any] | None) -> None:
        if task is None:
            return
        self._handover_tasks.discard(task)
        if self._handovers_done is not None:
            self._handovers_done.set()  # close() re-checks what is left
        if task in self._cancelled_by_close:
            # close() cancelled this task but the cancellation never surfaced as CancelledError here
            # (something swallowed it): take the request back so the caller's task is not left cancelling.
            self._cancelled_by_close.discard(task)
            task.uncancel()

    def _close_cancelled(self, task: asyncio.Task[Any] | None) -> bool:
        """True if ``task``'s CancelledError came from close() alone (then it is taken back: uncancel)."""
        if task is None or task not in self._cancelled_by_close:
            return False
        self._cancelled_by_close.discard(task)
        return task.uncancel() == 0

    # --- add / remove ---------------------------------------------------------------------------

    async def add(
        self,
        pair: EndpointPair,
        is_pinger: bool,
        *,
        sock: socket.socket | None = None,
        bind: Addr | None = None,
        key: bytes | None = None,
    ) -> PairEntry:
        """Open the entry's UDP socket and register it; the pair starts Idle and keeps itself alive.

        ``sock``: an already bound UDP socket to adopt (e.g. the one the hole
        punch used). ``bind``: bind this address instead of the local
        endpoint (behind a NAT the public endpoint is not a local address).
        Raises InvalidPair / DuplicateNonce / BindFailed / InvalidSocket /
        PoolClosed, nothing untyped; on any error the pool is unchanged.

        Who closes ``sock``: ``add`` owns it from the call on. On success it
        belongs to the entry (closed when the entry expires or the pool
        closes, or handed on with a lease); on *any* error, checks before
        the socket is touched included, ``add`` closes it. So no socket
        stays open after a failed ``add`` and the caller never closes ``sock``.

        ``key``: the per-pair secret for keyed keepalives (``PairPool.add``; InvalidKey if not 16..64 bytes).
        """
        try:
            self._check_open()
            loop = self._bind_loop()
            pair.validate()
            check_key(key)
            local = pair.local(self.local_identity)
            nonce = pair.nonce
            if nonce in self._pending or nonce in self._transports:
                raise DuplicateNonce(f"nonce {nonce:#x} is already in the pool")
            if sock is not None:
                _check_udp_socket(sock)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self._pending.add(nonce)
        try:
            if sock is None:
                sock = _bind_udp(bind if bind is not None else local.addr)
            try:
                sock.setblocking(False)
                transport, protocol = await loop.create_datagram_endpoint(lambda: _EntryProtocol(self, nonce),
                                                                          sock=sock)
            except BaseException as exc:
                sock.close()
                if isinstance(exc, ValueError):  # asyncio's own check of the socket
                    raise InvalidSocket(f"cannot adopt {sock!r}: {exc}") from exc
                if isinstance(exc, OSError):
                    raise BindFailed(exc.errno, f"cannot adopt the UDP socket: {exc.strerror or exc}") from exc
                raise
            self.stats.sockets_opened += 1
            try:
                self._check_open()
                entry = self.core.add(pair, is_pinger, self.now(), key)
            except BaseException:
                transport.close()
                self.stats.sockets_closed += 1
                raise
            protocol.entry = entry
            protocol.sock = sock
            self._transports[nonce] = transport
        finally:
            self._pending.discard(nonce)
        early, protocol.early = protocol.early, None
        for data, addr in early or ():
            self._on_datagram(nonce, entry, data, addr)
        self._after_input()
        return entry

    async def remove(self, nonce: int) -> PairEntry:
        """Expire (CLOSED) and drop one entry, closing its socket."""
        self._check_open()
        entry = self.core.remove(nonce, self.now())
        self._after_input()
        self._close_transport(nonce)
        return entry

    def get(self, nonce: int) -> PairEntry:
        return self.core.get(nonce)

    def entries(self, peer: str | None = None) -> list[PairEntry]:
        return self.core.entries(peer)

    def __len__(self) -> int:
        return len(self._transports)

    def transport(self, nonce: int) -> asyncio.DatagramTransport:
        """The socket's transport of a pooled (not handed-over) entry."""
        try:
            return self._transports[nonce]
        except KeyError:
            raise UnknownPair(f"no pooled socket for nonce {nonce:#x}") from None

    def _close_transport(self, nonce: int) -> None:
        transport = self._transports.pop(nonce, None)
        if transport is not None:
            transport.close()
            self.stats.sockets_closed += 1
        self._send_errors.pop(nonce, None)

    # --- observability --------------------------------------------------------------------------

    def on_event(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every transition/drain event; returns an unsubscribe function."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def subscribe(self, maxsize: int = 10_000) -> Subscription:
        """An async iterator of events (``async for ev in pool.subscribe()``); ends when the pool closes."""
        sub = Subscription(self, maxsize)
        self._subscriptions.add(sub)
        return sub

    def snapshot(self, nonce: int) -> EntrySnapshot:
        """RTT estimate, last seen, frames and drops by reason of one entry."""
        e = self.core.get(nonce)
        st = e.stats
        return EntrySnapshot(
            nonce=e.nonce,
            peer=e.remote.identity,
            state=e.state,
            is_pinger=e.is_pinger,
            srtt=e.srtt,
            last_seen=e.last_seen,
            frames_sent=st.sent,
            frames_received=st.received,
            drops={r.value: n for r, n in st.drops.items()},
            send_errors=self._send_errors.get(nonce, 0),
            seen_from=e.seen_from,
        )

    def state_counts(self) -> Counter[str]:
        return Counter(str(e.state) for e in self.core.entries())

    async def wait_changed(self) -> None:
        """Wait until the next input (datagram, timer or event) was processed; for tests and monitoring code."""
        self._bind_loop()
        assert self._changed is not None
        self._changed.clear()
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1

    # --- the input path (hot: one call per datagram) ---------------------------------------------

    def _on_datagram(self, nonce: int, entry: PairEntry, data: bytes, addr: Any) -> None:
        stats = self.stats
        stats.datagrams_in += 1
        now = self._clock()
        observer = self.wire_observer
        if observer is not None:
            self._observe("recv", nonce, data, addr)
        # The core decides: on a silent entry (Locked/InUse) anything but its own keepalive is the
        # application's (ApplicationData), kept for the lease. Unknown nonces (a datagram racing
        # registration/removal) are dropped and counted by the core. Otherwise the entry's answer (a
        # pong) comes back in the same call and goes out on its socket at once.
        replies = self.node.receive_and_reply(nonce, data, addr, now)
        if type(replies) is ApplicationData:
            early = self._early.get(nonce)
            if early is None:
                early = self._early[nonce] = LeasedProtocol(self.stats)
            early.datagram_received(data, addr)
            if self._waiting:
                assert self._changed is not None
                self._changed.set()
            return
        core = self.core
        if replies and (transport := self._transports.get(nonce)) is not None:
            if observer is None and len(replies) == 1:  # the common pong, inline
                try:
                    transport.sendto(*replies[0])
                    stats.datagrams_out += 1
                except OSError as exc:
                    self._report_send_error(nonce, exc, now)
            else:
                assert not isinstance(replies, ApplicationData)  # returned above (narrowed for mypy only here)
                self._send(nonce, transport, replies, now)
        if not self._core_events and not core._outbox:  # has_pending_output(), inlined (hot)
            # Fast path (a ping or a pong): no event, nothing else queued. Only this entry changed, and a
            # datagram alone never brings a deadline forward (it refreshes liveness or clears a ping).
            if self._waiting:
                assert self._changed is not None
                self._changed.set()
            if self._handle is None and not self._closed:
                self._rearm()
            return
        # Anything that could bring a deadline forward (a transition) shows up as an event and re-arms.
        self._after_input(now, rearm=False)

    def _send(self, nonce: int, transport: asyncio.DatagramTransport,
              frames: list[tuple[bytes, tuple[str, int]]], now: float) -> None:
        for data, addr in frames:
            if self.wire_observer is not None:
                self._observe("send", nonce, data, addr)
            try:
                transport.sendto(data, addr)
                self.stats.datagrams_out += 1
            except OSError as exc:
                self._report_send_error(nonce, exc, now)

    def _observe(self, direction: str, nonce: int, data: bytes, addr: Any) -> None:
        assert self.wire_observer is not None
        try:
            state = str(self.core.get(nonce).state)
        except UnknownPair:
            state = "Unknown"
        try:
            host_port = (str(addr[0]), int(addr[1]))
        except (TypeError, ValueError, IndexError, KeyError):
            host_port = (repr(addr), 0)  # not an IP address; the core drops it as FOREIGN_ADDRESS
        self.wire_observer(direction, nonce, data, host_port, state)

    def _on_socket_error(self, nonce: int, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable) surface here on Linux; they are the peer's problem.
        self.stats.send_errors += 1
        self._send_errors[nonce] += 1
        log.debug("socket error on %#x: %s", nonce, exc)
        now = self.now()
        self.core.send_failed(nonce, now)
        self._after_input(now)

    def _on_timer(self) -> None:
        when = self._handle_when
        self._handle = None
        self._handle_when = None
        if self._closed:
            return
        self.stats.timer_wakeups += 1
        now = self.now()
        # The core runs everything due within TIMER_SLACK of the time it is given, and nothing else, so a
        # wake-up for a deadline that has since moved later costs one heap peek (no get_timer round trip).
        # Bounded batch (TIMER_BATCH): entries still due stay first in the core's scheduler, so the re-arm
        # below schedules the next batch for the next loop iteration, after the I/O that arrived meanwhile.
        self.node.handle_timer(max(now, when) if when is not None and when <= now + TIMER_SLACK else now,
                               max_entries=TIMER_BATCH)
        self._after_input(now)

    def _after_input(self, now: float | None = None, rearm: bool = True) -> None:
        """Flush outgoing datagrams, fan out events, re-arm the single timer."""
        if now is None:
            now = self._clock() if self._loop is not None else self.now()
        if self.core._outbox:  # has_pending_output(), inlined: a signal's round sends no datagram
            self._flush(now)
        node = self.node
        if self._core_events:
            closes = self._drain_events()
            if closes is not None:
                rearm = True
                # The round's signals first (a session's last ABORT/TAKEN), then the channels it closed.
                self._channels.ship(node.signals_to_send())
                for channel_id in closes:
                    self._channels.close(channel_id)
        if node._signals:
            self._channels.ship(node.signals_to_send())
        if self._waiting:
            assert self._changed is not None
            self._changed.set()
        if not self._closed and (rearm or self._handle is None):
            self._rearm()

    def _flush(self, now: float) -> None:
        core = self.core
        if not core._outbox:  # has_pending_output(), inlined: most rounds (a signal's) send no datagram
            return
        sends = core.datagrams_to_send(now)
        if not sends:
            return
        transports, observer, stats = self._transports, self.wire_observer, self.stats
        for nonce, data, addr in sends:
            transport = transports.get(nonce)
            if transport is None:
                continue
            if observer is not None:
                self._observe("send", nonce, data, addr)
            try:
                transport.sendto(data, addr)
                stats.datagrams_out += 1
            except OSError as exc:
                self._report_send_error(nonce, exc, now)

    def _report_send_error(self, nonce: int, exc: Exception, now: float) -> None:
        self.stats.send_errors += 1
        self._send_errors[nonce] += 1
        log.debug("send on %#x failed: %s", nonce, exc)
        self.core.send_failed(nonce, now)

    def _drain_events(self) -> list[int] | None:
        """Act on every pending node event (entry events fanned out); the channels to close, None if no event.

        Entry events come first in each round, before any signal is sent: a
        lease's receive buffer widens before the signal that lets the peer
        talk on it leaves.
        """
        closes: list[int] | None = None
        debug: bool | None = None
        node, channels, stats, pending = self.node, self._channels, self.stats, self._core_events
        # One batch per round (Node.drain_events: one lock hold, not one per event); a callback that makes
        # new events (say, removes an entry) gets them handled by the next pass of the outer loop.
        while pending:
            if closes is None:
                closes = []
            for event in node.drain_events():
                # Exact type tests (mypy narrows on them): no isinstance walk of the MRO per event. The
                # commonest first: a take makes three StateChanged per side, one SessionEnded, one CloseChannel.
                if type(event) is StateChanged:
                    changed = event
                    if debug is None:
                        debug = log.isEnabledFor(logging.DEBUG)
                    if debug:
                        log.debug("entry %#x %s -> %s on %s (%s)", changed.nonce, changed.source, changed.target,
                                  changed.event, changed.reason)
                    target = changed.target
                    if target in LEASE_STATES:
                        # Widen the receive buffer of an entry that just went silent before any signal that
                        # lets the peer go InUse (and talk) leaves: _after_input drains events before signals.
                        transport = self._transports.get(changed.nonce)
                        if transport is not None and hasattr(transport, "max_size"):  # private, see above
                            transport.max_size = LEASE_RECV_BUFFER
                    elif target in _FINAL:
                        # Expired entries leave the pool; their socket goes with them (unless handed over).
                        self._early.pop(changed.nonce, None)
                        self._close_transport(changed.nonce)
                elif type(event) is SessionEnded:
                    channels.ended(event.channel, event.outcome)
                    continue
                elif type(event) is CloseChannel:
                    closes.append(event.channel)
                    continue
                elif type(event) is not Drained:
                    continue  # OpenChannel (take opens it), SessionStarted, LeaseReady (SessionEnded carries it)
                stats.events += 1
                if self._callbacks or self._subscriptions:
                    self._fan_out(event)
        return closes

    def _fan_out(self, event: Event) -> None:
        """An entry event to the user's callbacks and subscribers (most pools have none: not called then)."""
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("event callback failed")
        for sub in list(self._subscriptions):
            if not sub._put(event):
                self.stats.events_lost += 1

    def _rearm(self) -> None:
        """Keep the one timer at the earliest deadline of entries and sessions (Node.earlier_timer).

        With a wake-up armed, only a deadline that became earlier than it
        moves it; a wake-up for a deadline since moved later (or gone) finds
        nothing due and re-arms from a full read then.
        """
        handle = self._handle
        deadline = self.node.earlier_timer(self._handle_when if handle is not None else None)
        if deadline is None:
            return
        if handle is not None:
            handle.cancel()
        assert self._loop is not None
        self._handle = self._loop.call_at(deadline, self._on_timer)
        self._handle_when = deadline

    def kick(self) -> None:
        """Process the core's pending output/events now: call after driving the core directly.

        Cheap when nothing is pending (``take`` and ``release`` call it): with
        no event and no datagram queued and the timer armed, nothing can have
        moved a deadline earlier (only a transition does, and it queues an
        event), so the flush and re-arm are skipped.
        """
        if self._closed:
            return
        # node.has_pending_output(), inlined (a take calls this on its hot path)
        if self._core_events or self._handle is None or self.core._outbox or self.node._signals:
            self._after_input()
        elif self._waiting:
            assert self._changed is not None
            self._changed.set()

    # --- handover -------------------------------------------------------------------------------

    async def take(self, nonce: int) -> Lease:
        """Hand pair ``nonce`` over to this application (initiator).

        Raises PairBusy / UnknownPair (nothing sent) or another HandoverError
        (the entry returned to Idle or expired, per spec/handover.md rule 4);
        :class:`PoolClosed` if the pool is closed or closes meanwhile.

        Cancelling the task that awaits ``take`` re-raises ``CancelledError``
        (``close()`` makes it :class:`PoolClosed` instead). What that leaves
        depends on how far the handshake got (spec/handover.md, rule 4):

        * before TAKE went out (LOCK unanswered, or draining): the entry is
          back to Idle here and ABORT(CANCELLED) goes out (its send bounded by
          ``natpool.aio.handover.CANCEL_SEND_TIMEOUT``); the peer's session
          fails with PeerRefused and its entry returns to Idle, or expires if
          it had already locked (a pinger responder locks before LOCKED).
        * after TAKE, before TAKEN arrived: ABORT(CANCELLED) still goes out,
          but this side is Locked, so its entry expires: the pair is gone
          here. A peer still waiting for TAKE fails likewise; a peer that
          already answered TAKEN ignores the ABORT and gets its lease.
        * after TAKEN arrived (settling): nothing is sent; the peer gets its
          lease; the entry here stays Locked, out of the keepalive, until its
          lock times out (LOCK_TIMEOUT) or the pool closes.

        In the last two cases the peer may hold a lease with no partner here;
        a pair is never duplicated (both sides InUse on different takes).
        A cancellation is counted as ``handover_outcomes["HandoverCancelled"]``.
        """
        return await self._take(nonce, None)

    async def take_any(self, peer: str) -> Lease:
        """Hand over the longest-idle pair with ``peer``; PairBusy if none is Idle. Cancellation as in :meth:`take`."""
        return await self._take(None, peer)

    async def _take(self, nonce: int | None, peer: str | None) -> Lease:
        self._check_open()
        self._bind_loop()
        if self.signalling is None:
            raise LocalError("take needs a signalling (AsyncPairPool(signalling=...))")
        node, channels = self.node, self._channels
        # The CAS: losers fail here, nothing sent. The LOCK waits for the channel (held by NodeChannels).
        now = self._clock()  # bound just above
        try:
            channel_id = node.start_take(nonce, peer, now=now)
        except HandoverError as exc:  # PairBusy at the claim: nothing sent, nothing changed; counted all the same
            self.handover_outcomes[type(exc).__name__] += 1
            raise
        ended = channels.expect(channel_id)
        session = node.session(channel_id)
        assert session is not None and session.entry is not None
        if not self._closed:  # kick(), with the clock already read: the claim's events, the timer
            self._after_input(now)
        remote = session.entry.remote.identity  # the entry resolved its remote endpoint at add()
        task = self._enter_handover()  # no await since _check_open: close() cannot have begun in between
        try:
            try:
                channel = await self.signalling.open(remote)
            except BaseException as exc:
                # The session never got to send LOCK: end it so the entry returns to Idle (rule 4).
                channels.forget(channel_id)
                if isinstance(exc, asyncio.CancelledError):
                    node.cancel(channel_id, self.now())
                else:
                    node.channel_closed(channel_id, self.now())
                self._after_input()
                if isinstance(exc, (HandoverError, LocalError, asyncio.CancelledError)):
                    raise
                raise ChannelBroken(f"cannot open signalling to {remote!r}: {exc!r}") from exc
            # If close() began while the channel opened, the session is already cancelled: its ABORT
            # (held with the LOCK) goes out and the channel closes.
            channels.attach(channel_id, channel)
            # The round after start_take ran already (above) and attaching changes nothing in the node (a
            # message the channel pushes at once is a round of its own): kick() re-checks at the cost of a peek.
            self.kick()
            lease = await self._outcome(channel_id, ended)
        except asyncio.CancelledError:
            self.handover_outcomes["HandoverCancelled"] += 1
            log.debug("take of %#x cancelled", session.nonce)
            if self._close_cancelled(task):
                raise PoolClosed("the pool closed during the take") from None
            raise
        except HandoverError as exc:
            self.handover_outcomes[type(exc).__name__] += 1
            if isinstance(exc, HandoverCancelled) and self._closed:
                raise PoolClosed("the pool closed during the take") from exc
            raise  # the session logged it once, at DEBUG
        finally:
            self._leave_handover(task)
        self.handover_outcomes["lease"] += 1
        return self._detach(lease)

    async def _outcome(self, channel_id: int, ended: asyncio.Future[Lease | HandoverError]) -> Lease:
        """Wait for the session on ``channel_id`` to end and its channel to close; its lease, or raise its error.

        Cancelled: the session is cancelled (ABORT(CANCELLED) where the
        handshake still allows it, sent within ``CANCEL_SEND_TIMEOUT``); one
        past the point of no return (Settling) is abandoned, its entry left
        Locked until its lock times out (spec/runtime-api.md).
        """
        node, channels = self.node, self._channels
        try:
            outcome = await ended  # not shielded: a shield costs a loop iteration per take (its own callback)
        except asyncio.CancelledError:
            now = self.now()
            channels.interrupt(channel_id)
            node.cancel(channel_id, now)
            if node.session(channel_id) is not None:
                node.abandon(channel_id)
            self._after_input()
            await channels.closed(channel_id)
            raise
        closing = channels.closing(channel_id)  # None once closed (a sync link closes in the session's last round)
        if closing is not None:
            await closing
        if isinstance(outcome, Lease):
            return outcome
        raise outcome

    def serve_handover(self, channel: SignalChannel) -> Coroutine[Any, Any, Lease | None]:
        """Responder entry point for one incoming channel (e.g. a ``TcpSignallingServer`` handler); await it.

        A lease this side hands out goes to ``on_lease`` or is queued for
        :meth:`accept` (and returned); a failed session returns None: the
        failure was the peer's or the channel's, is counted in
        ``handover_outcomes`` and logged once at DEBUG, never raised. The
        channel is closed on every exit. Once :meth:`close` has begun no
        session starts and a running one ends: None, and the caller's task
        is not left cancelled (a ``TcpSignallingServer`` connection ends
        cleanly). Cancelling the caller's task ends the session as a
        cancelled :meth:`take` does and re-raises ``CancelledError``.

        Not itself a coroutine function, so that the start can be
        synchronous: a multiplexed channel whose first signal is already
        here (it came with the OPEN) starts its session inside this call (from
        a running loop), and its LOCKED (or refusal) leaves in the calling
        loop step. A mux handler that calls this from its ``on_session``
        saves the responder one loop iteration per take; only the wait for
        the outcome is left to the returned coroutine.
        """
        if not self._closed and isinstance(channel, MuxChannel):
            self._bind_loop()
            first = channel.recv_nowait()
            if first is not None:
                # The rest waits for the outcome (no wrapper coroutine of its own: one frame less per resume).
                return self._counted(self._outcome(*self._start_responder(channel, first)))
        return self._serve(channel)

    def _start_responder(self, channel: SignalChannel,
                         first: bytes) -> tuple[int, asyncio.Future[Lease | HandoverError]]:
        """Open the responder session on ``channel`` with its first signal (it opens, or refuses), synchronously."""
        node, channels = self.node, self._channels
        peer = getattr(channel, "peer_identity", None)  # authenticated by the transport, or None
        channel_id = node.new_channel_id(peer if isinstance(peer, str) else None)
        ended = channels.expect(channel_id)
        now = self._clock()  # bound by every caller (serve_handover, _serve)
        node.receive_signal(channel_id, first, now)  # the responder session opens (or refuses)
        channels.attach(channel_id, channel)
        self._after_input(now)
        return channel_id, ended

    async def _serve(self, channel: SignalChannel) -> Lease | None:
        """The responder when the first signal is not here yet (or the pool is closed): wait for it, then start."""
        if self._closed:
            with contextlib.suppress(Exception):
                await channel.close()
            return None
        self._bind_loop()
        return await self._counted(self._wait_and_start(channel))

    async def _wait_and_start(self, channel: SignalChannel) -> Lease:
        first = await first_signal(channel, self.config.lock_timeout)
        if self._closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CANCEL_SEND_TIMEOUT):
                    await channel.close()
            raise HandoverCancelled("the pool began closing before this session could claim an entry")
        channel_id, ended = self._start_responder(channel, first)
        return await self._outcome(channel_id, ended)

    async def _counted(self, responder: Coroutine[Any, Any, Lease]) -> Lease | None:
        """Run a responder session's waiting part as a tracked handover: count its outcome, hand out its lease."""
        task = self._enter_handover()
        try:
            lease = await responder
        except HandoverError as exc:
            self.handover_outcomes[type(exc).__name__] += 1
            return None
        except asyncio.CancelledError:
            self.handover_outcomes["HandoverCancelled"] += 1
            if self._close_cancelled(task):
                return None
            raise
        finally:
            self._leave_handover(task)
        return self._hand_out(lease)

    def _hand_out(self, lease: Lease) -> Lease | None:
        self.handover_outcomes["lease"] += 1
        leased = self._detach(lease)
        if self._closed:
            # Completed past the point of no return while close() waited: nobody can accept it now.
            _close_lease_transport(leased)
            return None
        if self.on_lease is not None:
            self.on_lease(leased)
        else:
            self._deliver(leased)
        return leased

    def _deliver(self, lease: Lease) -> None:
        while self._acceptors:
            waiter = self._acceptors.popleft()
            if not waiter.done():
                waiter.set_result(lease)
                return
        self._incoming.append(lease)

    async def accept(self) -> Lease:
        """The next lease handed out by this side as responder (the peer called ``take``).

        Raises :class:`PoolClosed` if the pool is closed, or closes while waiting.
        """
        self._check_open()
        if self._incoming:
            return self._incoming.popleft()
        waiter: asyncio.Future[Lease] = self._bind_loop().create_future()
        self._acceptors.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._deliver(waiter.result())  # handed to us as we were cancelled: not lost
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._acceptors.remove(waiter)

    def release(self, lease: Lease) -> None:
        """Done with a leased pair: its entry expires (CLOSED) and its socket is closed. Idempotent.

        What :meth:`Lease.close` (and ``async with lease``) calls: the pool is the lease's owner.
        """
        lease.release(self.now())
        transport = lease.transport
        if transport is not None:
            transport.close()
        self.kick()

    @staticmethod
    def set_lease_protocol(lease: Lease, protocol: asyncio.DatagramProtocol) -> None:
        """Deprecated thin alias of :meth:`Lease.set_protocol` (the lease needs no pool for it)."""
        warnings.warn("AsyncPairPool.set_lease_protocol(lease, p) is deprecated: use lease.set_protocol(p)",
                      DeprecationWarning, stacklevel=2)
        lease.set_protocol(protocol)

    def _detach(self, lease: Lease) -> Lease:
        """Hand an InUse entry's open transport to the lease; from now on the application owns it."""
        nonce = lease.nonce
        transport = self._transports.pop(nonce, None)
        self._send_errors.pop(nonce, None)
        if transport is None:  # pragma: no cover - an InUse entry always has its socket
            raise LocalError(f"pair {nonce:#x} was handed over without a socket")
        pooled = transport.get_protocol()
        sock = pooled.sock if isinstance(pooled, _EntryProtocol) else None
        buffer = self._early.pop(nonce, None)
        if buffer is None:
            buffer = LeasedProtocol(self.stats)
        transport.set_protocol(buffer)
        if hasattr(transport, "max_size"):  # already widened when the entry went silent; kept explicit
            transport.max_size = LEASE_RECV_BUFFER
        lease.attach(transport, sock, self, buffer)
        return lease


def _unbound_clock() -> float:
    """The clock before ``_bind_loop``: no datagram can arrive then (no socket is open yet)."""
    raise LocalError("AsyncPairPool is not bound to an event loop yet")


def _close_lease_transport(lease: Lease) -> None:
    transport = lease.transport
    if transport is not None:
        transport.close()


def _check_udp_socket(sock: socket.socket) -> None:
    """InvalidSocket unless ``sock`` is an open, bound UDP/IPv4 or IPv6 socket (checked before asyncio sees it)."""
    if sock.fileno() < 0:
        raise InvalidSocket("the socket is closed")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_DGRAM:
        raise InvalidSocket(f"a bound UDP/IP socket is needed, got family {sock.family!r}, type {sock.type!r}")
    try:
        port = sock.getsockname()[1]
    except OSError as exc:
        raise InvalidSocket(f"cannot read the socket's address: {exc}") from exc
    if port == 0:
        raise InvalidSocket("the socket is not bound (bind it, or pass bind= and let add() open one)")


def _bind_udp(addr: Addr) -> socket.socket:
    """Bare socket() + bind(): the cheapest way to open an endpoint; BindFailed on any OS error."""
    host, port = addr
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise BindFailed(f"cannot bind {host!r}: not an IP address literal") from None
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BindFailed(exc.errno, f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from exc
    return sock
