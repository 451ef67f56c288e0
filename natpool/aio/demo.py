"""``natpool demo``: two pools in one process on real loopback UDP, handing pairs over through TCP signalling.

It adds a few hundred pairs (roles alternate, so both sides ping), keeps
them alive, fires concurrent ``take`` / ``take_any`` calls from both sides
(some on the same pair, to exercise the tie-break), prints a live table and
a summary, and checks its own guarantees from what it observed on the wire:

* **silence**: no keepalive frame is sent by, or arrives at, an entry after
  it locked (Locked / InUse / Expired), and none arrives on a handed-over
  socket — observed through the driver's per-datagram wire observer (every
  datagram with its entry's state) and the leases' own protocols;
* **symmetry**: every lease one side got has its counterpart on the other;
* **no leaks**: every socket opened is closed at the end.

Exit status 0 when every guarantee held, 1 otherwise. Defaults finish in
about ten seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from natpool.aio import run as aio_run
from natpool.aio.pool import AsyncPairPool
from natpool.aio.tcp import TcpSignalling, TcpSignallingServer
from natpool.config import PairConfig
from natpool.core.entry import StateChanged
from natpool.core.lease import Lease
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import HandoverError, PairBusy
from natpool.machines.tables import ENTRY
from natpool.wire.frame import FRAME_SIZE

A, B = "alice", "bob"
SILENT = ENTRY.sets["silent"]
APP_HELLO = b"natpool-demo application data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=200, help="pairs to add (default 200)")
    parser.add_argument("--takes", type=int, default=20, help="take() calls from EACH side (default 20)")
    parser.add_argument("--ping-interval", type=float, default=0.2, help="keepalive interval, s (default 0.2)")
    parser.add_argument("--duration", type=float, default=6.0, help="total run time, s (default 6)")
    parser.add_argument("--refresh", type=float, default=1.0, help="table refresh period, s (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the take schedule")
    parser.add_argument("--quiet", action="store_true", help="no live table, summary only")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio even if uvloop is installed")


def valid_arguments(args: argparse.Namespace) -> bool:
    """The checks both demos share (``natpool demo --nat`` builds on this one: :mod:`natpool.demo`)."""
    if args.pairs < 1 or args.takes < 0 or args.ping_interval <= 0 or args.duration <= 0:
        print("natpool demo: --pairs >= 1, --takes >= 0, --ping-interval > 0, --duration > 0", file=sys.stderr)
        return False
    return True


def run(args: argparse.Namespace) -> int:
    if not valid_arguments(args):
        return 2
    demo = Demo(args)
    return aio_run(demo.main(), use_uvloop=not args.no_uvloop)


@dataclass
class Monitor:
    """What the demo saw on the wire, checked against the guarantees at the end."""

    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    locked: set[tuple[str, int]] = field(default_factory=set)  # (node, nonce) that ever went silent
    expired: Counter[str] = field(default_factory=Counter)
    expiry_reasons: Counter[str] = field(default_factory=Counter)  # before the final close
    closing: bool = False
    app_early: Counter[str] = field(default_factory=Counter)

    def observer(self, node: str) -> Any:
        def observe(direction: str, nonce: int, data: bytes, addr: tuple[str, int], state: str) -> None:
            if len(data) != FRAME_SIZE:
                # Application data from a peer that went InUse first, kept for our lease: not a keepalive.
                self.app_early[node] += 1
                return
            (self.sent if direction == "send" else self.received)[node] += 1
            if state in SILENT or (node, nonce) in self.locked:
                self.violations.append(f"{node}: keepalive {direction} on {nonce:#x} while {state} "
                                       f"({len(data)} bytes, peer {addr[0]}:{addr[1]})")
        return observe

    def on_event(self, node: str) -> Any:
        def on_event(ev: object) -> None:
            if isinstance(ev, StateChanged) and ev.target in ("Locked", "InUse"):
                self.locked.add((node, ev.nonce))
            if isinstance(ev, StateChanged) and ev.target == "Expired" and not self.closing:
                self.expired[node] += 1
                self.expiry_reasons[f"{node}:{ev.reason.value if ev.reason else '?'}"] += 1
        return on_event


class LeaseProtocol(asyncio.DatagramProtocol):
    """The application's protocol on a handed-over socket: counts app data, flags any keepalive frame."""

    def __init__(self, demo: Demo, node: str, nonce: int) -> None:
        self.demo, self.node, self.nonce = demo, node, nonce

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data == APP_HELLO:
            self.demo.app_received[self.node] += 1
        elif len(data) == FRAME_SIZE:
            self.demo.monitor.violations.append(f"{self.node}: keepalive-sized frame on leased {self.nonce:#x}")


