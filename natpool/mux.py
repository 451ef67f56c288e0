"""Many concurrent handover sessions to one peer over ONE ordered, reliable message link.

An application usually has one control connection per peer already (a TCP
or WebSocket connection, a relay stream). :class:`Mux` takes that connection
as it is — anything shaped like a :class:`~natpool.signalling.SignalChannel`
(``send`` / ``recv`` / ``close`` of whole messages, in order) — and carries
every handover session to that peer on it, so the application needs no glue
and no connection per take (a fresh TCP connect alone costs ≈ 220 µs on
loopback, five times a whole 2-round-trip exchange on an open connection)::

    mux = Mux(control_connection, on_session=pool.serve_handover).start()
    pool.signalling = mux                    # open(peer) -> a virtual channel on this link
    lease = await pool.take_any("bob")

Each session is a virtual :class:`MuxChannel`; the frames are
:mod:`natpool.wire.mux` (session id + OPEN / DATA / CLOSE). The rules:

* ``open`` sends OPEN; the peer's ``on_session`` gets the other end at
  once (the responder side typically passes ``pool.serve_handover``), as a
  per-take connection's server would on connect. On a link with
  ``send_nowait`` an OPEN carries the session's first message when that is
  sent in the step of ``open`` (as a take's LOCK is); otherwise it goes out
  alone in the loop's next step, so a session exists for the peer from
  ``open`` on, whatever is sent.
* ``close`` of a virtual channel sends CLOSE; a CLOSE from the peer breaks
  that channel (messages already queued are still delivered first, as a
  TCP EOF would) — exactly one session ends, the link stays. On a link that
  batches each read's writes (``batching`` and ``listen(on_batch_end=)``,
  as :class:`natpool.aio.tcp.TcpChannel`), a CLOSE made while a read is
  dispatched waits for the end of that read, and is not sent at all if the
  peer's CLOSE for the same session is in it (both ends closed it; a take's
  last read brings TAKEN and the responder's CLOSE together).
* Losing the link fails every session on it at once: each channel's
  ``recv`` / ``send`` raise :class:`ChannelBroken`, which is the spec's
  ``channel_closed`` for each session (spec/handover.md).
* At most ``max_sessions`` sessions live on one link; a local ``open``
  beyond it raises :class:`SessionLimit`, a remote OPEN beyond it is
  answered with CLOSE; both are counted (``refused_local`` / ``refused_remote``).
* Remote bad input (a malformed frame, DATA for a session that never
  existed, an OPEN for a live id) is dropped, counted in ``drops`` and logged at
  DEBUG; it never raises and never ends the link. Frames for a session that
  already ended here (a CLOSE crossing a DATA) are expected and only counted
  as ``late``.

One reader per link (:meth:`Mux.run`, or the task :meth:`Mux.start`
makes) decodes each message and puts its payload straight into the session's
inbox: no task and no queue hop per message; a task per *incoming session*
runs ``on_session``. A link that can push (``listen``, as
:class:`natpool.aio.tcp.TcpChannel` does) is read from its transport's read
callback: the reader then only waits for the link to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import NoReturn

from natpool.errors import ChannelBroken, DropReason, LocalError, RemoteProtocolError, SessionLimit
from natpool.signalling import SignalChannel
from natpool.wire import mux as wire
from natpool.wire.mux import FrameKind

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 256
#: Bound on sending a CLOSE and on closing the link, so ending a session or a link never hangs.
CLOSE_TIMEOUT = 0.5

SessionHandler = Callable[["MuxChannel"], "Awaitable[object] | None"]
DropNote = Callable[..., None]


class MuxChannel:
    """One session's virtual channel on a :class:`Mux` (a :class:`SignalChannel`).

    ``recv`` waits at most ``read_timeout`` (the mux's) for a message, then
    ends the session (CLOSE) and raises ``ChannelBroken("read timeout")``, as
    a per-take TCP connection with that timeout would. One ``recv`` at a time.
    ``peer_identity`` is the link's verified peer (:attr:`Mux.peer_identity`):
    every session on a link is with the one peer the link authenticated.
    """

    __slots__ = ("_broken", "_closed", "_inbox", "_key", "_mux", "_on_end", "_on_message", "_opened", "_waiter",
                 "local", "peer", "peer_identity", "sid")

    def __init__(self, mux: Mux, sid: int, local: bool) -> None:
        self._mux = mux
        self._key = sid << 1 | (0 if local else 1)
        self.sid = sid
        self.local = local  # True: this side opened the session
        self.peer = mux.peer
        self.peer_identity = mux.peer_identity
        self._inbox: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False  # closed here
        self._broken: str | None = None  # why the peer or the link ended it
        self._opened = not local  # OPEN went out (or came in)
        self._on_message: Callable[[bytes], None] | None = None
        self._on_end: Callable[[str], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed or self._broken is not None

    async def send(self, data: bytes) -> None:
        if self._closed or self._broken is not None:
            raise ChannelBroken(f"mux session {self.sid} is closed ({self._broken or 'closed here'})")
        mux = self._mux
        if len(data) > mux.max_payload or not data:
            raise LocalError(f"a message of {len(data)} bytes does not fit a mux frame (1..{mux.max_payload})")
        if self._opened:
            await mux._send(wire.encode_data(self.sid, self.local, data))
        else:  # the session's first message rides in its OPEN
            self._opened = True
            await mux._send(wire.encode_open(self.sid, data))

    @property
    def can_send_nowait(self) -> bool:
        """True if the link can write a message synchronously (it has ``send_nowait``, as TcpChannel does)."""
        return self._mux._send_now is not None

    def send_nowait(self, data: bytes) -> None:
        """:meth:`send` without suspending, for a caller in a push callback (``listen``); needs :attr:`can_send_nowait`.

        Lets a reply leave in the same loop step as the message it answers.
        """
        if self._closed or self._broken is not None:
            raise ChannelBroken(f"mux session {self.sid} is closed ({self._broken or 'closed here'})")
        mux = self._mux
        if len(data) > mux.max_payload or not data:
            raise LocalError(f"a message of {len(data)} bytes does not fit a mux frame (1..{mux.max_payload})")
        if self._opened:
            frame = wire.encode_data(self.sid, self.local, data)
        else:  # the session's first message rides in its OPEN
            self._opened = True
            frame = wire.encode_open(self.sid, data)
        send_now = mux._send_now
        if mux._lost is not None or send_now is None:
            mux._send_sync(frame)  # raises: the link is gone (ChannelBroken) or cannot write now (LocalError)
            return
        try:  # Mux._send_sync, inlined (every signal)
            send_now(frame)
        except Exception as exc:
            mux._send_failed(exc)

    def recv_nowait(self) -> bytes | None:
        """The next queued message, or None (nothing queued, or the session ended): never suspends.

        Lets a consumer skip arming a timeout for a message that is already
        here (the first signal of an incoming session arrives with its OPEN).
        """
        if self._closed or not self._inbox:
            return None
        return self._inbox.popleft()

    async def recv(self) -> bytes:
        if self._closed:
            raise ChannelBroken(f"mux session {self.sid} is closed here")
        if self._inbox:
            return self._inbox.popleft()
        if self._broken is not None:
            raise ChannelBroken(f"mux session {self.sid}: {self._broken}")
        if self._waiter is not None:
            raise LocalError("one recv at a time on a mux channel")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timeout = self._mux.read_timeout
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._inbox:
            return self._inbox.popleft()
        if self._closed:
            raise ChannelBroken(f"mux session {self.sid} is closed here")
        if self._broken is not None:
            raise ChannelBroken(f"mux session {self.sid}: {self._broken}")
        # Only the timer resolves the waiter with nothing to deliver and nothing ended.
        self._mux._note("read_timeout", "mux session %d from %s: read timed out; closing", self.sid, self.peer)
        await self.close()
        raise ChannelBroken("read timeout")

    async def close(self) -> None:
        """End the session: CLOSE goes out (unless the peer or the link ended it). Idempotent, never raises."""
        if self._closed:
            return
        if not self._opened and self._broken is None:
            self._mux._open_alone(self)  # closed in the step it was opened in: the peer still sees the session
        self._closed = True
        self._wake()
        await self._mux._ended(self, send_close=self._broken is None and self._opened)

    def close_nowait(self) -> None:
        """:meth:`close` without suspending, for a caller in a push callback; needs :attr:`can_send_nowait`.

        A session that ends while handling a message (a responder that just
        sent TAKEN) closes right there: on a link that batches the writes of
        one read (TcpChannel in push mode), its last message and its CLOSE
        leave in one segment. Idempotent, never raises ChannelBroken.
        """
        if self._closed:
            return
        if self._mux._send_now is None:
            raise LocalError("close_nowait needs a link with send_nowait")
        if not self._opened and self._broken is None:
            self._mux._open_alone(self)
        self._closed = True
        self._wake()
        self._mux._ended_now(self, send_close=self._broken is None and self._opened)

    def listen(self, on_message: Callable[[bytes], None] | None, on_end: Callable[[str], None] | None = None) -> None:
        """Push mode: the link's reader calls ``on_message`` with each message, ``on_end`` once the session ends.

        Saves the consumer a reader task and a loop iteration per message (the
        handover pump uses it). Messages already queued are pushed at once,
        then ``on_end`` if the session already ended; ``listen(None)`` goes
        back to ``recv``. Callbacks must not raise (what they raise is logged
        and ends this session, never the link).
        """
        self._on_message, self._on_end = on_message, on_end
        if on_message is None:
            return
        while self._inbox and self._on_message is on_message:
            self._push(self._inbox.popleft())
        if self._broken is not None and self._on_message is on_message:
            self._ended_push(self._broken)

    # --- called by the mux ------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        on_message = self._on_message
        if on_message is not None:
            try:  # _push, inlined: one call less per message
                on_message(data)
            except Exception:
                self._listener_failed()
        else:
            self._inbox.append(data)
            self._wake()

    def _break(self, why: str, *, drop_queued: bool) -> None:
        if self._broken is None:
            self._broken = why
        if drop_queued:
            self._inbox.clear()
        self._wake()
        if self._on_message is not None:
            self._ended_push(why)

    def _push(self, data: bytes) -> None:
        assert self._on_message is not None
        try:
            self._on_message(data)
        except Exception:
            self._listener_failed()

    def _listener_failed(self) -> None:
        log.exception("mux session %d listener failed; ending the session", self.sid)
        self._on_message = self._on_end = None
        self._broken = self._broken or "listener failed"
        self._mux._spawn(self.close())

    def _ended_push(self, why: str) -> None:
        on_end, self._on_message, self._on_end = self._on_end, None, None
        if on_end is not None:
            try:
                on_end(why)
            except Exception:
                log.exception("mux session %d end listener failed", self.sid)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Mux:
    """Sessions multiplexed over one message ``link`` to one peer; also a one-peer :class:`Signalling`.

    ``on_session`` gets each session the peer opens (its return value, if
    awaitable, runs as that session's task; a handler that raises is logged
    and counted in ``handler_errors``, never kills the link). Without it an
    incoming OPEN is refused like one beyond the cap. ``read_timeout`` bounds
    each virtual ``recv``; the link itself may stay idle for ever.

    ``peer`` names the peer for logs and ``open``; it is a claim, not a proof.
    ``peer_identity`` is what the sessions report as their authenticated peer:
    by default the link's own ``peer_identity`` (a link from
    :class:`natpool.aio.tcp.TcpSignalling` with secrets, say), else None.
    Pass it only for a link whose far end your application has verified.
    """

    def __init__(
        self,
        link: SignalChannel,
        *,
        on_session: SessionHandler | None = None,
        peer: str | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
        read_timeout: float | None = None,
        drop_note: DropNote | None = None,
        peer_identity: str | None = None,
    ) -> None:
        if max_sessions < 1:
            raise LocalError("max_sessions must be at least 1")
        if max_payload < 1:
            raise LocalError("max_payload must be at least 1")
        self.link = link
        self.on_session = on_session
        self.peer = peer
        self.peer_identity: str | None = (peer_identity if peer_identity is not None
                                          else getattr(link, "peer_identity", None))
        self.max_sessions = max_sessions
        self.max_payload = max_payload
        self.read_timeout = read_timeout
        self.drops: Counter[DropReason] = Counter()
        self.refused_local = 0
        self.refused_remote = 0
        self.late = 0  # frames for a session that already ended here: expected races, not bad input
        self.opened = 0  # sessions opened here
        self.accepted = 0  # sessions the peer opened
        self.handler_errors = 0
        self._drop_note = drop_note
        send_now = getattr(link, "send_nowait", None)
        self._send_now: Callable[[bytes], None] | None = send_now if callable(send_now) else None
        self._sessions: dict[int, MuxChannel] = {}
        self._next_sid = 1
        self._peer_sid = 0  # highest id the peer opened so far
        self._lost: str | None = None
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Event | None = None
        # A link that batches each read's writes (TcpChannel: ``batching``, ``listen(on_batch_end=)``): a CLOSE
        # made while it dispatches a read is held to the read's end, and dropped if the peer's CLOSE for the
        # same session comes in that read (a take's TAKEN and the responder's CLOSE arrive together).
        self._batch_link: SignalChannel | None = None
        self._held: dict[int, tuple[int, bool]] = {}  # session key -> (sid, opened here) of a held CLOSE

    # --- state --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the link was lost or the mux closed: a new ``open`` needs a new link."""
        return self._lost is None and not self._closing and self._next_sid <= wire.SID_MAX

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    # --- Signalling -----------------------------------------------------------------------------

    async def open(self, peer_identity: str | None = None) -> MuxChannel:
        """A new session on this link (``peer_identity``, if given, must be this link's peer).

        Raises :class:`ChannelBroken` if the link is known to be gone,
        :class:`SessionLimit` at the cap. On a link that writes synchronously
        (``send_nowait``), OPEN carries the session's first message if that
        is sent before the loop's next step (a take's LOCK is: one frame, one
        write, one dispatch at the peer instead of two); otherwise it goes
        out alone in that step (or at ``close``), so a session exists for the
        peer from ``open`` on, whatever is sent; a link failure is then the
        session's (its ``send`` / ``recv`` raise ChannelBroken). On any
        other link OPEN has been sent when this returns.
        """
        if peer_identity is not None and self.peer is not None and peer_identity != self.peer:
            raise LocalError(f"this link goes to {self.peer!r}, not {peer_identity!r}")
        if not self.alive:
            raise ChannelBroken(f"mux link to {self.peer!r} is {self._lost or 'closed'}")
        if len(self._sessions) >= self.max_sessions:
            self.refused_local += 1
            raise SessionLimit(f"{self.max_sessions} sessions already run on the link to {self.peer!r}")
        sid = self._next_sid
        self._next_sid += 1
        channel = MuxChannel(self, sid, local=True)
        self._sessions[channel._key] = channel
        self.opened += 1
        if self._send_now is not None:
            asyncio.get_running_loop().call_soon(self._open_alone, channel)
            return channel
        # A link that only sends asynchronously: OPEN now, alone (a later OPEN could not be ordered
        # before the session's own sends without a queue).
        try:
            await self._send(wire.encode_open(sid))
        except BaseException:
            channel._closed = True
            self._sessions.pop(channel._key, None)
            raise
        channel._opened = True
        return channel

    def _open_alone(self, channel: MuxChannel) -> None:
        """The OPEN of a session that sent nothing in the step it was opened in (see :meth:`open`)."""
        if channel._opened or channel.closed or self._lost is not None:
            return
        channel._opened = True
        with contextlib.suppress(ChannelBroken):  # a lost link broke the session already
            self._send_sync(wire.encode_open(channel.sid))

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Mux:
        """Run :meth:`run` as this mux's reader task (needs a running loop)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._run_quietly())
        return self

    async def _run_quietly(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.run()

    async def run(self) -> None:
        """Read the link until it ends, dispatching each message to its session; then fail the rest."""
        if self._done is None:
            self._done = asyncio.Event()
        why = "link lost"
        listen = getattr(self.link, "listen", None)
        try:
            if callable(listen) and getattr(self.link, "can_listen", False):
                # A link that pushes (TcpChannel.listen): every message is dispatched from the
                # transport's read callback, so this coroutine only waits for the end.
                ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

                def on_end(reason: str) -> None:
                    if not ended.done():
                        ended.set_result(reason)

                if isinstance(getattr(type(self.link), "batching", None), property):
                    self._batch_link = self.link
                    listen(self.feed, on_end, on_batch_end=self._flush_held)
                else:
                    listen(self.feed, on_end)
                try:
                    why = f"link lost: {await ended}"
                finally:
                    listen(None)
                log.debug("mux link to %s ended: %s", self.peer, why)
            else:
                recv = self.link.recv
                feed = self.feed
                while True:
                    feed(await recv())
        except Exception as exc:
            why = f"link lost: {exc!r}"
            log.debug("mux link to %s ended: %r", self.peer, exc)
        finally:
            self._lose(why)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.link.close()
            self._done.set()

    async def wait_closed(self) -> None:
        """Return once the reader has ended (link lost or mux closed)."""
        if self._done is None:
            self._done = asyncio.Event()
        await self._done.wait()

    async def wait_sessions(self) -> None:
        """Wait, without cancelling them, for the tasks of the sessions the peer opened."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Fail every session, close the link and wait for the incoming sessions' tasks. Never raises."""
        if self._closing:
            return
        self._closing = True
        self._lose("mux closed")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.link.close()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        self._held.clear()  # the peer sees every session end with the link
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for channel in sessions:
            channel._break(why, drop_queued=True)

    # --- incoming -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Dispatch one link message. Remote bad input is dropped and counted here, never raised."""
        fast = wire.decode_data(data, self.max_payload)
        if fast is not None:  # a DATA frame: most of the traffic
            if self._lost is not None:
                return
            sid, opener, payload = fast
            channel = self._sessions.get(sid << 1 | opener)
            if channel is not None:
                channel._deliver(payload)
            else:
                self._unknown(wire.MuxFrame(FrameKind.DATA, sid, bool(opener), payload))
            return
        try:
            kind, sid, opener, payload = wire.decode_fields(data, self.max_payload)  # no frame object per message
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            self._note(exc.reason.value, "mux frame from %s dropped: %s", self.peer, exc)
            return
        if self._lost is not None:
            return
        # The sender's "I opened it" is our "the peer opened it": key bit 1.
        key = sid << 1 | (1 if opener else 0)
        if kind is FrameKind.DATA:
            channel = self._sessions.get(key)
            if channel is not None:
                channel._deliver(payload)
            else:
                self._unknown(wire.MuxFrame(kind, sid, opener, payload))
        elif kind is FrameKind.OPEN:
            self._incoming(sid, payload)
        else:  # CLOSE
            channel = self._sessions.pop(key, None)
            if channel is not None:
                channel._break("closed by the peer", drop_queued=False)
            elif self._held and self._held.pop(key, None) is not None:
                self.late += 1  # both ends closed it: ours, held in this read, need not go at all
            else:
                self._unknown(wire.MuxFrame(kind, sid, opener, payload))

    def _unknown(self, frame: wire.MuxFrame) -> None:
        last = self._peer_sid if frame.opener else self._next_sid - 1
        if frame.sid <= last:
            self.late += 1  # that session ended here already
            return
        self.drops[DropReason.UNEXPECTED] += 1
        self._note(DropReason.UNEXPECTED.value, "mux %s for session %d from %s, which was never opened; dropped",
                   frame.kind.name, frame.sid, self.peer)

    def _incoming(self, sid: int, first: bytes) -> None:
        # Ids are never reused, but OPENs may arrive out of id order (a session announces itself with its
        # first message), so only an id that is live right now is refused.
        if (sid << 1 | 1) in self._sessions:
            self.drops[DropReason.UNEXPECTED] += 1
            self._note(DropReason.UNEXPECTED.value, "mux OPEN from %s reuses live session id %d; dropped",
                       self.peer, sid)
            return
        self._peer_sid = max(self._peer_sid, sid)
        if self.on_session is None or len(self._sessions) >= self.max_sessions or self._closing:
            self.refused_remote += 1
            log.debug("mux OPEN %d from %s refused (%d sessions, cap %d)", sid, self.peer,
                      len(self._sessions), self.max_sessions)
            self._spawn(self._send_quietly(wire.encode(wire.MuxFrame(FrameKind.CLOSE, sid, False))))
            return
        channel = MuxChannel(self, sid, local=False)
        if first:
            channel._inbox.append(first)
        self._sessions[channel._key] = channel
        self.accepted += 1
        try:
            result = self.on_session(channel)
        except Exception:
            self.handler_errors += 1
            log.exception("mux session handler failed for peer %s", self.peer)
            self._spawn(channel.close())
            return
        if result is not None:
            self._spawn(self._guard(result, channel))

    async def _guard(self, work: Awaitable[object], channel: MuxChannel) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            # A handler bug must not kill the link; it is logged loudly, not swallowed silently.
            self.handler_errors += 1
            log.exception("mux session handler failed for peer %s", self.peer)
        finally:
            if not channel._closed:  # usually closed by the handler already: no close() coroutine then
                await channel.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- outgoing -------------------------------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        if self._lost is not None:
            raise ChannelBroken(f"mux link to {self.peer!r} is {self._lost}")
        try:
            await self.link.send(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A failed send leaves the link in an unknown state (a partial frame?): it is lost for all.
            self._lose(f"link lost: send failed: {exc!r}")
            with contextlib.suppress(Exception):
                await self.link.close()
            raise ChannelBroken(f"mux send to {self.peer!r} failed: {exc!r}") from exc

    def _send_sync(self, frame: bytes) -> None:
        if self._lost is not None:
            raise ChannelBroken(f"mux link to {self.peer!r} is {self._lost}")
        if self._send_now is None:
            raise LocalError("this link has no send_nowait")
        try:
            self._send_now(frame)
        except Exception as exc:
            self._send_failed(exc)

    def _send_failed(self, exc: Exception) -> NoReturn:
        """A synchronous send failed: the link is in an unknown state (a partial frame?), lost for all."""
        self._lose(f"link lost: send failed: {exc!r}")
        self._spawn(self._close_link())
        raise ChannelBroken(f"mux send to {self.peer!r} failed: {exc!r}") from exc

    async def _close_link(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.link.close()

    async def _send_quietly(self, frame: bytes) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._send(frame)

    async def _ended(self, channel: MuxChannel, *, send_close: bool) -> None:
        if self._send_now is not None:
            # A link that writes synchronously: no timeout to arm, no drain to await at every session end.
            self._ended_now(channel, send_close=send_close)
            return
        if self._sessions.get(channel._key) is channel:
            del self._sessions[channel._key]
        if send_close and self._lost is None:
            await self._send_quietly(wire.encode(wire.MuxFrame(FrameKind.CLOSE, channel.sid, channel.local)))

    def _ended_now(self, channel: MuxChannel, *, send_close: bool) -> None:
        if self._sessions.get(channel._key) is channel:
            del self._sessions[channel._key]
        if send_close and self._lost is None:
            link = self._batch_link
            if link is not None and link.batching:  # type: ignore[attr-defined]  # (a batching link: see __init__)
                self._held[channel._key] = (channel.sid, channel.local)  # sent by _flush_held, or not at all
                return
            try:  # not contextlib.suppress: every session ends here
                self._send_sync(wire.encode_close(channel.sid, channel.local))
            except ChannelBroken:
                pass  # the link is lost: every session on it is broken already

    def _flush_held(self) -> None:
        """End of a batching link's read: the CLOSEs held in it go out (joining the read's one write)."""
        held = self._held
        if not held:
            return
        self._held = {}
        for sid, local in held.values():
            if self._lost is not None:
                return
            try:
                self._send_sync(wire.encode_close(sid, local))
            except ChannelBroken:
                return  # the link is lost: every session on it is broken already

    def _note(self, kind: str, msg: str, *args: object) -> None:
        if self._drop_note is not None:
            self._drop_note(kind, msg, *args)
        else:
            log.debug(msg, *args)
