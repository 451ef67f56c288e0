"""Signalling channels for the asyncio driver.

:class:`NodeChannels` is what :class:`~natpool.aio.pool.AsyncPairPool` uses:
the sans-IO :class:`~natpool.core.node.Node` decides everything (sessions,
their timers — on the driver's one timer — which signal goes out, when a
channel closes); this maps the node's channel ids to :class:`SignalChannel`
objects, feeds each incoming message to ``node.receive_signal``, sends the
node's signals in order (synchronously on a multiplexed link that can,
else through one writer task per channel) and closes a channel when the
node asks, after that round's signals.

There is no per-session loop here: a session's timers are the node's, on
the driver's one timer (issue 9, "thin drivers"). Code that drives a node
itself does what :class:`~natpool.aio.pool.AsyncPairPool` and
:class:`~natpool.sim.SimNode` do: feed ``receive_signal`` /
``channel_closed``, ship ``signals_to_send()``, act on ``next_event()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from natpool.core.lease import Lease
from natpool.core.node import Node
from natpool.errors import ChannelBroken, HandoverError, HandoverTimeout
from natpool.mux import MuxChannel
from natpool.signalling import SignalChannel

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Bound on sending the final ABORT of a cancelled session and on closing a channel, so an end never hangs.
CANCEL_SEND_TIMEOUT = 0.5


async def first_signal(channel: SignalChannel, lock_timeout: float) -> bytes:
    """Wait at most ``lock_timeout`` for an incoming channel's first signal; the channel is closed on failure."""
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for returns the result of a read that completed
        # as the task was cancelled, swallowing the cancellation (and a closing pool then took a LOCK).
        async with asyncio.timeout(lock_timeout):
            first = await channel.recv()
    except TimeoutError:
        await _close(channel)
        raise HandoverTimeout("no LOCK arrived on the incoming signalling channel") from None
    except Exception as exc:  # any channel failure: the session never started
        await _close(channel)
        raise ChannelBroken(f"incoming signalling channel failed before LOCK: {exc!r}") from exc
    except BaseException:  # cancelled before LOCK arrived
        await _close(channel)
        raise
    return first


async def _close(channel: SignalChannel) -> None:
    """Close ``channel``, bounded (a hung user channel must not hang a session's end) and never raising."""
    if isinstance(channel, MuxChannel):
        # Bounded by the mux itself (its CLOSE send has mux.CLOSE_TIMEOUT, the rest is synchronous): no
        # second timer to arm and cancel at the end of every session.
        with contextlib.suppress(Exception):
            await channel.close()
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CANCEL_SEND_TIMEOUT):
            await channel.close()


# --- the node-driven glue (AsyncPairPool) ------------------------------------------------------


