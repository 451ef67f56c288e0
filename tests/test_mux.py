"""natpool.mux: many sessions over one ordered message link (framing, sessions, loss, cap, CLOSE, bad input).

Links here are in-memory channel pairs (natpool.signalling.memory_channel_pair):
ordered and reliable like the control connection an application would hand
over. Nothing sleeps: interleavings are forced with events and ``sleep(0)``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natpool.aio.pool import AsyncPairPool
from natpool.config import PairConfig
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import ChannelBroken, DropReason, LocalError, RemoteProtocolError, SessionLimit
from natpool.mux import Mux, MuxChannel
from natpool.signalling import MemoryChannel, memory_channel_pair
from natpool.wire import mux as wire
from natpool.wire.mux import FrameKind, MuxFrame
from tests.support.aio import bound_socket
from tests.support.aio import run as _run


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, 15.0)


# --- framing ---------------------------------------------------------------------------------

frames = st.builds(
    lambda kind, sid, opener, payload: MuxFrame(kind, sid, opener or kind is FrameKind.OPEN,
                                                b"" if kind is FrameKind.CLOSE else payload),
    st.sampled_from(list(FrameKind)), st.integers(1, wire.SID_MAX), st.booleans(), st.binary(min_size=1, max_size=64))


@given(frames)
def test_every_valid_frame_round_trips(frame: MuxFrame) -> None:
    assert wire.decode(wire.encode(frame), 64) == frame


@given(st.binary(max_size=80))
def test_arbitrary_bytes_decode_to_a_frame_or_a_counted_reason_never_another_error(data: bytes) -> None:
    try:
        frame = wire.decode(data, 64)
    except RemoteProtocolError as exc:
        assert exc.reason in (DropReason.MALFORMED, DropReason.OVERSIZED)
        return
    assert wire.encode(frame) == data  # what decodes is exactly what encodes (no lenient parsing)


@given(frames, st.integers(0, 8), st.binary(min_size=1, max_size=1))
def test_any_single_byte_corruption_or_truncation_is_refused_or_still_exact(frame: MuxFrame, pos: int,
                                                                           byte: bytes) -> None:
    data = bytearray(wire.encode(frame))
    for mutated in (bytes(data[:pos]), bytes(data[:pos % len(data)] + byte + data[pos % len(data) + 1:])):
        try:
            again = wire.decode(mutated, 64)
        except RemoteProtocolError:
            continue
        assert wire.encode(again) == mutated


@given(st.one_of(frames.map(wire.encode), st.binary(max_size=80)))
def test_the_fast_data_decoder_agrees_with_decode(data: bytes) -> None:
    fast = wire.decode_data(data, 64)
    try:
        frame = wire.decode(data, 64)
    except RemoteProtocolError:
        assert fast is None  # what decode refuses, the fast path never accepts
        return
    if frame.kind is FrameKind.DATA:
        assert fast == (frame.sid, int(frame.opener), frame.payload)
    else:
        assert fast is None


@given(st.one_of(frames.map(wire.encode), st.binary(max_size=80)))
def test_decode_fields_is_decode_without_the_frame_object(data: bytes) -> None:
    try:
        frame = wire.decode(data, 64)
    except RemoteProtocolError as exc:
        with pytest.raises(RemoteProtocolError) as again:
            wire.decode_fields(data, 64)
        assert again.value.reason is exc.reason
        return
    assert wire.decode_fields(data, 64) == (frame.kind, frame.sid, frame.opener, frame.payload)


@given(st.integers(1, wire.SID_MAX), st.booleans())
def test_the_fast_close_encoder_agrees_with_encode(sid: int, opener: bool) -> None:
    assert wire.encode_close(sid, opener) == wire.encode(MuxFrame(FrameKind.CLOSE, sid, opener))


def test_decode_limits() -> None:
    ok = wire.encode(MuxFrame(FrameKind.DATA, 7, True, b"x" * 64))
    assert wire.decode(ok, 64).payload == b"x" * 64
    with pytest.raises(RemoteProtocolError) as info:
        wire.decode(ok + b"y", 64)
    assert info.value.reason is DropReason.OVERSIZED
    bad = {
        "short": b"\xa9\x00\x00",
        "magic": b"\xb9\x00\x00\x00\x01",
        "kind": b"\xac\x00\x00\x00\x01",
        "zero id": b"\xa9\x00\x00\x00\x00",
        "open by the non-opener": b"\xa1\x00\x00\x00\x01",
        "close with payload": b"\xab\x00\x00\x00\x01x",
        "data without payload": b"\xaa\x00\x00\x00\x01",
    }
    for name, data in bad.items():
        with pytest.raises(RemoteProtocolError) as info:
            wire.decode(data, 64)
        assert info.value.reason is DropReason.MALFORMED, name
    with pytest.raises(ValueError):
        wire.encode(MuxFrame(FrameKind.OPEN, 1, False))
    assert wire.decode(b"\xa9\x00\x00\x00\x01LOCK") == MuxFrame(FrameKind.OPEN, 1, True, b"LOCK")  # first message


# --- sessions over one memory link ---------------------------------------------------------------

Handler = Callable[[MuxChannel], Awaitable[object] | None]


async def echo(ch: MuxChannel) -> None:
    try:
        while True:
            await ch.send(b"echo:" + await ch.recv())
    except ChannelBroken:
        pass


def linked(on_session: Handler | None = echo, **kw: Any) -> tuple[Mux, Mux, MemoryChannel, MemoryChannel]:
    """alice's mux (opens sessions) and bob's (serves them with ``on_session``) on one memory link."""
    la, lb = memory_channel_pair()
    alice = Mux(la, peer="bob", **kw).start()
    bob = Mux(lb, peer="alice", on_session=on_session, **kw).start()
    return alice, bob, la, lb


def test_many_concurrent_sessions_share_one_link_and_stay_apart() -> None:
    async def main() -> None:
        alice, bob, la, _lb = linked()

        async def session(i: int) -> list[bytes]:
            ch = await alice.open("bob")
            got = []
            for r in range(3):
                await ch.send(f"{i}/{r}".encode())
                await asyncio.sleep(0)  # interleave the sessions on the link
                got.append(await ch.recv())
            await ch.close()
            return got

        results = await asyncio.gather(*(session(i) for i in range(50)))
        assert results == [[f"echo:{i}/{r}".encode() for r in range(3)] for i in range(50)]
        assert alice.opened == 50 and bob.accepted == 50
        assert len([m for m in la.sent if m[0] & 0x07 == FrameKind.OPEN]) == 50  # all of it on this one link
        await alice.close()
        await bob.close()
        assert bob.drops == {} and alice.drops == {}

    run(main())


def test_sessions_opened_from_both_ends_use_separate_id_spaces() -> None:
    async def main() -> None:
        la, lb = memory_channel_pair()
        alice = Mux(la, on_session=echo).start()
        bob = Mux(lb, on_session=echo).start()
        a1, b1 = await alice.open(), await bob.open()
        assert a1.sid == b1.sid == 1  # same number, different sessions
        await a1.send(b"from alice")
        await b1.send(b"from bob")
        assert await a1.recv() == b"echo:from alice"
        assert await b1.recv() == b"echo:from bob"
        await alice.close()
        await bob.close()

    run(main())


def test_losing_the_link_fails_every_session_at_once_and_no_new_one_opens() -> None:
    async def main() -> None:
        served: list[MuxChannel] = []
        all_in = asyncio.Event()

        def hold(ch: MuxChannel) -> None:
            served.append(ch)
            if len(served) == 5:
                all_in.set()

        alice, bob, la, _lb = linked(on_session=hold)
        chans = [await alice.open() for _ in range(5)]
        for ch in chans:
            await ch.send(b"hello")
        await all_in.wait()
        await served[0].send(b"queued")  # alice's mux queues it on chans[0], which nobody reads yet
        await served[1].send(b"marker")
        assert await chans[1].recv() == b"marker"  # ordered link: "queued" was dispatched before this
        pending = [asyncio.ensure_future(ch.recv()) for ch in chans[2:]]
        await asyncio.sleep(0)
        await la.close()  # the link breaks under both ends
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert len(results) == 3 and all(isinstance(r, ChannelBroken) for r in results), results
        with pytest.raises(ChannelBroken):
            await chans[0].recv()  # at once: the queued message is not delivered after the loss
        with pytest.raises(ChannelBroken):
            await chans[0].send(b"x")
        await bob.wait_closed()
        for ch in served:
            with pytest.raises(ChannelBroken):
                await ch.recv()
        assert not alice.alive and not bob.alive and alice.sessions == bob.sessions == 0
        with pytest.raises(ChannelBroken):
            await alice.open()
        await alice.close()
        await bob.close()

    run(main())


def test_the_session_cap_refuses_local_and_remote_opens_and_counts_them() -> None:
    async def main() -> None:
        la, lb = memory_channel_pair()
        alice = Mux(la, max_sessions=3).start()
        bob = Mux(lb, on_session=echo, max_sessions=2).start()
        c1, c2 = await alice.open(), await alice.open()
        await c2.send(b"open")
        assert await c2.recv() == b"echo:open"
        await c1.send(b"open")
        assert await c1.recv() == b"echo:open"
        c3 = await alice.open()  # alice allows 3, bob only 2: bob answers its OPEN with CLOSE
        with pytest.raises(SessionLimit):
            await alice.open()
        assert alice.refused_local == 1
        with pytest.raises(ChannelBroken):
            await c3.recv()
        assert bob.refused_remote == 1 and bob.sessions == 2
        await c1.send(b"still fine")
        assert await c1.recv() == b"echo:still fine"
        await c2.close()
        c4 = await alice.open()  # a slot is free again on both ends once the CLOSE arrived
        await c4.send(b"again")
        assert await c4.recv() == b"echo:again"
        await alice.close()
        await bob.close()
        with pytest.raises(LocalError):
            Mux(la, max_sessions=0)

    run(main())


def test_close_sends_close_and_a_close_from_the_peer_breaks_only_that_session() -> None:
    async def main() -> None:
        served: list[MuxChannel] = []
        got = asyncio.Event()

        def hold(ch: MuxChannel) -> None:
            served.append(ch)
            got.set()

        alice, bob, la, _lb = linked(on_session=hold)
        keep = await alice.open()
        await keep.send(b"hello")
        await got.wait()
        got.clear()
        ch = await alice.open()
        await ch.send(b"hello")
        await got.wait()
        assert await served[1].recv() == b"hello"  # it came in the OPEN
        far = served[1]
        await ch.send(b"one")
        await ch.send(b"two")
        await ch.close()
        await ch.close()  # idempotent
        assert wire.decode(la.sent[-1]) == MuxFrame(FrameKind.CLOSE, ch.sid, True)
        assert sum(1 for m in la.sent if m[0] & 0x07 == FrameKind.CLOSE) == 1
        # the peer still gets what was sent before the CLOSE, then ChannelBroken
        assert await far.recv() == b"one"
        assert await far.recv() == b"two"
        with pytest.raises(ChannelBroken):
            await far.recv()
        with pytest.raises(ChannelBroken):
            await far.send(b"late")
        await far.close()  # closing an end the peer already closed sends nothing
        with pytest.raises(ChannelBroken):
            await ch.recv()
        # the link and the other session are untouched
        await served[0].send(b"alive")
        assert await keep.recv() == b"alive"
        assert alice.alive and bob.alive and bob.sessions == 1
        # a frame crossing a CLOSE is expected: counted as late, not as bad input
        bob.feed(wire.encode(MuxFrame(FrameKind.DATA, ch.sid, True, b"crossed")))
        assert bob.late == 1 and bob.drops == {}
        await alice.close()
        await bob.close()

    run(main())


def test_remote_bad_input_is_dropped_counted_and_never_raised() -> None:
    async def main() -> None:
        alice, bob, la, _lb = linked()
        ch = await alice.open()
        await ch.send(b"before")
        assert await ch.recv() == b"echo:before"
        garbage = [
            b"",  # empty
            b"\x00" * 3,  # short
            b"\xff\x00\x00\x00\x01",  # bad magic
            wire.encode(MuxFrame(FrameKind.DATA, 1, True, b"x")) + b"y" * 5000,  # oversized
            wire.encode(MuxFrame(FrameKind.DATA, 99, True, b"x")),  # a session never opened
            wire.encode(MuxFrame(FrameKind.CLOSE, 42, False)),  # one of bob's that never existed
            wire.encode(MuxFrame(FrameKind.OPEN, ch.sid, True)),  # reuses a live id
        ]
        for data in garbage:
            await la.send(data)  # raw, on alice's side of the link
        await ch.send(b"after")
        assert await ch.recv() == b"echo:after"  # in order: every bad message was handled before this one
        assert bob.drops == {DropReason.MALFORMED: 3, DropReason.OVERSIZED: 1, DropReason.UNEXPECTED: 3}
        assert bob.alive and bob.accepted == 1
        await alice.close()
        await bob.close()

    run(main())


def test_a_handler_that_raises_ends_its_session_not_the_link(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def broken(ch: MuxChannel) -> None:
            await ch.recv()
            raise RuntimeError("handler bug")

        alice, bob, _la, _lb = linked(on_session=broken)
        ch = await alice.open()
        await ch.send(b"boom")
        with pytest.raises(ChannelBroken):
            await ch.recv()
        assert bob.handler_errors == 1 and bob.alive
        await alice.close()
        await bob.close()

    run(main())
    assert "handler bug" in caplog.text


def test_read_timeout_ends_a_silent_session_with_close() -> None:
    async def main() -> None:
        ended = asyncio.Event()
        outcome: list[str] = []

        async def wait_for_nothing(ch: MuxChannel) -> None:
            try:
                await ch.recv()
            except ChannelBroken as exc:
                outcome.append(str(exc))
                ended.set()

        la, lb = memory_channel_pair()
        alice = Mux(la).start()
        bob = Mux(lb, on_session=wait_for_nothing, read_timeout=0.01).start()
        ch = await alice.open()
        pending = asyncio.ensure_future(ch.recv())  # a recv before any send announces the session
        await ended.wait()
        assert outcome == ["read timeout"]
        with pytest.raises(ChannelBroken):
            await pending  # bob's CLOSE arrived
        assert alice.alive
        await alice.close()
        await bob.close()

    run(main())


def test_closing_the_mux_cancels_the_incoming_sessions_tasks_and_breaks_its_own() -> None:
    async def main() -> None:
        started = asyncio.Event()
        cancelled: list[bool] = []

        async def forever(ch: MuxChannel) -> None:
            started.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        alice, bob, _la, _lb = linked(on_session=forever)
        ch = await alice.open()
        await ch.send(b"hello")
        await started.wait()
        await bob.close()
        assert cancelled == [True] and bob.sessions == 0
        with pytest.raises(ChannelBroken):
            await ch.recv()
        await alice.close()

    run(main())


# --- handovers over a link the application already has ------------------------------------------

CFG = PairConfig(ping_interval=0.02, no_inbound_timeout=5.0, ping_lifespan=1.0, lock_timeout=3.0)


async def add_pair(alice: AsyncPairPool, bob: AsyncPairPool, nonce: int) -> None:
    s1: socket.socket = bound_socket()
    s2: socket.socket = bound_socket()
    pair = EndpointPair(Endpoint("alice", "127.0.0.1", s1.getsockname()[1]),
                        Endpoint("bob", "127.0.0.1", s2.getsockname()[1]), nonce)
    ea = await alice.add(pair, is_pinger=True, sock=s1)
    await bob.add(pair, is_pinger=False, sock=s2)
    while ea.stats.received < 1:
        await alice.wait_changed()


def test_concurrent_takes_to_one_peer_run_over_one_link_without_glue() -> None:
    async def main() -> None:
        alice, bob = AsyncPairPool("alice", CFG), AsyncPairPool("bob", CFG)
        la, lb = memory_channel_pair()  # the application's one control connection to bob
        amux = Mux(la, peer="bob").start()
        bmux = Mux(lb, peer="alice", on_session=bob.serve_handover).start()
        alice.signalling = amux
        try:
            nonces = [0x1000 + i for i in range(6)]
            for n in nonces:
                await add_pair(alice, bob, n)
            leases = await asyncio.gather(*(alice.take(n) for n in nonces))
            theirs = [await bob.accept() for _ in nonces]
            assert sorted(lease.entry.pair.nonce for lease in leases) == nonces
            assert sorted(lease.entry.pair.nonce for lease in theirs) == nonces
            assert amux.opened == 6 and bmux.accepted == 6 and bmux.drops == {}
            assert alice.handover_outcomes == {"lease": 6} and bob.handover_outcomes == {"lease": 6}
            for lease in leases:
                alice.release(lease)
            for lease in theirs:
                bob.release(lease)
        finally:
            await amux.close()
            await bmux.close()
            await alice.close()
            await bob.close()

    run(main())


def test_an_open_carrying_the_first_message_is_served_like_open_then_data() -> None:
    async def main() -> None:
        la, lb = memory_channel_pair()  # la stays raw: it plays a peer that folds OPEN and the first message
        bob = Mux(lb, on_session=echo).start()
        await la.send(wire.encode_open(5, b"first"))
        assert wire.decode(await la.recv()) == MuxFrame(FrameKind.DATA, 5, False, b"echo:first")
        await la.send(wire.encode(MuxFrame(FrameKind.DATA, 5, True, b"second")))
        assert wire.decode(await la.recv()).payload == b"echo:second"
        assert bob.accepted == 1 and bob.drops == {}
        await bob.close()

    run(main())


# --- a link that writes synchronously (send_nowait, as TcpChannel): OPEN folding, close_nowait ----------


class SyncLink(MemoryChannel):
    """A memory link end with ``send_nowait``: what the mux sees of a TcpChannel."""

    def send_nowait(self, data: bytes) -> None:
        if self._closed or self._peer_closed:
            raise ChannelBroken("memory channel is closed")
        self.sent.append(bytes(data))
        self._outbox.put_nowait(bytes(data))


def sync_linked(on_session: Handler | None = echo) -> tuple[Mux, Mux, SyncLink, SyncLink]:
    q1: asyncio.Queue[Any] = asyncio.Queue()
    q2: asyncio.Queue[Any] = asyncio.Queue()
    la, lb = SyncLink(q1, q2), SyncLink(q2, q1)
    return Mux(la, peer="bob").start(), Mux(lb, peer="alice", on_session=on_session).start(), la, lb


def test_on_a_sync_link_the_first_message_rides_in_the_open() -> None:
    async def main() -> None:
        alice, bob, la, _lb = sync_linked()
        ch = await alice.open()
        assert la.sent == []  # nothing yet: the OPEN waits for the first message of this step
        ch.send_nowait(b"lock")
        assert la.sent == [wire.encode_open(ch.sid, b"lock")]  # one frame, not OPEN then DATA
        assert await ch.recv() == b"echo:lock"
        ch.send_nowait(b"take")  # later messages are DATA
        assert wire.decode(la.sent[-1]) == MuxFrame(FrameKind.DATA, ch.sid, True, b"take")
        assert await ch.recv() == b"echo:take"
        assert bob.accepted == 1 and bob.drops == {} and alice.drops == {}
        await alice.close()
        await bob.close()

    run(main())


def test_on_a_sync_link_a_silent_session_still_opens_in_the_next_step_or_at_close() -> None:
    async def main() -> None:
        served: list[MuxChannel] = []
        alice, bob, la, _lb = sync_linked(on_session=served.append)
        quiet = await alice.open()
        await asyncio.sleep(0)  # one loop step: the OPEN went out alone
        assert la.sent == [wire.encode_open(quiet.sid)]
        brief = await alice.open()
        await brief.close()  # closed in the step it was opened in: the peer still sees it open and end
        assert la.sent[1:] == [wire.encode_open(brief.sid),
                               wire.encode(MuxFrame(FrameKind.CLOSE, brief.sid, True))]
        await asyncio.sleep(0)
        assert la.sent[3:] == []  # and no second OPEN from the deferred one
        while len(served) < 2:
            await asyncio.sleep(0)
        with pytest.raises(ChannelBroken):
            await served[1].recv()
        assert bob.drops == {} and bob.late == 0
        await alice.close()
        await bob.close()

    run(main())


def test_close_nowait_sends_close_at_once_and_needs_a_sync_link() -> None:
    async def main() -> None:
        alice, bob, la, _lb = sync_linked()
        ch = await alice.open()
        ch.send_nowait(b"x")
        assert await ch.recv() == b"echo:x"
        ch.close_nowait()
        assert wire.decode(la.sent[-1]) == MuxFrame(FrameKind.CLOSE, ch.sid, True)
        ch.close_nowait()
        await ch.close()  # idempotent, either way
        assert sum(1 for m in la.sent if m[0] & 0x07 == FrameKind.CLOSE) == 1
        assert ch.closed and alice.sessions == 0
        await alice.close()
        await bob.close()
        plain, peer, _mla, _mlb = linked()  # a memory link: send only, no send_nowait
        async_ch = await plain.open()
        with pytest.raises(LocalError):
            async_ch.close_nowait()
        await plain.close()
        await peer.close()

    run(main())


# --- a link that batches each read's writes (as TcpChannel in push mode): held CLOSEs ----------------------


class BatchLink(SyncLink):
    """A sync link end that pushes whole reads, as TcpChannel does: writes made during a read leave together."""

    can_listen = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.writes: list[list[bytes]] = []  # one entry per write to the "socket"
        self._cork: list[bytes] | None = None
        self._push: Callable[[bytes], None] | None = None
        self._batch_end: Callable[[], None] | None = None

    @property
    def batching(self) -> bool:
        return self._cork is not None

    def listen(self, on_message: Callable[[bytes], None] | None, on_end: Callable[[str], None] | None = None,
               on_batch_end: Callable[[], None] | None = None) -> None:
        self._push, self._batch_end = on_message, on_batch_end

    def send_nowait(self, data: bytes) -> None:
        if self._cork is not None:
            self._cork.append(bytes(data))
        else:
            self.writes.append([bytes(data)])

    def read(self, *frames: bytes) -> None:
        """One read from the socket carrying ``frames``: each pushed, then the batch end, then one write."""
        assert self._push is not None
        self._cork = []
        for frame in frames:
            self._push(frame)
        if self._batch_end is not None:
            self._batch_end()
        cork, self._cork = self._cork, None
        if cork:
            self.writes.append(cork)


async def batch_mux() -> tuple[Mux, BatchLink, MuxChannel]:
    q1: asyncio.Queue[Any] = asyncio.Queue()
    q2: asyncio.Queue[Any] = asyncio.Queue()
    link = BatchLink(q1, q2)
    mux = Mux(link, peer="bob").start()
    await asyncio.sleep(0)  # the reader starts listening
    ch = await mux.open()
    ch.send_nowait(b"lock")  # OPEN + first message, one write (not in a read)
    assert link.writes == [[wire.encode_open(ch.sid, b"lock")]]
    return mux, link, ch


def test_a_close_answering_a_message_waits_for_the_read_and_is_dropped_if_the_peers_close_is_in_it() -> None:
    """The take's last read: TAKEN and the responder's CLOSE together; the initiator's own CLOSE need not go."""
    async def main() -> None:
        mux, link, ch = await batch_mux()
        ch.listen(lambda _msg: ch.close_nowait())  # the session ends on the answer, inside the read
        link.read(wire.encode_data(ch.sid, False, b"taken"), wire.encode_close(ch.sid, False))
        assert link.writes[1:] == []  # no CLOSE written: both ends closed it in crossing frames
        assert ch.closed and mux.sessions == 0 and mux.late == 1 and mux.drops == {}
        await mux.close()

    run(main())


def test_a_close_held_in_a_read_goes_out_in_that_reads_one_write_when_the_peer_did_not_close() -> None:
    async def main() -> None:
        mux, link, ch = await batch_mux()

        def answer(_msg: bytes) -> None:
            ch.send_nowait(b"taken")
            ch.close_nowait()  # a responder's last answer and its CLOSE: one write, in order

        ch.listen(answer)
        link.read(wire.encode_data(ch.sid, False, b"take"))
        assert link.writes[1:] == [[wire.encode_data(ch.sid, True, b"taken"), wire.encode_close(ch.sid, True)]]
        assert ch.closed and mux.sessions == 0 and mux.late == 0
        # Outside a read nothing is held: a CLOSE leaves at once.
        other = await mux.open()
        other.send_nowait(b"lock")
        other.close_nowait()
        assert link.writes[-1] == [wire.encode_close(other.sid, True)]
        await mux.close()

    run(main())
