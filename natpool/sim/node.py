"""A simulated node: one sans-IO :class:`~natpool.core.node.Node` driven over the in-memory network.

The simulator's equivalent of the asyncio driver, and as thin: it gives each
pair entry a UDP address (the pair's local endpoint) and maps signalling
channel ends to the node's channel ids. After *every* input — a delivered
datagram or signal, a timer, a local call such as ``claim`` — it transmits
the node's outputs (datagrams into the network, recorded in the simulation's
log with the sender entry's state; signals onto their channels), acts on its
events (open/close a channel, close the socket of an entry that left) and
re-arms its one timer at ``node.get_timer()``. Tests that touch ``node.pool``
directly must call :meth:`SimNode.pump` afterwards, as a driver would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Protocol

from natpool.config import PairConfig
from natpool.core.entry import Drained, EntryOutput, ExpiryReason, PairEntry, StateChanged
from natpool.core.handover import InitiatorSession, Session
from natpool.core.lease import Lease
from natpool.core.node import CloseChannel, Node, OpenChannel, SessionStarted
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import HandoverError, PairBusy, UnknownPair
from natpool.machines.tables import ENTRY
from natpool.sim.clock import Scheduler, SimulationError, TimerHandle
from natpool.sim.network import Addr, Network
from natpool.sim.records import DeliveredDatagram, SentDatagram, frame_kind
from natpool.sim.signalling import ChannelEnd, SimSignalling

#: First UDP port a node hands out; ports are allocated sequentially so runs are reproducible.
FIRST_PORT = 40000


class World(Protocol):
    """What a node needs of the simulation that hosts it (:class:`~natpool.sim.simulation.Simulation`).

    A protocol, so this module does not import the simulation that imports
    it (no import cycle): the clock, the shared network and signalling, the
    other nodes (to find a take's peer), the logs a node appends to.
    """

    @property
    def network(self) -> Network: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def signalling(self) -> SimSignalling: ...

    @property
    def nodes(self) -> Mapping[str, SimNode]: ...

    @property
    def log(self) -> list[SentDatagram]: ...

    @property
    def deliveries(self) -> list[DeliveredDatagram]: ...

    @property
    def record_deliveries(self) -> bool: ...

    def now(self) -> float: ...

    def new_sid(self) -> bytes: ...


class SessionLink:
    """A handover session bound to its end of a signalling channel."""

    __slots__ = ("end", "session")

    def __init__(self, session: Session, end: ChannelEnd) -> None:
        self.session = session
        self.end = end

    def __repr__(self) -> str:
        return f"SessionLink({self.session.role} {self.session.nonce:#x}, {self.end!r})"


class TakeHandle:
    """The caller's view of one :meth:`SimNode.take`: poll ``done`` / ``outcome`` as the simulation runs."""

    def __init__(
        self,
        node: SimNode,
        started_at: float,
        session: InitiatorSession | None = None,
        end: ChannelEnd | None = None,
        error: HandoverError | None = None,
    ) -> None:
        self.node = node
        self.started_at = started_at
        self.session = session
        self.end = end
        self._error = error

    @property
    def done(self) -> bool:
        return self._error is not None or (self.session is not None and self.session.done)

    @property
    def outcome(self) -> Lease | HandoverError | None:
        if self._error is not None:
            return self._error
        return self.session.outcome if self.session is not None else None

    @property
    def lease(self) -> Lease | None:
        outcome = self.outcome
        return outcome if isinstance(outcome, Lease) else None

    @property
    def ended_at(self) -> float | None:
        if self._error is not None:
            return self.started_at
        return self.session.ended_at if self.session is not None else None

    @property
    def responder(self) -> Session | None:
        """The peer's session for this take, once its first signal arrived there."""
        if self.end is None:
            return None
        far = self.end.peer
        peer = self.node.sim.nodes.get(far.owner)
        if peer is None:
            return None
        return next((link.session for link in peer.links if link.end is far), None)

    def __repr__(self) -> str:
        return f"TakeHandle({self.node.identity}, done={self.done}, outcome={self.outcome!r})"


class SimNode:
    """One peer: identity, host address, a sans-IO :class:`Node` and the glue that drives it."""

    def __init__(
        self,
        sim: World,
        identity: str,
        host: str,
        config: PairConfig | None = None,
        listeners: Sequence[object] = (),
    ) -> None:
        self.sim = sim
        self.identity = identity
        self.host = host
        self.node = Node(identity, config if config is not None else PairConfig(), tuple(listeners))
        self.pool = self.node.pool  # the registry, for tests that read (or drive, then pump) it directly
        self.events: list[EntryOutput] = []  # every entry event, in order
        self.unowned = 0  # datagrams that reached a still-bound port whose entry had left the pool
        self.fail_sends = False  # when set, every send errors locally (reported via node.send_failed)
        self.send_failures = 0
        self._local: dict[int, Addr] = {}  # nonce -> local address of its entry
        self._entries: dict[int, PairEntry] = {}  # nonce -> entry, while its socket is bound
        self._next_port = FIRST_PORT
        self._timer: TimerHandle | None = None
        self._timer_at: float | None = None
        self.links: list[SessionLink] = []  # every handover session this node ran, in start order
        self._ends: dict[int, ChannelEnd] = {}  # the node's channel id -> our end, while open
        self._unreachable: set[int] = set()  # take channels to a node that does not exist

    # --- addresses -------------------------------------------------------------

    def alloc_port(self) -> int:
        """Next free local port (deterministic: sequential, skipping bound ones)."""
        net = self.sim.network
        while True:
            port = self._next_port
            self._next_port += 1
            if self._next_port > 65535:
                raise SimulationError(f"node {self.identity} ran out of ports")
            if not net.is_bound((self.host, port)):
                return port

    def endpoint(self, port: int | None = None) -> Endpoint:
        return Endpoint(self.identity, self.host, self.alloc_port() if port is None else port)

    # --- pool operations (each followed by a pump, as a driver would) ------------

    def add(self, pair: EndpointPair, is_pinger: bool, key: bytes | None = None) -> PairEntry:
        """Add ``pair`` to the pool (``key``: keyed keepalives) and bind its local endpoint on the network."""
        addr = pair.local(self.identity).addr
        if self.sim.network.is_bound(addr):
            raise SimulationError(f"{addr} is already bound on the simulated network")
        entry = self.node.add(pair, is_pinger, self.sim.now(), key=key)
        self._local[entry.nonce] = addr
        self._entries[entry.nonce] = entry
        self.sim.network.bind(addr, partial(self._on_datagram, entry.nonce))
        self.pump()
        return entry

    def remove(self, nonce: int) -> PairEntry:
        entry = self.node.remove(nonce, self.sim.now())
        self.pump()
        return entry

    def claim(self, nonce: int) -> PairEntry:
        """Local CAS claim (Idle -> InLocking), without any handover."""
        entry = self.node.claim(nonce, self.sim.now())
        self.pump()
        return entry

    def claim_any(self, peer: str) -> PairEntry:
        entry = self.node.claim_any(peer, self.sim.now())
        self.pump()
        return entry

    # --- handover -----------------------------------------------------------------

    def take(self, nonce: int | None = None, peer: str | None = None) -> TakeHandle:
        """Start a handover as initiator (by ``nonce``, or any Idle pair with ``peer``).

        A lost local claim ends at once (``outcome`` is :class:`PairBusy`,
        nothing sent); otherwise the node asks for a signalling channel to the
        pair's remote node (:class:`OpenChannel`), whose :class:`SimNode`
        answers as responder. Local misuse (UnknownPair...) raises.
        """
        sim = self.sim
        now = sim.now()
        try:
            channel = self.node.start_take(nonce, peer, now=now, sid=sim.new_sid())
        except PairBusy as exc:
            return TakeHandle(self, now, error=exc)
        session = self.node.session(channel)
        assert isinstance(session, InitiatorSession) and session.entry is not None
        self.pump()
        if channel in self._unreachable:
            self._unreachable.discard(channel)
            self.node.cancel(channel, now)
            self.pump()
            raise SimulationError(f"pair {session.nonce:#x}: no node {session.entry.remote.identity!r} to signal")
        end = next(link.end for link in reversed(self.links) if link.session is session)
        return TakeHandle(self, now, session, end)

    def cancel(self, handle: TakeHandle) -> None:
        """The application gives up on a take (``Node.cancel``): ABORT(CANCELLED) where the handshake allows.

        A no-op once the take's session has ended (its channel is closed then).
        """
        channel = next((ch for ch, end in self._ends.items() if end is handle.end), None)
        if channel is not None:
            self.node.cancel(channel, self.sim.now())
            self.pump()

    def release(self, lease: Lease) -> None:
        """The application is done with ``lease``: its entry expires (CLOSED) and the socket closes."""
        lease.release(self.sim.now())
        self.pump()

    def leases(self) -> list[Lease]:
        """Every lease a session of this node produced (either role)."""
        return [link.session.outcome for link in self.links if isinstance(link.session.outcome, Lease)]

    def serve(self, end: ChannelEnd, *, anonymous: bool = False) -> None:
        """Answer, as responder, the session whose first signal arrives on ``end``.

        ``take`` does this for the far end of the channel it opens; a test
        that opens a channel itself (a forged or garbage first message, a
        peer that vanishes after LOCK) hands its far end to the node here.

        ``anonymous``: the channel's transport cannot name its peer
        (``SignalChannel.peer_identity`` None), so the node gets no peer
        identity for it and the responder checks none — the documented
        legacy behaviour. By default the node learns who opened the channel.
        """
        end.on_receive = partial(self._accept, end, anonymous=anonymous)

    def _open(self, channel: int, peer: str) -> None:
        """The node asked for a channel to ``peer`` (a take): open one; the far end accepts on its first signal."""
        remote = self.sim.nodes.get(peer)
        if remote is None:
            self._unreachable.add(channel)
            return
        end, far = self.sim.signalling.open(self, remote)
        remote.serve(far)
        self._bind_end(channel, end)

    def _bind_end(self, channel: int, end: ChannelEnd) -> None:
        self._ends[channel] = end
        end.on_receive = partial(self._on_signal, channel)
        end.on_closed = partial(self._on_channel_closed, channel)

    def _accept(self, end: ChannelEnd, data: bytes, anonymous: bool = False) -> None:
        """First signal on an incoming channel: give it a channel id; the node opens a responder session."""
        # The simulated channel knows its true sender: the node that opened it (unless ``serve`` hid it).
        channel = self.node.new_channel_id(None if anonymous else end.peer.owner)
        self._bind_end(channel, end)
        self.node.receive_signal(channel, data, self.sim.now())
        self.pump()

    def _on_signal(self, channel: int, data: bytes) -> None:
        self.node.receive_signal(channel, data, self.sim.now())
        self.pump()

    def _on_channel_closed(self, channel: int) -> None:
        self._ends.pop(channel, None)
        self.node.channel_closed(channel, self.sim.now())
        self.pump()

    def entry(self, nonce: int) -> PairEntry:
        return self.pool.get(nonce)

    def state(self, nonce: int) -> str | None:
        """The entry's lifecycle state, or None once it has left the pool."""
        try:
            return self.pool.get(nonce).state
        except UnknownPair:
            return None

    def transitions(self, event: str | None = None) -> list[StateChanged]:
        """Every lifecycle transition of this node's entries so far (only ``event`` ones if given)."""
        return [e for e in self.events if isinstance(e, StateChanged) and (event is None or e.event == event)]

    def expiries(self) -> dict[int, ExpiryReason | None]:
        """nonce -> reason, for every entry of this node that expired so far."""
        return {e.nonce: e.reason for e in self.transitions("expire")}

    # --- driving -------------------------------------------------------------------

    def _on_datagram(self, nonce: int, data: bytes, src: Addr, dst: Addr) -> None:
        sim = self.sim
        now = sim.now()
        entry = self._entries.get(nonce)
        if sim.record_deliveries:
            state = entry.state if entry is not None and nonce in self.pool else None
            sim.deliveries.append(DeliveredDatagram(now, self.identity, nonce, frame_kind(data), state, src, dst))
        if nonce not in self.pool:  # left the pool without us seeing its expiry yet: the socket is gone
            self.unowned += 1
            self._release(nonce)
            return
        # Application data on a silent entry (returned by the node) has no application here: it is dropped.
        self.node.receive_datagram(nonce, data, src, now)
        self.pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.node.handle_timer(self.sim.now())
        self.pump()

    def pump(self) -> None:
        """Transmit the node's outputs, act on its events, re-arm the one timer."""
        sim = self.sim
        now = sim.now()
        node = self.node
        out = node.datagrams_to_send(now)
        if out:
            net = sim.network
            log = sim.log
            ident = self.identity
            for nonce, data, dst in out:
                if self.fail_sends:  # e.g. no route / ENOBUFS: nothing reaches the wire
                    if nonce in node:  # a failure may have expired it: a driver stops sending then
                        self.send_failures += 1
                        node.send_failed(nonce, now)
                    continue
                src = self._local[nonce]
                state = self._entries[nonce].state  # single-threaded here: no need for the pool lock
                dg_id = net.send(src, dst, data)
                log.append(SentDatagram(now, ident, nonce, frame_kind(data), state, src, dst, dg_id))
        closing: list[int] = []
        ev = node.next_event()
        while ev is not None:
            if isinstance(ev, StateChanged):
                self.events.append(ev)
                if ev.target in ENTRY.final:
                    self._release(ev.nonce)
            elif isinstance(ev, Drained):
                self.events.append(ev)
            elif isinstance(ev, OpenChannel):
                self._open(ev.channel, ev.peer)
            elif isinstance(ev, SessionStarted):
                end = self._ends.get(ev.channel)
                if end is not None:  # else a take to a node that does not exist (``take`` raises)
                    self.links.append(SessionLink(ev.session, end))
            elif isinstance(ev, CloseChannel):
                closing.append(ev.channel)
            ev = node.next_event()
        for channel, data in node.signals_to_send():
            end = self._ends.get(channel)
            if end is not None:
                end.send(data)
        for channel in closing:  # after the round's signals: they still arrive first (graceful close)
            end = self._ends.pop(channel, None)
            if end is not None:
                end.close()
        self._rearm()

    def _release(self, nonce: int) -> None:
        """The entry left the pool: close its simulated socket."""
        self._entries.pop(nonce, None)
        addr = self._local.pop(nonce, None)
        if addr is not None:
            self.sim.network.unbind(addr)

    def _rearm(self) -> None:
        t = self.node.get_timer()
        if t == self._timer_at and (t is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = t
        self._timer = None if t is None else self.sim.scheduler.call_at(t, self._on_timer)

    def __repr__(self) -> str:
        return f"SimNode({self.identity}@{self.host}, {len(self._local)} bound)"
