"""The async pump: shuttles signals between a :class:`SignalChannel` and a sans-IO session.

Generic on purpose: it needs only the sans-IO :class:`PairPool`, a channel
and a ``clock`` (``loop.time`` in the asyncio driver), so ``AsyncPairPool``
and tests call the same code. The pump never polls: it sleeps until a
message arrives, the session's own timer is due, or the session's
``waker`` fires (the pool routed an entry event — e.g. the last pong
drained the pinger — and the session queued a signal or ended).

``on_progress`` is called after every step that may have changed an entry
(the asyncio driver passes its ``kick``, which re-arms its single timer and
flushes datagrams of an entry that went back to Idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from natpool.core.handover import InitiatorSession, ResponderSession, Session
from natpool.core.lease import Lease
from natpool.core.pool import PairPool
from natpool.errors import ChannelBroken, HandoverCancelled, HandoverError, HandoverTimeout
from natpool.mux import MuxChannel
from natpool.signalling import SignalChannel

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Progress = Callable[[], None] | None

#: Loops fire timeouts up to ~1 ms early; a session timer that close counts as due.
TIMER_SLACK = 0.001
#: Bound on sending the final ABORT of a cancelled session and on closing a channel, so an end never hangs.
CANCEL_SEND_TIMEOUT = 0.5


async def run_initiator(pool: PairPool, session: InitiatorSession, channel: SignalChannel, clock: Clock,
                        *, on_progress: Progress = None) -> Lease:
    """Drive ``session`` (from ``pool.start_take``) over ``channel``; return the lease or raise its HandoverError.

    The channel is closed when the session ends. Cancelling the caller
    aborts the session (ABORT(CANCELLED), entry returned per spec).
    """
    return await _pump(session, channel, clock, on_progress)


async def serve_responder(pool: PairPool, channel: SignalChannel, clock: Clock,
                          *, on_progress: Progress = None, may_start: Callable[[], bool] | None = None) -> Lease:
    """The responder entry point: serve one incoming session on ``channel``; return the lease or raise.

    Waits at most ``pool.config.lock_timeout`` for the first signal. The
    channel is closed on every exit, cancellation included: an initiator
    whose LOCK will never be answered learns it at once instead of waiting
    out its own ``lock_timeout``. ``may_start`` is asked once the first
    signal is in, before any entry is claimed; False (the pool began
    closing) ends here with :class:`HandoverCancelled`, nothing claimed.
    """
    # A multiplexed session's first signal usually came in with its OPEN: no timeout to arm and cancel.
    first = channel.recv_nowait() if isinstance(channel, MuxChannel) else None
    if first is None:
        first = await _first_signal(pool, channel)
    if may_start is not None and not may_start():
        await _close(channel)
        raise HandoverCancelled("the pool began closing before this session could claim an entry")
    session: ResponderSession = pool.accept_session(first, clock())
    if on_progress is not None:
        on_progress()
    return await _pump(session, channel, clock, on_progress)


async def _first_signal(pool: PairPool, channel: SignalChannel) -> bytes:
    """Wait at most ``lock_timeout`` for an incoming channel's first signal; the channel is closed on failure."""
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for returns the result of a read that completed
        # as the task was cancelled, swallowing the cancellation (and a closing pool then took a LOCK).
        async with asyncio.timeout(pool.config.lock_timeout):
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


