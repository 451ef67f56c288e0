"""``natpool demo --nat``: the demo's two pools behind two Linux kernel NATs (root only).

The same :class:`~natpool.aio.demo.Demo` (pairs, keepalive, concurrent
takes, the live table, the self-checks), but every UDP socket of alice lives
in host namespace ``ha`` behind router ``ra`` and every one of bob's in
``hb`` behind ``rb`` (see :mod:`natpool.netlab`). One process owns both
sides' sockets: each is created after ``setns(2)`` into its host namespace,
and a socket keeps the namespace it was created in. Pairs are hole-punched
with plain sends first (both routers then hold a conntrack entry per pair);
the TCP signalling stays on this process's loopback, out of band, as a real
deployment's control channel would be.

What it adds to the table and the checks:

* per router, every refresh: conntrack UDP entries (how many ASSURED, the
  smallest countdown), keepalive-shaped datagrams forwarded out/in, and
  unsolicited inbound datagrams dropped;
* **no keepalive crosses a router after a lock**: for every pair that went
  silent, the routers' per-flow counters (dynamic nft sets keyed on the
  ports) must equal the keepalives the two pools sent before that pair's
  first lock. A frame sent after the lock would make a router count exceed it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from natpool.aio import run as aio_run
from natpool.aio.demo import A, B, Demo, Monitor
from natpool.core.entry import StateChanged
from natpool.endpoints import Endpoint, EndpointPair
from natpool.netlab.lab import Lab, LabConfig, LabError, lab_unavailable_reason
from natpool.wire.frame import FRAME_SIZE

HOST = {A: "a", B: "b"}
PUNCH = b"natpool-punch"
NAT_TIMEOUT = 6  # the routers' UDP conntrack timeouts during the demo, s (kernel default 30 / 120)


def run_nat(args: argparse.Namespace) -> int:
    """Entry point of ``natpool demo --nat``: exit 2 with the reason when the lab cannot run here."""
    reason = lab_unavailable_reason()
    if reason is not None:
        print(f"natpool demo --nat: {reason}; run it as root on Linux with nftables and conntrack "
              f"installed, or use plain `natpool demo` (loopback)", file=sys.stderr)
        return 2
    try:
        with Lab(LabConfig(udp_timeout=NAT_TIMEOUT, udp_stream_timeout=NAT_TIMEOUT)) as lab:
            demo = NatDemo(args, lab)
            return aio_run(demo.main(), use_uvloop=not args.no_uvloop)
    except LabError as exc:
        print(f"natpool demo --nat: the NAT lab failed: {exc}", file=sys.stderr)
        return 2


@dataclass
class NatMonitor(Monitor):
    """The demo's monitor, plus each keepalive's send time and each pair's first lock (driver clock)."""

    sends: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    first_lock: dict[int, float] = field(default_factory=dict)

    def observer(self, node: str) -> Any:
        inner = super().observer(node)
        loop = asyncio.get_running_loop()

        def observe(direction: str, nonce: int, data: bytes, addr: tuple[str, int], state: str) -> None:
            if direction == "send" and len(data) == FRAME_SIZE:
                self.sends[(node, nonce)].append(loop.time())
            inner(direction, nonce, data, addr, state)
        return observe

    def on_event(self, node: str) -> Any:
        inner = super().on_event(node)

        def on_event(ev: object) -> None:
            if isinstance(ev, StateChanged) and ev.target in ("Locked", "InUse") and ev.nonce not in self.first_lock:
                self.first_lock[ev.nonce] = ev.at
            inner(ev)
        return on_event


