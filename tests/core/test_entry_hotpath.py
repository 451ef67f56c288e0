"""The entry's hot-path frame handling agrees with the codec (``natpool.wire.frame``) on every input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from natpool.config import PairConfig
from natpool.core.entry import PairEntry
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import DropReason, RemoteProtocolError
from natpool.wire.frame import Frame, Kind, decode, encode

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
NONCE = 0x0102030405060708
PAIR = EndpointPair(ALICE, BOB, NONCE)
CFG = PairConfig(lock_timeout=PairConfig().no_inbound_timeout - PairConfig().ping_interval)

FRAMES = st.one_of(
    st.binary(max_size=12),
    st.tuples(st.sampled_from([0, 1, NONCE, NONCE + 1, NONCE ^ (1 << 63)]), st.integers(0, 255)).map(
        lambda t: t[0].to_bytes(8, "big") + bytes([t[1]])
    ),
)


def expected(entry: PairEntry, data: bytes) -> DropReason | Kind:
    """What the codec says the entry must do with ``data`` (from its peer's address)."""
    try:
        frame = decode(data)
    except RemoteProtocolError as exc:
        return exc.reason
    if frame.nonce != NONCE:
        return DropReason.WRONG_NONCE
    if (frame.kind is Kind.PING) == entry.is_pinger:  # only the ponger answers pings; only the pinger expects pongs
        return DropReason.UNEXPECTED
    return frame.kind


@given(st.booleans(), FRAMES)
def test_receive_matches_the_codec(is_pinger: bool, data: bytes) -> None:
    entry = PairEntry(PAIR, "alice" if is_pinger else "bob", is_pinger, CFG, 0.0)
    entry.datagrams_to_send(0.0)  # the pinger's first ping is outstanding
    want = expected(entry, data)
    entry.receive_datagram(data, entry.remote.addr, 0.5)
    if isinstance(want, DropReason):
        assert entry.stats.drops == {want: 1} and entry.stats.received == 0
    else:
        assert not entry.stats.drops and entry.stats.received == 1
        if want is Kind.PING:
            assert entry.datagrams_to_send(0.5) == [(encode(Frame(NONCE, Kind.PONG)), entry.remote.addr)]
        else:
            assert entry.outstanding == 0 and entry.srtt == 0.5


def test_frames_sent_are_the_codecs() -> None:
    pinger = PairEntry(PAIR, "alice", True, CFG, 0.0)
    assert pinger.datagrams_to_send(0.0) == [(encode(Frame(NONCE, Kind.PING)), BOB.addr)]
    ponger = PairEntry(PAIR, "bob", False, CFG, 0.0)
    for _ in range(3):
        ponger.receive_datagram(encode(Frame(NONCE, Kind.PING)), ALICE.addr, 0.1)
    assert ponger.datagrams_to_send(0.1) == [(encode(Frame(NONCE, Kind.PONG)), ALICE.addr)] * 3
