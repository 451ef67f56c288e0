"""The outcome of a successful handover: a pair the application now owns.

A lease is what an application builds on, so it carries everything needed to
talk on the pair without knowing natpool's internals: the open transport and
its real socket, both addresses, and the time by which the application must
send so the NAT mapping the pool kept alive does not die under it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from natpool.core.entry import ExpiryReason, PairEntry
from natpool.endpoints import EndpointPair
from natpool.errors import InvalidState, LocalError

if TYPE_CHECKING:  # annotations only: the sans-IO core never creates or touches these
    import asyncio
    from socket import socket as Socket

Role = Literal["initiator", "responder"]


class LeaseOwner(Protocol):
    """The driver that handed a lease out (e.g. :class:`~natpool.aio.pool.AsyncPairPool`).

    :meth:`Lease.close` goes through it because only the driver has the clock
    the entry's expiry is stamped with and the socket to close.
    """

    def release(self, lease: Lease, /) -> None: ...


class LeaseBuffer(Protocol):
    """Datagrams that reached the leased socket before the application installed its protocol."""

    def drain(self) -> Iterable[tuple[bytes, Any]]: ...


@dataclass(eq=False)
class Lease:
    """A pair in ``InUse``, handed to the application by one side of a handover.

    ``role`` records which side of the handshake produced it. The asyncio
    driver attaches the pair's still-bound UDP socket and its transport, so
    the application sends from the very port the NAT mapping is keyed on (no
    close-then-rebind gap). The sans-IO core leaves them None.

    Consuming a lease from asyncio::

        async with lease:                      # closes the lease (and its socket) on exit
            lease.set_protocol(MyProtocol())   # replays what arrived since the pair went silent
            lease.transport.sendto(b"hi", lease.remote_addr)

    * :meth:`set_protocol` — from now on the transport delivers to your
      ``asyncio.DatagramProtocol``; every datagram that arrived on the socket
      since the entry went silent (``Locked``: the peer may have been handed
      over first and started talking) is replayed first, in order, with its
      address. Until then they are buffered (bounded; overflow is counted).
    * :attr:`remote_addr` — the peer's public mapping, where to send;
      :attr:`local_addr` — the bound socket's address.
    * :attr:`socket` — the real :class:`socket.socket` (for ``setsockopt``,
      ``getsockname``…). The transport owns it: never close it behind the
      transport's back; :meth:`close` the lease (or its transport) instead.
    * **Mapping lifetime.** Keepalives stopped when the pair went silent, so
      the NAT mappings on the path now live only as long as the application's
      own traffic refreshes them. :attr:`last_inbound` is the driver-clock
      time of the last inbound keepalive; :attr:`mapping_deadline` adds
      ``PairConfig.nat_mapping_timeout`` to it. **Send something before
      ``mapping_deadline``** (compare with the driver's clock,
      ``AsyncPairPool.now()`` = ``loop.time()``), and keep sending at least
      that often, or the peer's datagrams start being dropped at the NAT.
    * :meth:`close` / ``async with lease`` — done with the pair: its entry
      expires (``CLOSED``) on the driver's clock and the socket closes.
      Idempotent. In the sans-IO core (no driver attached) call
      :meth:`release` with your own clock instead.
    """

    pair: EndpointPair
    entry: PairEntry
    role: Role
    sid: bytes = b""
    transport: asyncio.DatagramTransport | None = None
    lock: AbstractContextManager[object] | None = field(default=None, repr=False)  # the pool's lock
    released: bool = field(default=False, init=False)
    #: Driver-clock time of the last inbound keepalive (``entry.last_seen`` at hand-over).
    last_inbound: float = field(default=0.0, init=False)
    _socket: Socket | None = field(default=None, init=False, repr=False)
    _local_addr: tuple[str, int] | None = field(default=None, init=False, repr=False)
    _owner: LeaseOwner | None = field(default=None, init=False, repr=False)
    _buffer: LeaseBuffer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # A silent entry takes no keepalive (they are dropped before last_seen is touched), so its
        # last_seen is the last inbound keepalive from the moment it went Locked.
        self.last_inbound = self.entry.last_seen

    # --- driver API -------------------------------------------------------------------------------

    def attach(self, transport: asyncio.DatagramTransport, sock: Socket | None, owner: LeaseOwner | None,
               buffer: LeaseBuffer | None = None) -> None:
        """Called by the driver that hands the lease out: the open transport, its socket, who closes it.

        ``buffer`` holds what arrived before the application's protocol; it is
        the transport's protocol until :meth:`set_protocol` replaces it.
        """
        self.transport = transport
        self._socket = sock
        self._owner = owner
        self._buffer = buffer
        if sock is not None:
            name = sock.getsockname()
            self._local_addr = (str(name[0]), int(name[1]))

    # --- application API --------------------------------------------------------------------------

    @property
    def nonce(self) -> int:
        return self.pair.nonce

    @property
    def remote_addr(self) -> tuple[str, int]:
        """(host, port) of the peer's public mapping: where the application sends."""
        return self.entry.remote.addr

    @property
    def local_addr(self) -> tuple[str, int]:
        """The bound socket's (host, port); without a socket (sans-IO) the pair's local endpoint.

        Behind a NAT the two differ: the bound address is private, the local
        endpoint is the public mapping the peer sends to.
        """
        if self._local_addr is not None:
            return self._local_addr
        return self.entry.local.addr

    @property
    def socket(self) -> Socket | None:
        """The real, still-bound UDP socket (None in the sans-IO core). Owned by the transport: don't close it."""
        return self._socket

    @property
    def sock(self) -> Socket | None:
        """Alias of :attr:`socket`, kept for code written against earlier versions."""
        return self._socket

    @property
    def mapping_deadline(self) -> float:
        """Estimated driver-clock time the NAT mapping dies unless the application sends before it.

        ``last_inbound + PairConfig.nat_mapping_timeout``. An estimate: the
        NAT's real timeout is unknown (Linux conntrack: 30 s for a young or
        one-way flow, 120 s once ASSURED), so the default assumes the short one.
        """
        return self.last_inbound + self.entry.config.nat_mapping_timeout

    def set_protocol(self, protocol: asyncio.DatagramProtocol) -> None:
        """Deliver the leased socket's datagrams to ``protocol`` from now on.

        Calls ``protocol.connection_made(transport)`` first, as asyncio
        would, then replays in order (with addresses) every datagram that
        arrived since the entry went silent. May be called again to switch
        protocols (nothing is replayed twice). InvalidState once closed.
        """
        transport = self.transport
        if transport is None:
            raise LocalError("this lease carries no transport (sans-IO core): there is nothing to deliver")
        if self.released or transport.is_closing():
            raise InvalidState(f"lease {self.nonce:#x} is closed")
        buffer, self._buffer = self._buffer, None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if buffer is not None:
            for data, addr in buffer.drain():
                protocol.datagram_received(data, addr)

    def close(self) -> None:
        """Done with the pair: the transport closes and the entry expires (CLOSED) via its driver. Idempotent.

        The sans-IO core has no clock to stamp the expiry with: there, call
        :meth:`release` with ``now``.
        """
        owner = self._owner
        if owner is None:
            raise LocalError("this lease has no driver (sans-IO core): call release(now) with your clock")
        owner.release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def release(self, now: float) -> None:
        """Give the pair up for good at ``now``: its entry expires (CLOSED). Idempotent. The sans-IO call.

        Closes nothing: the driver's :meth:`close` does that. A used pair
        never goes back to Idle: its peer may still be sending application
        data on it, which must not be mistaken for keepalives.
        """
        with self.lock if self.lock is not None else nullcontext():
            if self.released:
                return
            self.released = True
            self.entry.expire(ExpiryReason.CLOSED, now)

    def __repr__(self) -> str:
        return f"Lease({self.pair!r}, role={self.role}, released={self.released})"
