"""The outcome of a successful handover: a pair the application now owns."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from natpool.core.entry import ExpiryReason, PairEntry
from natpool.endpoints import EndpointPair

if TYPE_CHECKING:  # annotations only: the sans-IO core never creates or touches these
    import asyncio

Role = Literal["initiator", "responder"]


@dataclass(eq=False)
class Lease:
    """A pair in ``InUse``, handed to the application by one side of a handover.

    ``role`` records which side of the handshake produced it. The asyncio
    driver fills ``sock`` / ``transport`` with the pair's still-bound UDP
    socket, so the application sends from the very port the NAT mapping is
    keyed on (no close-then-rebind gap). The sans-IO core leaves them None.
    ``transport`` is typed as the asyncio interface it implements (uvloop's
    and CPython 3.11's UDP transports do not subclass it); ``sock`` is what
    ``get_extra_info("socket")`` returns (asyncio's read-only socket wrapper).
    """

    pair: EndpointPair
    entry: PairEntry
    role: Role
    sid: bytes = b""
    sock: object | None = None
    transport: asyncio.DatagramTransport | None = None
    lock: AbstractContextManager[object] | None = field(default=None, repr=False)  # the pool's lock
    released: bool = field(default=False, init=False)

    @property
    def nonce(self) -> int:
        return self.pair.nonce

    def release(self, now: float) -> None:
        """Give the pair up for good: its entry expires (CLOSED). Idempotent.

        A used pair never goes back to Idle: its peer may still be sending
        application data on it, which must not be mistaken for keepalives.
        """
        with self.lock if self.lock is not None else nullcontext():
            if self.released:
                return
            self.released = True
            self.entry.expire(ExpiryReason.CLOSED, now)

    def __repr__(self) -> str:
        return f"Lease({self.pair!r}, role={self.role}, released={self.released})"

