"""An attacker on the simulated network against keepalives, with and without per-pair keys (issue 10 item 7).

The adversary sees every datagram the pools send (so it knows the nonce and
holds every real frame), and after one end of a pair is gone it injects, from
that end's exact address, a steady stream of forgeries: legacy frames, keyed
frames with a made-up MAC, frames sealed under another key, every frame it
recorded (replays), and recorded frames with the ping id moved forward.

With keys the survivor expires within ``no_inbound_timeout`` of the last real
frame, as with no traffic at all. Without keys (the astrald frame) the same
attack keeps the dead pair alive indefinitely, and a forged pong ends a
drain before the real pong arrived: the legacy weakness the README states.
All on the virtual clock.
"""

from __future__ import annotations

import pytest

from natpool.config import PairConfig
from natpool.core.entry import TIMER_SLACK, ExpiryReason, PairEntry
from natpool.errors import DropReason
from natpool.sim import NetConfig, SimNode, Simulation
from natpool.wire.frame import Frame, Kind, encode
from natpool.wire.keepalive import KeepaliveKey

KEY = bytes(range(100, 132))
CFG = PairConfig()
Addr = tuple[str, int]


class Adversary:
    """Records every datagram the pools send; injects forgeries and replays on a virtual-time schedule."""

    def __init__(self, sim: Simulation, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sim = sim
        self.seen: list[tuple[Addr, Addr, bytes]] = []
        self.injected = 0
        self._made: list[bytes] | None = None
        send = sim.network.send

        def tap(src: Addr, dst: Addr, data: bytes) -> int:
            self.seen.append((src, dst, data))
            return send(src, dst, data)

        monkeypatch.setattr(sim.network, "send", tap)

    def forgeries(self, nonce: int, src: Addr, dst: Addr) -> list[bytes]:
        """Everything the attacker can make without the key for frames ``src`` -> ``dst`` of pair ``nonce``."""
        recorded = [d for s, t, d in self.seen if s == src and t == dst]
        recorded += [d for s, t, d in self.seen if s == dst and t == src]  # reflect the victim's own frames too
        if self._made is None:
            wrong = KeepaliveKey(b"not the key at all")
            self._made = [encode(Frame(nonce, Kind.PING)), encode(Frame(nonce, Kind.PONG))]
            self._made += [wrong.seal(k, nonce, i) for k in Kind for i in (1, 10**6)]
            self._made += [bytes([1, k]) + nonce.to_bytes(8, "big") + (i).to_bytes(8, "big") + bytes(16)
                           for k in (0, 1) for i in (1, 2**40)]
        out = self._made + recorded[-20:]  # made up, then replays
        out += [d[:10] + (int.from_bytes(d[10:18], "big") + 1).to_bytes(8, "big") + d[18:]
                for d in recorded[-5:] if len(d) == 34]  # a newer id pasted into a real frame
        return out

    def attack(self, nonce: int, src: Addr, dst: Addr, until: float, every: float = 0.25) -> None:
        """From now to ``until``: every ``every`` s inject all forgeries from ``src`` to ``dst``."""
        sim = self.sim

        def burst() -> None:
            for data in self.forgeries(nonce, src, dst):
                sim.inject(src, dst, data)
                self.injected += 1
            if sim.now() + every <= until:
                sim.scheduler.call_later(every, burst)

        sim.scheduler.call_later(0.0, burst)


def setup(monkeypatch: pytest.MonkeyPatch, key: bytes | None) -> tuple[Simulation, Adversary, SimNode, SimNode, int]:
    sim = Simulation(3, NetConfig(delay_min=0.01, delay_max=0.03))
    adv = Adversary(sim, monkeypatch)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    pair = sim.punch(a, b, pinger=a, key=key)
    sim.run_until(5.0)  # honest traffic: the adversary records it
    return sim, adv, a, b, pair.nonce


def last_real_inbound(sim: Simulation, node: SimNode, nonce: int) -> float:
    peer = next(n for n in sim.nodes.values() if n is not node).identity
    return max(d.time for d in sim.log if d.sender == peer and d.nonce == nonce) + 0.03  # + the max delay


@pytest.mark.parametrize("dead", ["alice", "bob"], ids=["pinger-dies", "ponger-dies"])
def test_with_keys_a_pair_whose_peer_is_gone_expires_on_time_under_forged_traffic(
        monkeypatch: pytest.MonkeyPatch, dead: str) -> None:
    sim, adv, a, b, nonce = setup(monkeypatch, KEY)
    gone, survivor = (a, b) if dead == "alice" else (b, a)
    entry: PairEntry = survivor.entry(nonce)
    peer_addr = entry.remote.addr
    gone.remove(nonce)  # the peer dies: its port is free, the attacker speaks from it
    died = sim.now()
    adv.attack(nonce, peer_addr, entry.local.addr, until=sim.now() + 2 * CFG.no_inbound_timeout)
    deadline = last_real_inbound(sim, survivor, nonce) + CFG.no_inbound_timeout + TIMER_SLACK
    sim.run_until(sim.now() + 2 * CFG.no_inbound_timeout)
    assert adv.injected > 3_000
    (expiry,) = survivor.transitions("expire")
    assert expiry.at <= deadline
    # Nothing forged counted: the reason says that unauthenticated frames of this pair kept arriving.
    assert expiry.reason is ExpiryReason.KEY_MISMATCH
    drops = survivor.pool.drops
    assert drops[DropReason.BAD_MAC] > 0 and drops[DropReason.FORMAT_MISMATCH] > 0
    assert drops[DropReason.REPLAY] > 0 or drops[DropReason.UNEXPECTED] > 0
    answered = [d for d in sim.log if d.sender == survivor.identity and d.time > died + 0.03 and d.kind == "pong"]
    assert answered == []  # after the last real ping landed (0.03 s max delay) no pong went out at all


@pytest.mark.parametrize("dead", ["alice", "bob"], ids=["pinger-dies", "ponger-dies"])
def test_without_keys_forged_traffic_keeps_a_dead_pair_alive(monkeypatch: pytest.MonkeyPatch, dead: str) -> None:
    """The documented legacy weakness: the astrald frame carries nothing but the (public) nonce."""
    sim, adv, a, b, nonce = setup(monkeypatch, None)
    gone, survivor = (a, b) if dead == "alice" else (b, a)
    entry = survivor.entry(nonce)
    gone.remove(nonce)
    adv.attack(nonce, entry.remote.addr, entry.local.addr, until=sim.now() + 2 * CFG.no_inbound_timeout)
    sim.run_until(sim.now() + 2 * CFG.no_inbound_timeout)
    assert survivor.transitions("expire") == []
    assert entry.state == "Idle" and entry.last_seen > sim.now() - 1.0
    if dead == "alice":  # the ponger answers forged pings, but at most at the pong rate, never 1:1
        assert survivor.pool.drops[DropReason.RATE_LIMITED] > 0


def test_control_without_an_attacker_the_survivor_expires_no_inbound(monkeypatch: pytest.MonkeyPatch) -> None:
    sim, _, a, b, nonce = setup(monkeypatch, KEY)
    a.remove(nonce)
    sim.run_until(sim.now() + 2 * CFG.no_inbound_timeout)
    assert b.expiries() == {nonce: ExpiryReason.NO_INBOUND}


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "legacy"])
def test_a_forged_pong_ends_a_drain_only_without_keys(monkeypatch: pytest.MonkeyPatch, key: bytes | None) -> None:
    """The pinger claims with a ping in flight (0.2 s each way); the attacker answers it at once from bob's address."""
    sim = Simulation(4, NetConfig(delay_min=0.2, delay_max=0.2))
    adv = Adversary(sim, monkeypatch)
    a, b = sim.add_node("alice"), sim.add_node("bob")
    nonce = sim.punch(a, b, pinger=a, key=key).nonce
    sim.run_until(3.0)  # pings at 0, 1, 2, 3: the one at 3.0 has just left
    entry = a.claim(nonce)
    assert entry.outstanding == 1 and not entry.drained
    adv.attack(nonce, entry.remote.addr, entry.local.addr, until=3.3, every=0.01)
    assert sim.run_until(lambda: entry.drained, timeout=1.0)
    drained_at = sim.now()
    real_pong_at = 3.0 + 0.4  # the real answer: 0.2 s there, 0.2 s back
    if key is None:
        assert drained_at < real_pong_at  # cut short: the real pong is still in flight
    else:
        assert drained_at == pytest.approx(real_pong_at)
        assert a.pool.drops[DropReason.BAD_MAC] > 0
