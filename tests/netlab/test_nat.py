"""natpool against the Linux kernel's NAT: nftables masquerade + conntrack in network namespaces.

Every test builds its own lab (see :mod:`natpool.netlab`): host a and b
behind their own router namespaces, routers masquerading onto 198.18.0.0/15
and dropping unsolicited inbound UDP, a non-NATed side link for the TCP
signalling, and the routers' UDP conntrack timeouts lowered to 6 s so the
mapping's life and death take seconds. Each host runs natpool in its own
process (``ip netns exec``), fed with a socket hole-punched by plain sends.

Times compared below all come from CLOCK_MONOTONIC (the agents' driver clock
and this process's polls). The bounds are the protocol's and the kernel's
semantics (e.g. "expired within no_inbound_timeout of the last inbound"),
not performance goals; waits have failure bounds only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from natpool.netlab import Lab, LabConfig
from natpool.netlab.client import Agent
from tests.support.netlab import event_time, expiry, keepalive_sends, poll, punched_hosts

MakeLab = Callable[..., Lab]
MakeAgent = Callable[[Lab, str], Agent]
Figures = Callable[[str], None]

CT = 6  # the routers' UDP conntrack timeouts in these tests (both unreplied and stream), s
FAST: dict[str, Any] = {"ping_interval": 0.5, "no_inbound_timeout": 2.5, "ping_lifespan": 1.0, "lock_timeout": 2.0}


def _gone(lab: Lab, host: str, port: int) -> Callable[[], bool]:
    return lambda: lab.mapping(host, port) is None


def test_control_silent_pair_loses_its_mapping(make_lab: MakeLab, make_agent: MakeAgent, figures: Figures) -> None:
    """Without keepalive a punched mapping dies at the conntrack timeout, and the peer is then locked out.

    This is the control for everything else: it shows the lab's NAT really
    forgets a silent flow (entry gone from ``conntrack -L``) and really drops
    unsolicited inbound UDP (the router's ``dropped_in`` counter moves, the
    host receives nothing).
    """
    lab = make_lab(LabConfig(udp_timeout=CT, udp_stream_timeout=CT))
    figures(f"machine default conntrack timeouts {lab.default_timeouts}; lab set to {lab.timeouts('a')}")
    h = punched_hosts(lab, make_agent)
    last = max(h.punch["a"]["t"], h.punch["b"]["t"])  # the last punch datagram crossed both routers by then
    for host in ("a", "b"):
        assert lab.mapping(host, h.port[host]) is not None, f"router {host} has no mapping right after the punch"
    gone = {host: poll(_gone(lab, host, h.port[host]), CT + 5.0) for host in ("a", "b")}
    for host, t in gone.items():
        assert t is not None, f"router {host} kept a silent mapping past {CT + 5}s"
        assert t - last >= CT - 0.5, f"router {host} dropped the mapping after {t - last:.2f}s, before its timeout"
    before = lab.counters("a")["dropped_in"]
    h.b.call("send_raw", peer=[lab.public_addr("a"), h.port["a"]], size=20)
    got = h.a.call("recv_raw", timeout=1.0)["received"]
    after = lab.counters("a")["dropped_in"]
    assert got == [], f"host a received {got} although its router had forgotten the mapping"
    assert after == before + 1, (before, after)
    figures(f"silent mapping age at removal: router a {gone['a'] - last:.2f}s, router b {gone['b'] - last:.2f}s "
            f"(timeout {CT}s); peer datagram afterwards: dropped at router a ({before}->{after}), host a got 0")


def test_keepalive_holds_the_mapping(make_lab: MakeLab, make_agent: MakeAgent, figures: Figures) -> None:
    """With natpool pinging every 1 s, both routers keep the mapping for 4x their 6 s timeout.

    Sampled every 0.5 s: the entry is present on both routers, the conntrack
    countdown never falls below ``timeout - 2 intervals - 1`` (the mapping is
    refreshed by every frame; without that it would count down to 0), the pool entries stay Idle and ``last_seen``
    keeps advancing.
    """
    lab = make_lab(LabConfig(udp_timeout=CT, udp_stream_timeout=CT))
    h = punched_hosts(lab, make_agent)
    cfg = {"ping_interval": 1.0, "no_inbound_timeout": 4.5, "ping_lifespan": 1.0, "lock_timeout": 3.0}
    h.start_pools(cfg, pinger="a")
    hold = 4 * CT
    t0 = time.monotonic()
    min_left = {"a": CT, "b": CT}
    samples = 0
    first_seen: tuple[float, float] | None = None
    while time.monotonic() - t0 < hold:
        for host in ("a", "b"):
            m = lab.mapping(host, h.port[host])
            assert m is not None, f"router {host} lost the mapping after {time.monotonic() - t0:.1f}s"
            min_left[host] = min(min_left[host], m.timeout)
        sa, sb = h.status()
        assert [e["state"] for e in sa["entries"] + sb["entries"]] == ["Idle", "Idle"], (sa["entries"], sb["entries"])
        if first_seen is None:
            first_seen = (sa["entries"][0]["last_seen"], sb["entries"][0]["last_seen"])
        samples += 1
        time.sleep(0.5)
    sa, sb = h.status()
    assert first_seen is not None
    advanced = (sa["entries"][0]["last_seen"] - first_seen[0], sb["entries"][0]["last_seen"] - first_seen[1])
    assert min(advanced) > hold - 2 * cfg["ping_interval"], advanced
    # conntrack shows whole seconds left (rounded down); every frame refreshes it, so it never falls below
    # CT - interval - 1, give or take one late ping on a loaded machine. Without refreshes it would reach 0.
    assert min(min_left.values()) >= CT - 2 * cfg["ping_interval"] - 1, min_left
    ca, cb = lab.counters("a"), lab.counters("b")
    figures(f"held {time.monotonic() - t0:.1f}s (4x{CT}s), {samples} samples, both Idle throughout; "
            f"min conntrack seconds left: router a {min_left['a']}, router b {min_left['b']}; last_seen advanced "
            f"{advanced[0]:.1f}s / {advanced[1]:.1f}s; keepalives a sent {keepalive_sends(sa)}, b sent "
            f"{keepalive_sends(sb)}; router a out/in {ca['keepalive_out']}/{ca['keepalive_in']}, "
            f"router b out/in {cb['keepalive_out']}/{cb['keepalive_in']}")


@pytest.mark.slow
def test_default_config_holds_against_kernel_default_timeouts(make_lab: MakeLab, make_agent: MakeAgent,
                                                               figures: Figures) -> None:
    """The default ``PairConfig()`` against the kernel's own 30 s / 120 s UDP timeouts, for 4 x 30 s.

    Opt-in (``NATPOOL_SLOW_NETLAB=1``): it needs two minutes of wall time.
    The flow turns ASSURED (120 s) two seconds after traffic went both ways;
    the countdown staying near 120 s shows each ping refreshes it.
    """
    lab = make_lab(LabConfig(udp_timeout=30, udp_stream_timeout=120))
    h = punched_hosts(lab, make_agent)
    h.start_pools({}, pinger="a")
    hold = float(os.environ.get("NATPOOL_SLOW_NETLAB_HOLD", "120"))
    t0 = time.monotonic()
    min_left = {"a": 120, "b": 120}
    assured = {"a": False, "b": False}
    while time.monotonic() - t0 < hold:
        for host in ("a", "b"):
            m = lab.mapping(host, h.port[host])
            assert m is not None, f"router {host} lost the mapping after {time.monotonic() - t0:.1f}s"
            if time.monotonic() - t0 > 5:
                min_left[host] = min(min_left[host], m.timeout)
            assured[host] |= m.assured
        sa, sb = h.status()
        assert [e["state"] for e in sa["entries"] + sb["entries"]] == ["Idle", "Idle"]
        time.sleep(2.0)
    assert all(assured.values()), assured
    assert min(min_left.values()) >= 120 - 5 - 1, min_left
    sa, sb = h.status()
    figures(f"default PairConfig held {time.monotonic() - t0:.0f}s against 30/120s; ASSURED {assured}; "
            f"min seconds left {min_left}; keepalives a {keepalive_sends(sa)}, b {keepalive_sends(sb)}")


def test_handover_through_the_nat(make_lab: MakeLab, make_agent: MakeAgent, figures: Figures) -> None:
    """Take on a, accept on b (signalling on the side link); after a's lock no keepalive crosses a router.

    Counting: each router counts keepalive-shaped datagrams (UDP length 17,
    kind byte 0/1) in each direction. Every frame either pool sent before the
    initiator's ``Locked`` must be on those counters, and nothing else: if a
    frame crossed a router after the lock, a router count would exceed the
    pools' pre-lock sends. Application data then goes both ways over the
    leased sockets through both NATs: 9 and 4,000 bytes (IP-fragmented on the
    1500-byte veths), the responder's sent the instant it got its lease. The
    initiator's TAKEN is held back 0.3 s on the signalling path, so those two
    reach the initiator while it is still Locked, every run (without the
    delay it is a race between the TCP and the UDP path). The 9-byte
    payload's last byte is not 0/1, so the routers do not count it as a keepalive.
    """
    lab = make_lab(LabConfig(udp_timeout=CT, udp_stream_timeout=CT))
    h = punched_hosts(lab, make_agent)
    cfg = dict(FAST, ping_interval=0.2, no_inbound_timeout=2.0, ping_lifespan=0.5, lock_timeout=1.5)
    h.start_pools(cfg, pinger="a")
    h.signalling(responder="b", send_on_lease=[9, 4000], taken_delay=0.3)
    assert poll(lambda: h.status()[0]["entries"][0]["frames_received"] >= 3, 5.0) is not None
    t_take = time.monotonic()
    lease_a = h.a.call("take", nonce=h.nonce, send=[9, 4000])
    t_lease = time.monotonic()
    assert lease_a["role"] == "initiator" and lease_a["state"] == "InUse"
    both_got_two = poll(lambda: all(len(s["lease_rx"]) >= 2 for s in h.status()), 3.0)
    assert both_got_two is not None, json.dumps([(s["lease_rx"], s["entries"], s["lease"]) for s in h.status()])
    time.sleep(5 * cfg["ping_interval"])  # any stray keepalive would have crossed by now
    sa, sb = h.status()
    ca, cb = lab.counters("a"), lab.counters("b")
    t_lock = event_time(sa, "Locked")
    assert t_lock is not None and sb["lease"] is not None and sb["lease"]["role"] == "responder"
    pre_a, pre_b = keepalive_sends(sa, before=t_lock), keepalive_sends(sb, before=t_lock)
    after = (keepalive_sends(sa) - pre_a, keepalive_sends(sb) - pre_b)
    assert after == (0, 0), f"keepalives sent after a's lock: a {after[0]}, b {after[1]}"
    crossed = {"a out": ca["keepalive_out"], "b in": cb["keepalive_in"],
               "b out": cb["keepalive_out"], "a in": ca["keepalive_in"]}
    assert crossed == {"a out": pre_a, "b in": pre_a, "b out": pre_b, "a in": pre_b}, (crossed, pre_a, pre_b)
    for me, status, peer in (("a", sa, "b"), ("b", sb, "a")):
        rx = status["lease_rx"]
        assert sorted(d["size"] for d in rx) == [9, 4000], f"{me} got {rx}"
        assert all(d["intact"] and d["from"] == [lab.public_addr(peer), h.port[peer]] for d in rx), rx
    rx_a = {d["size"]: d["t"] for d in sa["lease_rx"]}
    t_in_use = event_time(sa, "InUse")
    assert t_in_use is not None
    # What reached a's socket while a was still Locked: the responder's instant datagrams, kept for the lease.
    locked_rx = [(t, size) for t, direction, state, size, _p in sa["wire"] if direction == "recv" and state == "Locked"]
    while_locked = [size for _t, size in locked_rx]
    assert sorted(while_locked) == [9, 4000], while_locked  # TAKEN held back 0.3 s: a was still Locked
    figures(f"take {1000 * (t_lease - t_take):.1f}ms (lock->lease on a {1000 * (lease_a['t'] - t_lock):.1f}ms); "
            f"keepalives before a's lock: a {pre_a}, b {pre_b}; router counters a out/in {ca['keepalive_out']}/"
            f"{ca['keepalive_in']}, b out/in {cb['keepalive_out']}/{cb['keepalive_in']} -> 0 crossed after the lock; "
            f"app data both ways intact (9 B, 4000 B); responder's instant 9 B arrived at a "
            f"{1000 * (locked_rx[0][0] - t_lock):.1f}ms after a's lock, while Locked (sizes {while_locked}), "
            f"kept and delivered to a's application {1000 * (rx_a[9] - locked_rx[0][0]):.1f}ms later, after a went "
            f"InUse ({1000 * (t_in_use - t_lock):.1f}ms after its lock, TAKEN held back 0.3s); leased-socket "
            f"max_size {sa['lease']['max_size']}")


def test_mapping_lost_under_a_running_pool(make_lab: MakeLab, make_agent: MakeAgent, figures: Figures) -> None:
    """Deleting the pinger side's conntrack entry is healed by the next ping; the ponger side's is fatal.

    The pinger's next ping simply creates a new outbound mapping (masquerade
    keeps the free port) that matches the peer router's existing entry. The
    ponger never sends first, so once its router forgot the flow every ping
    is dropped there as unsolicited: both pools must notice and expire with
    NO_INBOUND within ``no_inbound_timeout`` of the last frame they got,
    i.e. at most ``no_inbound_timeout + ping_interval`` after the deletion.
    """
    lab = make_lab(LabConfig(udp_timeout=CT, udp_stream_timeout=CT))
    h = punched_hosts(lab, make_agent)
    cfg = dict(FAST)
    h.start_pools(cfg, pinger="a")
    time.sleep(2 * cfg["ping_interval"])
    # 1. pinger side (router a)
    t_del = time.monotonic()
    assert lab.delete_mapping("a", h.port["a"]) == 1
    t_back = poll(lambda: lab.mapping("a", h.port["a"]) is not None, 2 * cfg["ping_interval"] + 1.0, every=0.02)
    assert t_back is not None, "the pinger's next ping did not recreate router a's mapping"
    time.sleep(cfg["no_inbound_timeout"] + 2 * cfg["ping_interval"])
    sa, sb = h.status()
    assert [e["state"] for e in sa["entries"] + sb["entries"]] == ["Idle", "Idle"]
    assert sa["entries"][0]["last_seen"] > t_del + cfg["no_inbound_timeout"]
    assert sb["entries"][0]["last_seen"] > t_del + cfg["no_inbound_timeout"]
    # 2. ponger side (router b)
    dropped0 = lab.counters("b")["dropped_in"]
    t_del2 = time.monotonic()
    assert lab.delete_mapping("b", h.port["b"]) == 1
    bound = cfg["no_inbound_timeout"] + cfg["ping_interval"]
    assert poll(lambda: all(expiry(s) for s in h.status()), bound + 3.0) is not None, "pools did not expire"
    sa, sb = h.status()
    ea, eb = expiry(sa), expiry(sb)
    assert ea is not None and eb is not None
    assert ea[1] == eb[1] == "no_inbound", (ea, eb)
    assert ea[0] - t_del2 <= bound and eb[0] - t_del2 <= bound, (ea[0] - t_del2, eb[0] - t_del2, bound)
    assert lab.mapping("b", h.port["b"]) is None
    dropped = lab.counters("b")["dropped_in"] - dropped0
    assert dropped >= 1
    figures(f"pinger-side delete healed after {1000 * (t_back - t_del):.0f}ms (ping every "
            f"{cfg['ping_interval']}s), both Idle {cfg['no_inbound_timeout'] + 2 * cfg['ping_interval']}s later; "
            f"ponger-side delete: a expired {ea[1]} after {ea[0] - t_del2:.2f}s, b {eb[1]} after "
            f"{eb[0] - t_del2:.2f}s (bound {bound}s); {dropped} pings dropped at router b meanwhile")


def test_symmetric_nat_is_reported_as_address_mismatch(make_lab: MakeLab, make_agent: MakeAgent,
                                                       figures: Figures) -> None:
    """Behind a symmetric NAT (``masquerade fully-random``) the assumed port is wrong; natpool says so.

    Topology: router b masquerades ``fully-random`` (a new public port per
    flow), router a keeps ports and filters *endpoint-independently* for
    host a's punched port (an explicit DNAT for it, so inbound from any
    remote is accepted, like a full-cone NAT). Had router a filtered by
    conntrack state as well, b's frames from the random port would match no
    entry and die at router a, so neither side would ever see the other and
    the symmetric NAT would be indistinguishable from a dead path.
    Here: host b (the pinger) sends its pings from 198.19.0.2:<random>; they
    reach host a, whose pair expects 198.19.0.2:<b's local port> ("the
    assumed port"). Host a must count them as ADDRESS_MISMATCH, record
    ``seen_from`` = the random endpoint, and expire with ADDRESS_MISMATCH.
    Host a's pongs (if any) go to the assumed port and die at router b, whose
    entry only accepts replies to the random port; so host b, which never
    hears anything, expires NO_INBOUND.
    """
    lab = make_lab(LabConfig(udp_timeout=CT, udp_stream_timeout=CT, symmetric=frozenset({"b"}),
                             endpoint_independent=frozenset({"a"})))
    h = punched_hosts(lab, make_agent, require=False, open_ports=("a",), punch_timeout=1.0)
    assert not h.punch["b"]["heard"], "b heard a through a symmetric NAT: the lab is not symmetric"
    seen = h.punch["a"]["seen_from"]
    assert len(seen) == 1 and seen[0][0] == lab.public_addr("b"), h.punch
    random_port = seen[0][1]
    assert random_port != h.port["b"], "fully-random picked the local port by chance (p~1/28000): rerun"
    mb = lab.mapping("b", h.port["b"])
    assert mb is not None and mb.reply[3] == random_port  # router b's own table shows the rewritten port
    h.start_pools(dict(FAST), pinger="b")
    bound = FAST["no_inbound_timeout"] + FAST["ping_interval"]
    assert poll(lambda: all(expiry(s) for s in h.status()), bound + 3.0) is not None
    sa, sb = h.status()
    ea, eb = expiry(sa), expiry(sb)
    entry_a = sa["entries"][0]
    assert ea is not None and eb is not None
    assert entry_a["drops"].get("address_mismatch", 0) >= 1, entry_a
    assert entry_a["seen_from"] == [lab.public_addr("b"), random_port], entry_a
    assert ea[1] == "address_mismatch", ea
    assert eb[1] == "no_inbound", eb
    figures(f"b's local port {h.port['b']}, public port {random_port} (fully-random); a saw "
            f"{entry_a['drops']['address_mismatch']} frames from it, expired {ea[1]}; b expired {eb[1]}")


def test_after_the_lease_the_mapping_dies_at_the_estimated_deadline(make_lab: MakeLab, make_agent: MakeAgent,
                                                                    figures: Figures) -> None:
    """A silent application has ``timeout - (time since the last keepalive)`` before the NAT forgets the path.

    After the hand-over nothing crosses the routers (the application stays
    silent), so each router's entry dies ``CT`` seconds after the last frame
    it forwarded. The lease's ``mapping_deadline`` (last inbound keepalive +
    ``PairConfig.nat_mapping_timeout``, set to the lab's CT) must be within
    one ping interval of the moment ``conntrack -L`` stops showing the entry.
    The ponger (b) takes half an interval after a ping, so neither side has
    just heard a keepalive (the pinger would have drained one right before its
    own lock): the "time since the last keepalive" is a real fraction of the
    interval. Once the deadline has passed, the peer's datagram on the lease
    dies at the router, as in the control test.
    """
    lab = make_lab(LabConfig(udp_timeout=CT, udp_stream_timeout=CT))
    h = punched_hosts(lab, make_agent)
    cfg = {"ping_interval": 2.0, "no_inbound_timeout": 5.0, "ping_lifespan": 1.0, "lock_timeout": 3.0,
           "nat_mapping_timeout": float(CT)}
    h.start_pools(cfg, pinger="a")
    h.signalling(responder="a")
    assert poll(lambda: h.status()[1]["entries"][0]["frames_received"] >= 2, 3 * cfg["ping_interval"], every=0.02)
    time.sleep(cfg["ping_interval"] / 2)  # mid-interval: the last ping is ~1 s old
    lease_b = h.b.call("take", nonce=h.nonce)
    assert poll(lambda: h.status()[0]["lease"] is not None, 3.0)
    gone: dict[str, float] = {}

    def both_gone() -> bool:
        now = time.monotonic()
        for host in ("a", "b"):
            if host not in gone and lab.mapping(host, h.port[host]) is None:
                gone[host] = now
        return len(gone) == 2

    assert poll(both_gone, CT + 3.0, every=0.05), f"a silent lease's mapping outlived {CT + 3}s: {gone}"
    sa, sb = h.status()
    lease_a = sa["lease"]
    last_frame = max(t for s in (sa, sb) for t, *_ in s["wire"])
    for host, lease in (("a", lease_a), ("b", lease_b)):
        assert lease["mapping_deadline"] == pytest.approx(lease["last_inbound"] + CT)
        assert abs(gone[host] - lease["mapping_deadline"]) <= cfg["ping_interval"], (host, gone[host], lease)
        assert gone[host] - last_frame >= CT - 0.5
    dropped0 = lab.counters("b")["dropped_in"]
    h.a.call("send", sizes=[100])
    time.sleep(0.5)
    assert h.status()[1]["lease_rx"] == [] and lab.counters("b")["dropped_in"] == dropped0 + 1
    figures("; ".join(
        f"{host} ({lease['role']}): lease {lease['t'] - lease['last_inbound']:.2f}s after its last inbound "
        f"keepalive, estimated {lease['mapping_deadline'] - lease['t']:.2f}s left, conntrack entry gone "
        f"{gone[host] - lease['t']:.2f}s after the lease "
        f"(estimate error {gone[host] - lease['mapping_deadline']:+.2f}s)"
        for host, lease in (("a", lease_a), ("b", lease_b)))
        + "; afterwards a's datagram on the lease died at router b")
