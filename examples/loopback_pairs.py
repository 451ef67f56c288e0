"""Stand-in for a hole punch, shared by the examples: n UDP pairs between two pools on loopback.

natpool does not punch holes: the application hands it pairs it already
traversed, with the socket the punch used. On loopback a "punched" pair is
just two bound sockets that know each other's address.
"""

from __future__ import annotations

import socket

from natpool import AsyncPairPool, Endpoint, EndpointPair


def bound_udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


async def add_pairs(pinger: AsyncPairPool, ponger: AsyncPairPool, n: int, first_nonce: int = 1) -> list[EndpointPair]:
    """Add n shared pairs (same nonce on both sides); ``pinger`` sends the keepalives."""
    pairs = []
    for nonce in range(first_nonce, first_nonce + n):
        sa, sb = bound_udp(), bound_udp()
        a = Endpoint(pinger.local_identity, *sa.getsockname())
        b = Endpoint(ponger.local_identity, *sb.getsockname())
        pair = EndpointPair(a, b, nonce=nonce)
        await pinger.add(pair, is_pinger=True, sock=sa)
        await ponger.add(pair, is_pinger=False, sock=sb)
        pairs.append(pair)
    return pairs
