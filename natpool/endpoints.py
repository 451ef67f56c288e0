"""Value types naming the two ends of a NAT-traversed UDP path."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from natpool.errors import InvalidPair

NONCE_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One peer's public UDP endpoint. ``identity`` names the peer (a node id)."""

    identity: str
    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def validate(self) -> None:
        """Raise :class:`InvalidPair` unless this endpoint could ever be bound or reached."""
        if not self.identity or not isinstance(self.identity, str):
            raise InvalidPair("endpoint identity must be a non-empty string")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise InvalidPair(f"endpoint host {self.host!r} is not an IP address literal") from None
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InvalidPair(f"endpoint port must be an int, got {type(self.port).__name__}")
        if not 0 < self.port < 65536:
            raise InvalidPair(f"endpoint port {self.port} is outside 1..65535")

    def __repr__(self) -> str:
        return f"{self.identity}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EndpointPair:
    """Peer A, peer B and the pair's 64-bit non-zero nonce, as the hole punch produced them."""

    a: Endpoint
    b: Endpoint
    nonce: int

    def validate(self) -> None:
        if isinstance(self.nonce, bool) or not isinstance(self.nonce, int):
            raise InvalidPair(f"nonce must be an int, got {type(self.nonce).__name__}")
        if not 0 < self.nonce <= NONCE_MAX:
            raise InvalidPair(f"nonce {self.nonce} is outside 1..2**64-1 (zero is reserved)")
        self.a.validate()
        self.b.validate()
        if self.a.identity == self.b.identity:
            raise InvalidPair(f"both sides of pair {self.nonce:#x} have identity {self.a.identity!r}")

    def local(self, identity: str) -> Endpoint:
        """The side owned by ``identity``; raises :class:`InvalidPair` if it owns neither."""
        if self.a.identity == identity:
            return self.a
        if self.b.identity == identity:
            return self.b
        raise InvalidPair(f"pair {self.nonce:#x} does not involve local identity {identity!r}")

    def remote(self, identity: str) -> Endpoint:
        return self.b if self.local(identity) is self.a else self.a

    def __repr__(self) -> str:
        return f"Pair({self.nonce:#x}: {self.a!r} <-> {self.b!r})"