class _Link:
    """One attached channel: its reader feeds the node, its sends keep the node's order, then it closes."""

    __slots__ = ("_closed_waiter", "channel", "channel_id", "closing", "gen", "is_closed", "mux", "owner", "queue",
                 "reader", "sync", "wake", "writer")

    def __init__(self, owner: NodeChannels, channel_id: int, channel: SignalChannel) -> None:
        self.owner = owner
        self.channel_id = channel_id
        self.channel = channel
        #: The channel, when it is a multiplexed one (pushes its messages; may write synchronously).
        self.mux: MuxChannel | None = channel if isinstance(channel, MuxChannel) else None
        # A multiplexed channel on a link that writes synchronously: every send leaves in the calling loop
        # step (a reply made in the push callback can never overtake one still queued).
        self.sync = self.mux is not None and self.mux.can_send_nowait
        self.queue: list[bytes] = []
        self.closing = False
        self.wake: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.gen = 0  # the current writer's generation (interrupt() starts a new one)
        self.is_closed = False  # the channel is closed (its last signals went out first)
        # Made only when someone waits while it is still open: a sync link closes in the session's last round,
        # before anyone waits, so most sessions never make one.
        self._closed_waiter: asyncio.Future[None] | None = None

    def closed_waiter(self) -> asyncio.Future[None] | None:
        """A future that resolves once the channel is closed, or None if it is closed already."""
        if self.is_closed:
            return None
        if self._closed_waiter is None:
            self._closed_waiter = asyncio.get_running_loop().create_future()
        return self._closed_waiter

    def _mark_closed(self) -> None:
        self.is_closed = True
        waiter = self._closed_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def start(self) -> None:
        mux = self.mux
        if mux is not None:  # its link's reader pushes each signal: no task of ours
            mux.listen(functools.partial(self.owner._signal, self.channel_id), self._ended)
        else:
            self.reader = asyncio.ensure_future(self._read())
        if not self.sync:
            self.writer = asyncio.ensure_future(self._write(self.gen, False))

    def interrupt(self) -> None:
        """The take was cancelled: give up a send still in flight (it never went out), then send what is
        queued after it (the ABORT) within ``CANCEL_SEND_TIMEOUT``."""
        if self.sync or self.writer is None or self.writer.done():
            return
        self.gen += 1
        self.writer.cancel()
        self.writer = asyncio.ensure_future(self._write(self.gen, True))

    def _ended(self, why: str) -> None:
        log.debug("channel %d: signalling channel ended: %s", self.channel_id, why)
        self.owner._broken(self.channel_id)

    async def _read(self) -> None:
        while True:
            try:
                data = await self.channel.recv()
            except Exception as exc:
                log.debug("channel %d: signalling channel ended: %r", self.channel_id, exc)
                self.owner._broken(self.channel_id)
                return
            self.owner._signal(self.channel_id, data)

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        mux = self.mux
        if self.sync and mux is not None:
            try:
                mux.send_nowait(data)
            except Exception as exc:
                log.debug("channel %d: send failed: %r", self.channel_id, exc)
                self._failed()
            return
        self.queue.append(data)
        self._kick()

    def close(self) -> None:
        """Graceful: everything queued goes out first; then the channel closes (bounded)."""
        if self.closing:
            return
        self.closing = True
        self._stop_reading()
        if self.sync:
            self._close_now()
            return
        if self.writer is None:
            self.writer = asyncio.ensure_future(self._write(self.gen, False))
        self._kick()

    def _close_now(self) -> None:
        """A sync link has nothing queued (its sends left already): CLOSE goes out now, no writer task to spawn."""
        mux = self.mux
        assert mux is not None  # sync implies multiplexed
        try:  # not contextlib.suppress: every session ends here (three calls less)
            mux.close_nowait()
        except Exception as exc:
            log.debug("channel %d: close failed: %r", self.channel_id, exc)
        self._mark_closed()

    def _kick(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def _failed(self) -> None:
        self._stop_reading()
        # Not from inside the driver's output round that is sending: the node hears it on the next step.
        asyncio.get_running_loop().call_soon(self.owner._broken, self.channel_id)

    def _stop_reading(self) -> None:
        if self.mux is not None:
            self.mux.listen(None)
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None

    async def _write(self, gen: int, bounded: bool) -> None:
        try:
            if bounded:
                async with asyncio.timeout(CANCEL_SEND_TIMEOUT):
                    await self._drain()
            else:
                await self._drain()
        except asyncio.CancelledError:
            if gen != self.gen:  # interrupted: the next writer carries on (and closes)
                return
            raise
        except TimeoutError:
            log.debug("channel %d: the final signals did not go out within %s s", self.channel_id,
                      CANCEL_SEND_TIMEOUT)
        finally:
            if gen == self.gen:
                await _close(self.channel)
                self._mark_closed()

    async def _drain(self) -> None:
        """Send the queue in order; once closing and empty, return (the caller closes)."""
        while True:
            while self.queue:
                data = self.queue.pop(0)
                try:
                    await self.channel.send(data)
                except Exception as exc:
                    log.debug("channel %d: send failed: %r", self.channel_id, exc)
                    self.queue.clear()
                    if not self.closing:
                        self._failed()
                    return
            if self.closing:
                return
            self.wake = asyncio.get_running_loop().create_future()
            try:
                await self.wake
            finally:
                self.wake = None


class NodeChannels:
    """The asyncio driver's share of the handover: the node's channel ids mapped to :class:`SignalChannel` s.

    Everything the sessions decide happens in the :class:`~natpool.core.node.Node`;
    this only feeds each channel's messages in (``receive_signal``, then the
    driver's ``after_input``), sends the node's signals in order, closes a
    channel when the node asks (after the signals of that round) and resolves
    the future of each ended session. No per-session loop, no session timer:
    the driver's one timer covers them.
    """

    def __init__(self, node: Node, clock: Clock, after_input: Callable[[float], None]) -> None:
        self._node = node
        self._clock = clock
        self._after_input = after_input
        self._links: dict[int, _Link] = {}
        self._held: dict[int, list[bytes]] = {}  # a take's signals while its channel opens
        self._close_held: set[int] = set()  # ... and the close the node asked for meanwhile
        self._ended: dict[int, asyncio.Future[Lease | HandoverError]] = {}
        self._closing: dict[int, _Link] = {}  # attached channels whose close nobody has waited for yet

    def expect(self, channel_id: int) -> asyncio.Future[Lease | HandoverError]:
        """The future of the session on ``channel_id`` (resolved by :meth:`ended`); held signals wait for attach."""
        fut: asyncio.Future[Lease | HandoverError] = asyncio.get_running_loop().create_future()
        self._ended[channel_id] = fut
        self._held.setdefault(channel_id, [])
        return fut

    def attach(self, channel_id: int, channel: SignalChannel) -> None:
        link = _Link(self, channel_id, channel)
        self._links[channel_id] = link
        self._closing[channel_id] = link
        link.start()
        for data in self._held.pop(channel_id, ()):
            link.send(data)
        if channel_id in self._close_held:
            self._close_held.discard(channel_id)
            self.close(channel_id)

    def interrupt(self, channel_id: int) -> None:
        """A cancelled take: its channel's send in flight is given up (see :meth:`_Link.interrupt`)."""
        link = self._links.get(channel_id)
        if link is not None:
            link.interrupt()

    def forget(self, channel_id: int) -> None:
        """The channel never opened: drop what waited for it."""
        self._held.pop(channel_id, None)
        self._close_held.discard(channel_id)

    def ship(self, signals: list[tuple[int, bytes]]) -> None:
        links, held = self._links, self._held
        for channel_id, data in signals:
            link = links.get(channel_id)
            if link is not None:
                link.send(data)
            elif channel_id in held:
                held[channel_id].append(data)

    def close(self, channel_id: int) -> None:
        link = self._links.pop(channel_id, None)
        if link is not None:
            link.close()
        elif channel_id in self._held:
            self._close_held.add(channel_id)

    def ended(self, channel_id: int, outcome: Lease | HandoverError) -> None:
        fut = self._ended.pop(channel_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    async def closed(self, channel_id: int) -> None:
        """Wait until ``channel_id`` is closed (its writer sends what the session queued, then closes, bounded)."""
        fut = self.closing(channel_id)
        if fut is not None:
            await fut

    def closing(self, channel_id: int) -> asyncio.Future[None] | None:
        """What :meth:`closed` awaits, or None when ``channel_id`` is closed already (a sync link's usual case).

        Lets the driver skip a coroutine per session end when there is nothing to wait for.
        """
        link = self._closing.pop(channel_id, None)
        return None if link is None else link.closed_waiter()

    def _signal(self, channel_id: int, data: bytes) -> None:
        now = self._clock()
        self._node.receive_signal(channel_id, data, now)
        self._after_input(now)  # the same ``now``: one clock read per signal

    def _broken(self, channel_id: int) -> None:
        link = self._links.pop(channel_id, None)
        if link is not None:
            link.closing = True
            link.queue.clear()
            link._stop_reading()
            if link.sync:  # nothing to flush: close here
                link._close_now()
            elif link.writer is None:  # pragma: no cover - an async link always has its writer
                link.writer = asyncio.ensure_future(link._write(link.gen, False))
            link._kick()
        now = self._clock()
        self._node.channel_closed(channel_id, now)
        self._after_input(now)
