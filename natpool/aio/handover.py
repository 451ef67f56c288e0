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
from natpool.errors import ChannelBroken, HandoverError, HandoverTimeout
from natpool.signalling import SignalChannel

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Progress = Callable[[], None] | None

#: Loops fire timeouts up to ~1 ms early; a session timer that close counts as due.
TIMER_SLACK = 0.001
#: Bound on sending the final ABORT of a cancelled session, so cancellation never hangs.
CANCEL_SEND_TIMEOUT = 0.5


async def run_initiator(pool: PairPool, session: InitiatorSession, channel: SignalChannel, clock: Clock,
                        *, on_progress: Progress = None) -> Lease:
    """Drive ``session`` (from ``pool.start_take``) over ``channel``; return the lease or raise its HandoverError.

    The channel is closed when the session ends. Cancelling the caller
    aborts the session (ABORT(CANCELLED), entry returned per spec).
    """
    return await _pump(session, channel, clock, on_progress)


async def serve_responder(pool: PairPool, channel: SignalChannel, clock: Clock,
                          *, on_progress: Progress = None) -> Lease:
    """The responder entry point: serve one incoming session on ``channel``; return the lease or raise.

    Waits at most ``pool.config.lock_timeout`` for the first signal.
    """
    try:
        first = await asyncio.wait_for(channel.recv(), timeout=pool.config.lock_timeout)
    except TimeoutError:
        await _close(channel)
        raise HandoverTimeout("no LOCK arrived on the incoming signalling channel") from None
    except Exception as exc:  # any channel failure: the session never started
        await _close(channel)
        raise ChannelBroken(f"incoming signalling channel failed before LOCK: {exc!r}") from exc
    session: ResponderSession = pool.accept_session(first, clock())
    if on_progress is not None:
        on_progress()
    return await _pump(session, channel, clock, on_progress)


async def _pump(session: Session, channel: SignalChannel, clock: Clock, on_progress: Progress) -> Lease:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    loop_thread = threading.get_ident()

    def waker() -> None:
        # The pool may route an entry event from another thread; Event is not thread-safe.
        if threading.get_ident() == loop_thread:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    session.waker = waker
    recv_task: asyncio.Task[bytes] | None = asyncio.ensure_future(channel.recv())
    try:
        while True:
            wake.clear()  # before flushing: anything queued from here on wakes the wait below
            if not await _flush(session, channel, clock):
                session.channel_closed(clock())
                if recv_task is not None:
                    recv_task.cancel()
                    recv_task = None
                continue
            if on_progress is not None:
                on_progress()
            if session.done:
                break
            timer = session.get_timer()
            timeout = None if timer is None else max(0.0, timer - clock())
            waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(wake.wait())}
            if recv_task is not None:
                waiters.add(recv_task)  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                if w is not recv_task:
                    w.cancel()
            if recv_task is not None and recv_task in done:
                exc = recv_task.exception()
                if exc is None:
                    session.receive_signal(recv_task.result(), clock())
                    recv_task = asyncio.ensure_future(channel.recv())
                else:
                    log.debug("handover %#x: signalling channel ended: %r", session.nonce, exc)
                    session.channel_closed(clock())
                    recv_task = None
            timer = session.get_timer()
            now = clock()
            if timer is not None and now + TIMER_SLACK >= timer:
                session.handle_timer(max(now, timer))
    except asyncio.CancelledError:
        session.cancel(clock())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_flush(session, channel, clock), timeout=CANCEL_SEND_TIMEOUT)
        raise
    finally:
        session.waker = None
        if recv_task is not None:
            recv_task.cancel()
            with contextlib.suppress(BaseException):
                await recv_task
        await _close(channel)
        if on_progress is not None:
            on_progress()
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
    with contextlib.suppress(Exception):
        await channel.close()