class Demo:
    where = "127.0.0.1"  # where the pairs' endpoints are, for the header line

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)  # noqa: S311 - a demo schedule, not a secret
        self.cfg = PairConfig(ping_interval=args.ping_interval,
                              no_inbound_timeout=max(10.0, 20 * args.ping_interval),
                              ping_lifespan=min(2.0, max(0.5, 5 * args.ping_interval)),
                              lock_timeout=5.0)
        self.monitor = Monitor()
        self.pools: dict[str, AsyncPairPool] = {}
        self.leases: dict[str, dict[int, Lease]] = {A: {}, B: {}}
        self.outcomes: Counter[str] = Counter()
        self.app_received: Counter[str] = Counter()
        self.started = time.monotonic()
        self.nonces: list[int] = []

    def out(self, line: str) -> None:
        if not self.args.quiet:
            print(line, flush=True)

    async def main(self) -> int:
        args = self.args
        mon = self.monitor
        for node in (A, B):
            pool = AsyncPairPool(node, self.cfg, wire_observer=mon.observer(node))
            pool.on_event(mon.on_event(node))
            self.pools[node] = pool
        pa, pb = self.pools[A], self.pools[B]
        servers = {node: TcpSignallingServer(self.pools[node].serve_handover) for node in (A, B)}
        for server in servers.values():
            await server.start()
        pa.signalling = TcpSignalling(A, {B: servers[B].address})
        pb.signalling = TcpSignalling(B, {A: servers[A].address})
        collectors = [asyncio.create_task(self._collect(node)) for node in (A, B)]
        try:
            print(f"natpool demo: {args.pairs} pairs alice<->bob on {self.where}, ping every {args.ping_interval:g}s, "
                  f"{args.takes} takes from each side, TCP signalling on {servers[A].address[1]}/"
                  f"{servers[B].address[1]}", flush=True)
            await self._add_pairs()
            ticker = asyncio.create_task(self._ticker())
            await self._warm_up()
            await self._handovers()
            remaining = args.duration - (time.monotonic() - self.started)
            if remaining > 0:
                await asyncio.sleep(remaining)  # keep the rest alive for the requested time (wall pacing)
            ticker.cancel()
            self._table()
        finally:
            mon.closing = True
            for t in collectors:
                t.cancel()
            for server in servers.values():
                await server.close()
            for node_leases in self.leases.values():
                for lease in node_leases.values():
                    if lease.transport is not None:
                        lease.transport.close()
            await pa.close()
            await pb.close()
            await asyncio.sleep(0)
        return self._summary()

    async def _add_pairs(self) -> None:
        pa, pb = self.pools[A], self.pools[B]
        used: set[int] = set()
        for i in range(self.args.pairs):
            sa, sb = _udp(), _udp()
            nonce = self.rng.getrandbits(64) or 1
            while nonce in used:
                nonce = self.rng.getrandbits(64) or 1
            used.add(nonce)
            pair = EndpointPair(Endpoint(A, "127.0.0.1", sa.getsockname()[1]),
                                Endpoint(B, "127.0.0.1", sb.getsockname()[1]), nonce)
            await pa.add(pair, is_pinger=i % 2 == 0, sock=sa)
            await pb.add(pair, is_pinger=i % 2 == 1, sock=sb)
            self.nonces.append(nonce)

    async def _warm_up(self) -> None:
        """Wait (bounded) until every pair has completed a keepalive exchange."""
        pa = self.pools[A]

        def all_talked() -> bool:
            return all(e.stats.received > 0 for e in pa.entries())

        try:
            await asyncio.wait_for(self._until(pa, all_talked), 10 * self.args.ping_interval + 2.0)
        except TimeoutError:
            self.out("warning: not every pair exchanged a keepalive before the handovers started")

    @staticmethod
    async def _until(pool: AsyncPairPool, predicate: Any) -> None:
        while not predicate():
            await pool.wait_changed()

    async def _handovers(self) -> None:
        takes = self.args.takes
        if takes == 0:
            return
        pool_nonces = list(self.nonces)
        self.rng.shuffle(pool_nonces)
        # A third of the takes target the same pairs from both sides at once (tie-break), a third are
        # take_any, the rest distinct pairs per side.
        contested = pool_nonces[: max(1, takes // 3)]
        rest = pool_nonces[len(contested):]
        jobs: list[Any] = []
        for node, other in ((A, B), (B, A)):
            own = rest[:takes] if node == A else rest[takes: 2 * takes]
            plan: list[int | None] = list(contested)
            plan += [None] * (takes // 3)
            plan += own[: max(0, takes - len(plan))]
            for nonce in plan[:takes]:
                jobs.append(self._take(node, other, nonce))
        self.rng.shuffle(jobs)
        await asyncio.gather(*jobs)

    async def _take(self, node: str, other: str, nonce: int | None) -> None:
        pool = self.pools[node]
        try:
            lease = await (pool.take(nonce) if nonce is not None else pool.take_any(other))
        except PairBusy:
            self.outcomes["busy"] += 1
            return
        except HandoverError as exc:
            self.outcomes[type(exc).__name__] += 1
            return
        self.outcomes["lease"] += 1
        self._adopt(node, lease)

    async def _collect(self, node: str) -> None:
        """The responder side's application: take every lease the peer's takes produced here."""
        pool = self.pools[node]
        while True:
            lease = await pool.accept()
            self._adopt(node, lease)

    def _adopt(self, node: str, lease: Lease) -> None:
        self.leases[node][lease.nonce] = lease
        transport = lease.transport
        if transport is None:
            self.monitor.violations.append(f"{node}: lease {lease.nonce:#x} came without its socket")
            return
        lease.set_protocol(LeaseProtocol(self, node, lease.nonce))
        transport.sendto(APP_HELLO, lease.remote_addr)

    async def _ticker(self) -> None:
        self.out(f"{'t':>5}  {'node':<6} {'Idle':>5} {'InLock':>6} {'Locked':>6} {'InUse':>5} {'Expir':>5} "
                 f"{'sent':>7} {'recv':>7} {'drops':>5} {'leases':>6} {'sockets':>7}")
        while True:
            await asyncio.sleep(self.args.refresh)  # display pacing only
            self._table()

    def _table(self) -> None:
        t = time.monotonic() - self.started
        for node in (A, B):
            pool = self.pools[node]
            states = pool.state_counts()
            entries = pool.entries()
            sent = sum(e.stats.sent for e in entries)
            recv = sum(e.stats.received for e in entries)
            drops = sum(pool.core.drops.values())
            self.out(f"{t:5.1f}  {node:<6} {states['Idle']:>5} {states['InLocking']:>6} {states['Locked']:>6} "
                     f"{len(self.leases[node]):>5} {self._expired(node):>5} {sent:>7} {recv:>7} {drops:>5} "
                     f"{len(self.leases[node]):>6} {len(pool):>7}")

    def _expired(self, node: str) -> int:
        return self.monitor.expired[node]

    def _summary(self) -> int:
        mon = self.monitor
        violations = list(mon.violations)
        a_leases, b_leases = set(self.leases[A]), set(self.leases[B])
        if a_leases != b_leases:
            violations.append(f"symmetry: leases only on alice {sorted(a_leases - b_leases)}, "
                              f"only on bob {sorted(b_leases - a_leases)}")
        for node in (A, B):
            st = self.pools[node].stats
            leased = len(self.leases[node])
            if st.sockets_opened != st.sockets_closed + leased:
                violations.append(f"{node}: {st.sockets_opened} sockets opened, {st.sockets_closed} closed by the "
                                  f"pool, {leased} handed over: leak")
        for node in (A, B):
            for lease in self.leases[node].values():
                transport: Any = lease.transport
                if transport is not None and not transport.is_closing():
                    violations.append(f"{node}: leased socket {lease.nonce:#x} still open")
        pairs_with_app = len(a_leases & b_leases)
        print("\nsummary")
        print(f"  pairs added           {self.args.pairs} (both sides), ran {time.monotonic() - self.started:.1f}s")
        print(f"  take outcomes         {dict(self.outcomes)}")
        print(f"  handed over           {len(a_leases)} on alice, {len(b_leases)} on bob ({pairs_with_app} matched)")
        print(f"  app datagrams on leased sockets  alice {self.app_received[A]}, bob {self.app_received[B]} "
              f"(arrived before the local hand-over and kept for the lease: alice {mon.app_early[A]}, "
              f"bob {mon.app_early[B]})")
        print(f"  keepalive datagrams   sent alice {mon.sent[A]} / bob {mon.sent[B]}, "
              f"received alice {mon.received[A]} / bob {mon.received[B]}")
        for node in (A, B):
            pool = self.pools[node]
            print(f"  {node:<5} drops {dict((r.value, n) for r, n in pool.core.drops.items()) or '{}'}, "
                  f"send errors {pool.stats.send_errors}, sockets opened {pool.stats.sockets_opened} "
                  f"closed {pool.stats.sockets_closed} leased {len(self.leases[node])}")
        print(f"  expired while running {dict(mon.expiry_reasons) or 'none'} (released leases expire CLOSED)")
        print(f"  entries that went silent: {len(mon.locked)}; keepalives seen after a lock: "
              f"{sum(1 for v in mon.violations if 'keepalive' in v)}")
        if violations:
            print(f"\nFAILED: {len(violations)} guarantee violation(s)")
            for v in violations[:20]:
                print(f"  - {v}")
            return 1
        print("\nOK: silence after lock, lease symmetry and socket accounting all held")
        return 0


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind(("127.0.0.1", 0))
    return s