class NatDemo(Demo):
    where = "198.18.0.1 / 198.19.0.2, behind two kernel NATs"

    def __init__(self, args: argparse.Namespace, lab: Lab) -> None:
        super().__init__(args)
        self.lab = lab
        self.monitor: NatMonitor = NatMonitor()
        self.ports: dict[int, tuple[int, int]] = {}  # nonce -> (alice's port, bob's port)
        self.punch_failed = 0
        self.router_rows: list[str] = []
        self._refresher: asyncio.Task[None] | None = None

    async def main(self) -> int:
        lab = self.lab
        print(f"natpool demo --nat: alice in {lab.ns('ha')} behind {lab.ns('ra')} ({lab.public_addr('a')}), "
              f"bob in {lab.ns('hb')} behind {lab.ns('rb')} ({lab.public_addr('b')}); conntrack UDP timeouts "
              f"{NAT_TIMEOUT}s (machine default {lab.default_timeouts})", flush=True)
        try:
            return await super().main()
        finally:
            if self._refresher is not None:
                self._refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._refresher

    async def _add_pairs(self) -> None:
        """Open each pair's sockets in the host namespaces, punch them through both NATs, then add them."""
        lab = self.lab
        pub_a, pub_b = lab.public_addr("a"), lab.public_addr("b")
        socks = [(lab.udp_socket("a"), lab.udp_socket("b")) for _ in range(self.args.pairs)]
        try:
            for _ in range(3):  # round 1 opens both routers' mappings (a's first datagram dies at rb), 2-3 pass
                for sa, sb in socks:
                    sa.sendto(PUNCH, (pub_b, sb.getsockname()[1]))
                    sb.sendto(PUNCH, (pub_a, sa.getsockname()[1]))
                await asyncio.sleep(0.02)  # punch pacing
            await asyncio.sleep(0.05)
            heard = [(_drain(sa, (pub_b, sb.getsockname()[1])), _drain(sb, (pub_a, sa.getsockname()[1])))
                     for sa, sb in socks]
        except BaseException:
            for sa, sb in socks:
                sa.close()
                sb.close()
            raise
        used: set[int] = set()
        pa, pb = self.pools[A], self.pools[B]
        for i, ((sa, sb), (ha, hb)) in enumerate(zip(socks, heard, strict=True)):
            if not (ha and hb):
                self.punch_failed += 1
                sa.close()
                sb.close()
                continue
            nonce = self.rng.getrandbits(64) or 1
            while nonce in used:
                nonce = self.rng.getrandbits(64) or 1
            used.add(nonce)
            port_a, port_b = sa.getsockname()[1], sb.getsockname()[1]
            # Port-preserving masquerade: the public port is the local one (conntrack confirms it below).
            pair = EndpointPair(Endpoint(A, pub_a, port_a), Endpoint(B, pub_b, port_b), nonce)
            await pa.add(pair, is_pinger=i % 2 == 0, sock=sa)
            await pb.add(pair, is_pinger=i % 2 == 1, sock=sb)
            self.nonces.append(nonce)
            self.ports[nonce] = (port_a, port_b)
        if self.punch_failed:
            self.monitor.violations.append(f"hole punch failed for {self.punch_failed} pair(s)")
        self._refresher = asyncio.create_task(self._refresh_routers())  # the routers' rows, from now on

    def _router_stats(self) -> list[str]:
        """One line per router: its conntrack entries for pooled and for silent (locked/leased) pairs, counters."""
        rows = []
        for i, h in enumerate(("a", "b")):
            silent_ports = {self.ports[n][i] for n in list(self.monitor.first_lock) if n in self.ports}
            entries = self.lab.conntrack(h)
            pooled = [e for e in entries if e.orig[2] not in silent_ports]
            silent = [e for e in entries if e.orig[2] in silent_ports]
            c = self.lab.counters(h)

            def left(es: list[Any]) -> str:
                return f"{min(e.timeout for e in es)}s" if es else "-"
            rows.append(f"       router {h}: conntrack pooled {len(pooled):>4} ({sum(e.assured for e in pooled)} "
                        f"ASSURED, min {left(pooled)} left), silent/leased {len(silent):>3} (min {left(silent)}); "
                        f"keepalives out {c.get('keepalive_out', 0):>6} in {c.get('keepalive_in', 0):>6}; "
                        f"unsolicited dropped {c.get('dropped_in', 0)}")
        return rows

    async def _refresh_routers(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.router_rows = await loop.run_in_executor(None, self._router_stats)
            except LabError as exc:
                self.router_rows = [f"       routers: {exc}"]
            await asyncio.sleep(self.args.refresh)  # display pacing only

    def _table(self) -> None:
        super()._table()
        for row in self.router_rows:
            self.out(row)

    def _summary(self) -> int:
        self._check_routers()
        return super()._summary()

    def _check_routers(self) -> None:
        """Per silent pair: frames the routers forwarded == frames the pools sent before the pair's first lock."""
        mon = self.monitor
        try:
            flows = {h: self.lab.flow_counters(h) for h in ("a", "b")}
        except LabError as exc:
            mon.violations.append(f"cannot read the routers' flow counters: {exc}")
            return
        checked = crossed_after = forwarded = 0
        for nonce, t_lock in mon.first_lock.items():
            port_a, port_b = self.ports[nonce]
            pre_a = sum(1 for t in mon.sends.get((A, nonce), ()) if t < t_lock)
            pre_b = sum(1 for t in mon.sends.get((B, nonce), ()) if t < t_lock)
            seen = {
                "router a out": (flows["a"]["out"].get((port_a, port_b), 0), pre_a),
                "router b in": (flows["b"]["in"].get((port_a, port_b), 0), pre_a),
                "router b out": (flows["b"]["out"].get((port_b, port_a), 0), pre_b),
                "router a in": (flows["a"]["in"].get((port_b, port_a), 0), pre_b),
            }
            checked += 1
            for where, (count, expected) in seen.items():
                forwarded += count
                if count != expected:
                    crossed_after += max(0, count - expected)
                    mon.violations.append(f"{where}: {count} keepalives of pair {nonce:#x} forwarded, the pools sent "
                                          f"{expected} before its lock (keepalive crossed a router after the lock)"
                                          if count > expected else
                                          f"{where}: only {count} of the {expected} pre-lock keepalives of pair "
                                          f"{nonce:#x} forwarded (lost at the NAT)")
        rows = self._router_stats()
        print("\nrouters (kernel NAT)")
        for row in rows:
            print(row)
        print(f"  silent pairs checked on the routers' per-flow counters: {checked}, keepalives they forwarded "
              f"before the locks: {forwarded}, after a lock: {crossed_after}; hole punch failures: "
              f"{self.punch_failed}")


def _drain(sock: Any, expected: tuple[str, int]) -> bool:
    """Read everything queued on a punched socket; True if a punch from ``expected`` was among it."""
    heard = False
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except BlockingIOError:
            return heard
        if data == PUNCH and (addr[0], addr[1]) == expected:
            heard = True
