"""The signalling interface that the user's own signalling layer implements.

natpool does not ship a signalling service: the application already has one
(a relay, a WebSocket, a TCP control connection). It only needs an ordered,
reliable, bidirectional byte-message channel per handover session, which is
what :class:`SignalChannel` describes. :func:`memory_channel_pair` is an
in-memory implementation for tests and documentation.

Wiring, for a relay that can already reach a peer by identity::

    class RelaySignalling:                       # implements Signalling
        async def open(self, peer_identity: str) -> SignalChannel:
            return await my_relay.connect(peer_identity)   # any SignalChannel

    pool = AsyncPairPool("alice", signalling=RelaySignalling())
    lease = await pool.take_any("bob")           # initiator side

    # On the peer, for every incoming handover connection (responder side):
    async def on_incoming(channel: SignalChannel) -> None:
        await bob_pool.serve_handover(channel)   # the lease arrives via bob_pool.accept()

Requirements on a channel: messages arrive whole and in order (one
``send`` = one ``recv``); each handover opens its own channel, and the
session closes it when it ends. Signals are at most 64 bytes
(:data:`natpool.wire.signal.MAX_SIGNAL_SIZE`), so a relay may cap frames small.

An application with one control connection per peer (not one per session)
wraps it in :class:`natpool.mux.Mux`, which is a :class:`Signalling` whose
channels are sessions multiplexed on that connection; the reference
:class:`natpool.aio.tcp.TcpSignalling` does the same over one TCP connection
per peer.

Who is on the other end: every channel carries ``peer_identity``, the
identity of the node at the far end *as the transport verified it*, or None
when it verified nothing. The responder trusts it to bind a session to the
pair's remote identity (issue 10: a third party must not lock or take a
pair), so a transport that sets it must guarantee:

* the value was authenticated by the transport itself (a challenge–response
  over a secret only that peer holds, a certificate, an authenticated relay
  that vouches for the sender) — never copied from a claim the peer made
  (a hello, a header, a URL path);
* it holds for every message the channel delivers: it is fixed when the
  channel is made and the channel cannot be re-bound to another peer;
* when in doubt, None. None is always safe: the channel then counts as
  unauthenticated, and what the responder allows on it is the legacy
  (astrald) behaviour.

A channel object written before this attribute existed (no such attribute
at all) is treated as None at run time.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from natpool.errors import ChannelBroken


@runtime_checkable
class SignalChannel(Protocol):
    """One handover session's message channel (ordered, reliable, message-framed).

    ``recv`` raises :class:`ChannelBroken` once the channel is closed by either
    side or fails; ``close`` is idempotent and wakes a pending ``recv``.
    ``peer_identity`` is the far end's identity as the transport verified it,
    or None (see the module docstring for what setting it promises).
    """

    peer_identity: str | None

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


@runtime_checkable
class Signalling(Protocol):
    """Opens a fresh channel to a peer, one per ``take`` (a session never reuses a channel)."""

    async def open(self, peer_identity: str) -> SignalChannel: ...


class _Closed:
    """Queue sentinel: the sending side closed."""


_CLOSED = _Closed()


class MemoryChannel:
    """One end of an in-memory channel pair on asyncio queues.

    Closing either end breaks both: the peer's pending and future ``recv``
    raise :class:`ChannelBroken` after the messages already queued, which is
    how a TCP connection that delivered everything then hit EOF behaves.
    """

    def __init__(self, inbox: asyncio.Queue[bytes | _Closed], outbox: asyncio.Queue[bytes | _Closed]) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self._peer_closed = False
        # In-process: whoever wires the pair knows both ends for certain (MemorySignalling sets it).
        self.peer_identity: str | None = None
        self.sent: list[bytes] = []  # every message this end sent, for tests and traces

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        if self._closed or self._peer_closed:
            raise ChannelBroken("memory channel is closed")
        self.sent.append(bytes(data))
        self._outbox.put_nowait(bytes(data))

    async def recv(self) -> bytes:
        if self._closed or self._peer_closed:
            raise ChannelBroken("memory channel is closed")
        item = await self._inbox.get()
        if isinstance(item, _Closed):
            self._peer_closed = True
            # Re-post so that concurrent receivers on this end also wake.
            self._inbox.put_nowait(item)
            raise ChannelBroken("peer closed the memory channel")
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.put_nowait(_CLOSED)
        self._inbox.put_nowait(_CLOSED)  # wake our own pending recv


def memory_channel_pair() -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends; create them inside the running loop's context (queues bind lazily)."""
    a_to_b: asyncio.Queue[bytes | _Closed] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes | _Closed] = asyncio.Queue()
    return MemoryChannel(b_to_a, a_to_b), MemoryChannel(a_to_b, b_to_a)


class MemorySignalling:
    """A :class:`Signalling` whose ``open`` hands the far end of a fresh pair to ``on_incoming``.

    ``on_incoming`` is the remote node's responder entry point (for example a
    callback that spawns ``bob.serve_handover(channel)``); the tests wire two
    :class:`~natpool.aio.pool.AsyncPairPool` s with it.
    With ``local_identity`` both ends carry a ``peer_identity`` (the far end
    gets ``local_identity``, this end the identity it opened to): an
    in-process pair cannot be spoofed, so it counts as authenticated.
    """

    def __init__(self, on_incoming: _IncomingHandler, local_identity: str | None = None) -> None:
        self._on_incoming = on_incoming
        self.local_identity = local_identity

    async def open(self, peer_identity: str) -> SignalChannel:
        mine, theirs = memory_channel_pair()
        if self.local_identity is not None:
            mine.peer_identity, theirs.peer_identity = peer_identity, self.local_identity
        self._on_incoming(peer_identity, theirs)
        return mine


class _IncomingHandler(Protocol):
    def __call__(self, peer_identity: str, channel: MemoryChannel, /) -> None: ...
