"""Simulated signalling: reliable, ordered, breakable byte channels between nodes.

The handover runs over a channel like a TCP connection: messages arrive
intact and in order after ``delay``, or not at all once the channel is
broken. Delivery is driven by the simulation's scheduler, never inline, so
a session never re-enters itself from inside ``send``.

Each :class:`ChannelEnd` reports to ``on_receive`` / ``on_closed`` callbacks
when set (the node driver sets them); otherwise messages pile up in
``inbox`` and ``closed_by_peer`` flips, for tests that poll.

In ``manual`` mode nothing is delivered on a timer: messages and close
notifications wait in :attr:`SimSignalling.in_flight` until the test
delivers them, and only the head of each channel direction is deliverable,
so a stateful test explores every interleaving the FIFO channel allows.

Scripted faults (both modes): :attr:`SimSignalling.on_open` sees every new
channel before its first message, and can set that channel's
:attr:`Channel.intercept` (rewrite, replay, swallow a message as it is sent,
or break the channel instead of carrying it) and :attr:`Channel.on_deliver`
(break the channel right after a given message was handled).
:meth:`SimSignalling.inject` forges a message towards one end.
:attr:`SimSignalling.log` records every message sent, and
:attr:`SimSignalling.in_transit` counts what is still on its way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from natpool.sim.clock import Scheduler, SimulationError
from natpool.sim.records import SentSignal

#: ``(sending end, message) -> the messages that travel instead`` ([] swallows it).
Intercept = Callable[["ChannelEnd", bytes], Sequence[bytes]]
#: ``(receiving end, message)``, called after the receiver handled the message.
OnDeliver = Callable[["ChannelEnd", bytes], None]


@dataclass(slots=True)
class SignalStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0  # sent on/after close or break, or in flight when the channel broke


@dataclass(slots=True)
class PendingSignal:
    """A message (or, with ``data`` None, a close notification) waiting for manual delivery."""

    channel: Channel
    to: ChannelEnd
    data: bytes | None
    sent_at: float


class ChannelEnd:
    """One side of a :class:`Channel`, owned by node ``owner``."""

    def __init__(self, channel: Channel, owner: str, side: int) -> None:
        self.channel = channel
        self.owner = owner
        self.side = side
        self.on_receive: Callable[[bytes], None] | None = None
        self.on_closed: Callable[[], None] | None = None
        self.inbox: deque[bytes] = deque()
        self.closed = False  # this end can no longer send or receive
        self.closed_by_peer = False  # the close was observed (peer closed, or the channel broke)
        self.received: list[bytes] = []  # every message delivered to this end, for assertions

    @property
    def peer(self) -> ChannelEnd:
        return self.channel.ends[1 - self.side]

    def send(self, data: bytes) -> bool:
        """Queue ``data`` for the peer; False (and counted as lost) if this end or the channel is closed."""
        return self.channel._send(self, bytes(data))

    def close(self) -> None:
        """Graceful close: messages already sent still arrive, then the peer observes the close."""
        self.channel._close(self)

    def recv_all(self) -> list[bytes]:
        """Pop everything queued in ``inbox`` (only used when ``on_receive`` is None)."""
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def __repr__(self) -> str:
        return f"ChannelEnd({self.owner}, #{self.channel.id}, closed={self.closed})"


class Channel:
    """A bidirectional FIFO link between two nodes with a fixed one-way ``delay``."""

    def __init__(self, signalling: SimSignalling, cid: int, a: str, b: str, delay: float) -> None:
        self.signalling = signalling
        self.id = cid
        self.delay = delay
        self.broken = False
        self.ends = (ChannelEnd(self, a, 0), ChannelEnd(self, b, 1))
        self._last = [0.0, 0.0]  # last scheduled arrival per direction (index = receiving side), keeps FIFO
        #: Fault hook on every message sent on this channel (after it was logged): returns what
        #: travels instead, in order. It may call :meth:`break_` (and return []) to lose the
        #: message with the channel, as a connection that dies while the message is on the wire.
        self.intercept: Intercept | None = None
        #: Called after each message was delivered and handled by its receiver (whose replies are
        #: already sent); calling :meth:`break_` from here loses those replies.
        self.on_deliver: OnDeliver | None = None

    def _arrival(self, to_side: int) -> float:
        t = max(self.signalling.scheduler.clock.now() + self.delay, self._last[to_side])
        self._last[to_side] = t
        return t

    def _post(self, dst: ChannelEnd, data: bytes | None) -> None:
        """Schedule delivery of ``data`` (None: the close notification) to ``dst``, in FIFO order."""
        sig = self.signalling
        if sig.manual:
            sig.in_flight.append(PendingSignal(self, dst, data, sig.scheduler.clock.now()))
        else:
            sig.in_transit += 1
            sig.scheduler.call_at(self._arrival(dst.side), partial(self._arrive_timed, dst, data))

    def _arrive_timed(self, dst: ChannelEnd, data: bytes | None) -> None:
        self.signalling.in_transit -= 1
        self._arrive(dst, data)

    def _arrive(self, dst: ChannelEnd, data: bytes | None) -> None:
        if data is None:
            self._notify_closed(dst)
        else:
            self._deliver(dst, data)

    def _send(self, src: ChannelEnd, data: bytes) -> bool:
        sig = self.signalling
        stats = sig.stats
        stats.sent += 1
        accepted = not (src.closed or self.broken)
        sig.log.append(SentSignal(sig.scheduler.clock.now(), self.id, src.owner, data, accepted))
        if not accepted:
            stats.lost += 1
            return False
        if self.intercept is None:
            self._post(src.peer, data)
            return True
        out = self.intercept(src, data)
        if not out:
            stats.lost += 1
        for msg in out:
            if self.broken:  # the hook broke the channel: nothing more travels
                break
            self._post(src.peer, bytes(msg))
        return True

    def _deliver(self, dst: ChannelEnd, data: bytes) -> None:
        stats = self.signalling.stats
        if self.broken or dst.closed:
            stats.lost += 1
            return
        stats.delivered += 1
        dst.received.append(data)
        if dst.on_receive is not None:
            dst.on_receive(data)
        else:
            dst.inbox.append(data)
        if self.on_deliver is not None:
            self.on_deliver(dst, data)

    def _close(self, src: ChannelEnd) -> None:
        if src.closed:
            return
        src.closed = True
        dst = src.peer
        if not dst.closed:
            self._post(dst, None)

    def _notify_closed(self, end: ChannelEnd) -> None:
        if end.closed_by_peer or (end.closed and not self.broken):
            return  # closed itself meanwhile: it does not "observe" the peer's close
        end.closed = True
        end.closed_by_peer = True
        if end.on_closed is not None:
            end.on_closed()

    def break_(self) -> None:
        """Abrupt failure: everything in flight is lost, both ends close and observe it (as the next events)."""
        if self.broken:
            return
        self.broken = True
        sig = self.signalling
        if sig.manual:
            mine = [p for p in sig.in_flight if p.channel is self]
            sig.stats.lost += sum(1 for p in mine if p.data is not None)
            sig.in_flight[:] = [p for p in sig.in_flight if p.channel is not self]
        for end in self.ends:
            if not end.closed:  # an end that closed itself has nothing to observe
                end.closed = True
                if sig.manual:
                    sig.in_flight.append(PendingSignal(self, end, None, sig.scheduler.clock.now()))
                else:
                    sig.in_transit += 1
                    sig.scheduler.call_later(0.0, partial(self._arrive_timed, end, None))

    def __repr__(self) -> str:
        a, b = self.ends
        return f"Channel(#{self.id} {a.owner}<->{b.owner}, delay={self.delay}, broken={self.broken})"


class SimSignalling:
    """Factory and registry of channels; ``delay`` is the default one-way latency."""

    def __init__(self, scheduler: Scheduler, delay: float = 0.02, manual: bool = False) -> None:
        if delay < 0:
            raise SimulationError("signalling delay must be >= 0")
        self.scheduler = scheduler
        self.delay = delay
        self.manual = manual
        self.in_flight: list[PendingSignal] = []  # manual mode only, in send order
        self.channels: list[Channel] = []
        self.stats = SignalStats()
        self.log: list[SentSignal] = []  # every message sent (or injected), in order
        #: Timed mode: messages and close notifications scheduled and not yet arrived.
        self.in_transit = 0
        #: Called with every new channel before anything is sent on it (to set its fault hooks).
        self.on_open: Callable[[Channel], None] | None = None

    def quiet(self) -> bool:
        """Nothing is on its way: no message or close notification waits to arrive (either mode)."""
        return self.in_transit == 0 and not self.in_flight

    def sent_on(self, channel: Channel | int) -> list[SentSignal]:
        """The log of one channel's messages (both directions), in send order."""
        cid = channel if isinstance(channel, int) else channel.id
        return [rec for rec in self.log if rec.channel == cid]

    def inject(self, to: ChannelEnd, data: bytes) -> bool:
        """Forge ``data`` towards ``to``, queued behind what its peer already sent.

        A forger on the connection: it works even after the peer end closed
        (the peer's close notification, if queued, then arrives first), but
        not on a broken channel or towards an end that is closed. Returns
        whether the message was queued; it is logged with ``injected=True``.
        """
        ch = to.channel
        ok = not (ch.broken or to.closed)
        self.log.append(SentSignal(self.scheduler.clock.now(), ch.id, to.peer.owner, bytes(data), ok, True))
        if ok:
            ch._post(to, bytes(data))
        return ok

    # --- manual delivery -----------------------------------------------------------

    def deliverable(self) -> list[int]:
        """Indices in :attr:`in_flight` that FIFO order allows next (the head of each channel direction)."""
        seen: set[tuple[int, int]] = set()
        out: list[int] = []
        for i, p in enumerate(self.in_flight):
            key = (p.channel.id, p.to.side)
            if key not in seen:
                seen.add(key)
                out.append(i)
        return out

    def deliver(self, i: int = 0) -> None:
        """Deliver in-flight item ``i`` now; it must be the oldest one of its channel direction."""
        if i not in self.deliverable():
            raise SimulationError(f"in-flight signal {i} is not deliverable (FIFO); deliverable: {self.deliverable()}")
        p = self.in_flight.pop(i)
        p.channel._arrive(p.to, p.data)

    def deliver_all(self) -> int:
        """Deliver everything in order, including what deliveries cause; returns the count."""
        n = 0
        while self.in_flight:
            self.deliver(0)
            n += 1
        return n

    def open(self, from_node: object, to_node: object, delay: float | None = None) -> tuple[ChannelEnd, ChannelEnd]:
        """Open a channel; returns (end at ``from_node``, end at ``to_node``). Nodes may be identities or SimNodes."""
        ch = Channel(self, len(self.channels) + 1, _ident(from_node), _ident(to_node),
                     self.delay if delay is None else delay)
        self.channels.append(ch)
        if self.on_open is not None:
            self.on_open(ch)
        return ch.ends

    def break_all(self, node: object | None = None) -> int:
        """Break every open channel (touching ``node`` if given); returns how many were broken."""
        ident = None if node is None else _ident(node)
        n = 0
        for ch in self.channels:
            if ch.broken or all(e.closed for e in ch.ends):
                continue
            if ident is None or ident in (ch.ends[0].owner, ch.ends[1].owner):
                ch.break_()
                n += 1
        return n


def _ident(node: object) -> str:
    if isinstance(node, str):
        return node
    ident = getattr(node, "identity", None)
    if not isinstance(ident, str):
        raise SimulationError(f"{node!r} is neither an identity nor a node")
    return ident
