"""Exception types, split the way h11 splits them.

*Local misuse* — a bad argument or an operation the caller may not do now —
raises a subclass of :class:`LocalError`. *Remote bad input* — a malformed or
unexpected datagram or signal — never raises out of the library: it is
dropped, counted under a :class:`DropReason` and logged. Inside the codecs a
:class:`RemoteProtocolError` carries the reason up to the code that counts it.
Handover failures reach the caller of ``take`` as :class:`HandoverError`.
"""

from __future__ import annotations

import enum


class NatPoolError(Exception):
    """Base of every exception natpool raises on purpose."""


# --- local misuse -----------------------------------------------------------


class LocalError(NatPoolError):
    """The caller did something the API does not allow."""


class InvalidPair(LocalError, ValueError):
    """``add`` got a pair that can never be valid (bad nonce, endpoints, identities)."""


class DuplicateNonce(LocalError, KeyError):
    """``add`` got a nonce that the pool already holds."""


class UnknownPair(LocalError, KeyError):
    """No entry with that nonce is in the pool."""


class InvalidState(LocalError):
    """The operation is not allowed in the entry's current lifecycle state."""


class PoolClosed(LocalError):
    """The pool was closed; no further operation is accepted."""


class EventBacklog(LocalError):
    """The sans-IO pool holds ``max_pending_events`` undrained events: the driver must call ``next_event``.

    Backpressure, never a silent loss: the input that would add more is refused, changing nothing.
    """


class BindFailed(LocalError, OSError):
    """``add`` could not bind the entry's local UDP endpoint (e.g. port in use); the pool is unchanged."""


class InvalidKey(LocalError, ValueError):
    """A per-pair key (``add(key=...)``) that is not ``bytes`` of 16 to 64 bytes, or a signalling secret under 16.

    Shorter keys are too weak to authenticate anything; keyed BLAKE2b takes at most 64.
    """


class InvalidSocket(LocalError, ValueError):
    """``add(sock=...)`` got a socket it cannot adopt: not a UDP/IP socket, closed, or not bound.

    A ``ValueError`` too, since that is what asyncio itself raises for a non-UDP socket.
    """


# --- remote bad input -------------------------------------------------------


class DropReason(enum.Enum):
    """Why an inbound datagram or signal was discarded (the key of drop counters)."""

    MALFORMED = "malformed"  # wrong length / bad flag byte / undecodable signal
    WRONG_NONCE = "wrong_nonce"  # well-formed frame for another pair
    FOREIGN_ADDRESS = "foreign_address"  # not from the pair's remote endpoint
    # This pair's own keepalive frame, from another (host, port) than its remote endpoint: the peer is
    # there but seen through a symmetric NAT or on a wrong port (see PairEntry.seen_from).
    ADDRESS_MISMATCH = "address_mismatch"
    UNEXPECTED = "unexpected"  # valid frame the current state does not expect (e.g. pong with none outstanding)
    SILENT_STATE = "silent_state"  # arrived while Locked/InUse/Expired: never answered
    BAD_MAC = "bad_mac"
    REPLAY = "replay"
    OVERSIZED = "oversized"
    UNEXPECTED_PEER = "unexpected_peer"  # an unverifiable identity, or a session from someone not the pair's peer
    # A connection/session cap reached, or a pong beyond the per-entry answer budget
    # (natpool.core.entry.PONG_BUDGET): a ping flood is not reflected.
    RATE_LIMITED = "rate_limited"
    # This pair's keepalive frame in the other format (legacy 9-byte frame at a keyed entry, or keyed frame
    # at a legacy one): the two ends were added one with a key and one without.
    FORMAT_MISMATCH = "format_mismatch"


class RemoteProtocolError(NatPoolError):
    """Input from the network or the signalling channel violated the protocol."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


# --- handover outcomes reported to take() callers ---------------------------


class HandoverError(NatPoolError):
    """A take/handover did not produce a lease. The entry was returned or expired per spec."""


class PairBusy(HandoverError):
    """No Idle pair was available locally, or the peer refused (its side is claimed / it won the tie-break)."""


class PeerRefused(HandoverError):
    """The peer does not know the pair or aborted the session."""


class HandoverCancelled(HandoverError):
    """The session was cancelled locally (its task was cancelled, or the pool closed); ABORT(CANCELLED) went out.

    A caller of ``take`` never sees this class: a cancelled ``take`` raises
    ``asyncio.CancelledError``, one ended by ``close()`` raises :class:`PoolClosed`.
    It is the outcome the sans-IO session records (and the key counted in
    ``handover_outcomes``), so cancellations are told apart from failures.
    """


class HandoverTimeout(HandoverError):
    """The handover did not complete within the lock timeout."""


class ChannelBroken(HandoverError):
    """The signalling channel closed or failed mid-handover."""


class SessionLimit(ChannelBroken):
    """A multiplexed link already carries its ``max_sessions`` sessions (``natpool.mux``); nothing was sent."""


class SignalProtocolError(HandoverError):
    """The peer sent a malformed, unexpected, replayed or mismatched signal; the session was ended."""