async def _pump(session: Session, channel: SignalChannel, clock: Clock, on_progress: Progress) -> Lease:
    """Flush, then sleep on one future until a signal was processed, the waker fired or the timer is due.

    One reader task per session feeds incoming signals straight into the
    session (no task per message, no ``asyncio.wait`` per step); a
    :class:`MuxChannel` needs not even that: its link's reader pushes each
    signal into the session (``listen``). Only this coroutine sends, so the
    session's output order is kept.
    """
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    dirty = False  # something happened since the last flush
    muted = False  # inside ``pushed``, which flushes and decides itself whether the loop must wake
    sleeper: asyncio.Future[None] | None = None
    fired: float | None = None  # the last timer handled
    # The session's timer stays armed across sleeps while its deadline is unchanged (the lock deadline
    # is the same for most of a take): one loop timer per deadline, not one call_later per step.
    alarm: asyncio.TimerHandle | None = None
    alarm_at: float | None = None

    def ring() -> None:
        nonlocal alarm, alarm_at
        alarm = alarm_at = None
        wake_local()

    def wake_local() -> None:
        nonlocal dirty
        dirty = True
        if not muted and sleeper is not None and not sleeper.done():
            sleeper.set_result(None)

    def waker() -> None:
        # The pool may route an entry event from another thread; futures are not thread-safe.
        if threading.get_ident() == loop_thread:
            wake_local()
        else:
            loop.call_soon_threadsafe(wake_local)

    async def reader() -> None:
        while True:
            try:
                data = await channel.recv()
            except Exception as exc:
                log.debug("handover %#x: signalling channel ended: %r", session.nonce, exc)
                session.channel_closed(clock())
                wake_local()
                return
            session.receive_signal(data, clock())
            wake_local()

    def flush_now() -> bool:
        assert isinstance(channel, MuxChannel)
        for data in session.signals_to_send():
            try:
                channel.send_nowait(data)
            except Exception as exc:
                log.debug("handover %#x: send failed: %r", session.nonce, exc)
                return False
        return True

    def pushed(data: bytes) -> None:
        nonlocal muted
        if not sync_send:
            session.receive_signal(data, clock())
            wake_local()
            return
        muted = True  # the reply is sent right here: the session's waker need not wake the loop below
        try:
            session.receive_signal(data, clock())
            if on_progress is not None:  # the driver sees the entry events before the reply leaves
                on_progress()
            sent = flush_now()  # the reply leaves in this very loop step
        finally:
            muted = False
        if not sent:
            assert isinstance(channel, MuxChannel)
            channel.listen(None)
            session.channel_closed(clock())
            wake_local()
            return
        if session.done:
            wake_local()
            return
        # The loop below only has a timer to re-arm or run (a new deadline); otherwise it sleeps on.
        if session.get_timer() != alarm_at:
            wake_local()

    def pushed_end(why: str) -> None:
        log.debug("handover %#x: signalling channel ended: %s", session.nonce, why)
        session.channel_closed(clock())
        wake_local()

    session.waker = waker
    # A multiplexed channel pushes each signal from its link's reader: no reader task, one loop step less.
    push = isinstance(channel, MuxChannel)
    # ... and, on a link that writes synchronously, every send of this session is synchronous too, so a
    # reply made in the push callback can never overtake one the loop below is still sending.
    sync_send = push and isinstance(channel, MuxChannel) and channel.can_send_nowait
    reader_task: asyncio.Task[None] | None = None
    if push:
        assert isinstance(channel, MuxChannel)
        channel.listen(pushed, pushed_end)
    else:
        reader_task = asyncio.ensure_future(reader())
    try:
        while True:
            dirty = False  # before flushing: anything queued from here on skips the sleep below
            if on_progress is not None:  # entry events first (a lease's receive buffer widens), then signals
                on_progress()
            if not (flush_now() if sync_send else await _flush(session, channel, clock)):
                if push:
                    assert isinstance(channel, MuxChannel)
                    channel.listen(None)
                session.channel_closed(clock())
                if reader_task is not None:
                    reader_task.cancel()
                    reader_task = None
                continue
            if session.done:
                break
            timer = session.get_timer()
            now = clock()
            if timer is not None and now + TIMER_SLACK >= timer:
                if timer == fired:  # the same timer again: never spin without yielding to the loop
                    await asyncio.sleep(0)
                fired = timer
                session.handle_timer(max(now, timer))
                continue
            if dirty:
                continue
            if timer != alarm_at:
                if alarm is not None:
                    alarm.cancel()
                alarm = None if timer is None else loop.call_later(timer - now, ring)
                alarm_at = timer
            sleeper = loop.create_future()
            try:
                await sleeper
            finally:
                sleeper = None
    except asyncio.CancelledError:
        if push:
            assert isinstance(channel, MuxChannel)
            channel.listen(None)
        if reader_task is not None:
            reader_task.cancel()
            reader_task = None
        session.cancel(clock())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_flush(session, channel, clock), timeout=CANCEL_SEND_TIMEOUT)
        raise
    finally:
        if alarm is not None:
            alarm.cancel()
            alarm = None
        session.waker = None
        if push:
            assert isinstance(channel, MuxChannel)
            channel.listen(None)
        cancelled = False  # our own task was cancelled while it waited for the reader to end
        if reader_task is not None:
            reader_task.cancel()
            try:
                await reader_task
            except asyncio.CancelledError:
                # The reader's own cancellation is expected; ours must not be swallowed here.
                me = asyncio.current_task()
                cancelled = me is not None and me.cancelling() > 0
            except Exception as exc:  # pragma: no cover - the reader catches every channel error itself
                log.debug("handover %#x: signalling reader failed: %r", session.nonce, exc)
        await _close(channel)
        if on_progress is not None:
            on_progress()
        if cancelled:
            raise asyncio.CancelledError
    outcome = session.outcome
    if isinstance(outcome, Lease):
        return outcome
    assert isinstance(outcome, HandoverError)
    raise outcome


async def _flush(session: Session, channel: SignalChannel, clock: Clock) -> bool:
    """Send everything the session queued; False if the channel failed."""
    for data in session.signals_to_send():
        try:
            await channel.send(data)
        except Exception as exc:
            log.debug("handover %#x: send failed: %r", session.nonce, exc)
            return False
    return True


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
