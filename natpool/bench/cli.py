"""natpool bench [--json] [--quick]: natpool next to its raw baselines, measured in one run.

Every figure is printed with the baseline it is divided by, so the ratio
is what to read: the absolute numbers move with the machine's load. The
targets are reported (met / missed), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from natpool.aio import run as aio_run
from natpool.aio import uvloop_available
from natpool.aio.pool import AsyncPairPool
from natpool.bench.expiry import expiry_figures
from natpool.bench.raw import RawKeepalive, open_udp, tcp_exchange_times, udp_rtts
from natpool.config import PairConfig
from natpool.core.node import Node
from natpool.core.pool import PairPool
from natpool.endpoints import Endpoint, EndpointPair

T = TypeVar("T")
#: take_any is timed in this many rounds, each against its own dict-lookup baseline (median ratio reported).
TAKE_ANY_ROUNDS = 5
QUICK_BUDGET_S = 20  # what --quick promises; measured ~10 s on an idle 2-core machine (sections print their share)
KERNEL_SLAB_EST = 2700  # bytes of kernel slab per UDP socket on this machine kind (measured-facts.md)

TARGETS = {
    "keepalive_cpu_ratio": 1.3,
    "keyed_keepalive_cpu_ratio": 1.5,  # issue 10: MAC-checked frames, against the same raw baseline
    "memory_ratio": 2.0,
    "handover_p50_ms": 0.5,  # issue 9: over the persistent reference signalling (goal 0.3)
    "handover_p99_ms": 2.0,
    "take_any_ratio": 5.0,
    "expiry_loop_stall_ms": 20.0,
}


@dataclass
class Report:
    """Collected results; ``rows`` is what the plain-text output prints."""

    quick: bool
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, value: Any) -> None:
        self.results[key] = value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small version (under {QUICK_BUDGET_S} s), for smoke tests")
    parser.add_argument("--only", choices=["keepalive", "memory", "handover", "ops", "sim", "survival"],
                        action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--window", type=float, default=None, help="seconds of CPU measurement per setup")
    parser.add_argument("--rounds", type=int, default=None,
                        help="keepalive: interleaved raw/unkeyed/keyed rounds, median ratio (default 3, quick 1)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the keepalive and handover sections (natpool and baselines alike) on uvloop")
    parser.add_argument("--in-process", action="store_true",
                        help="run every section in this interpreter (default: each in a fresh one when more than "
                             "one runs, so one section's heap does not weigh on the next one's figures)")


def run(args: argparse.Namespace) -> int:
    report = Report(quick=bool(args.quick))
    report.put("loop", "uvloop" if args.uvloop and uvloop_available() else "asyncio")
    if args.uvloop and not uvloop_available():
        report.notes.append("--uvloop given but uvloop is not installed: measured on asyncio")
    sections = args.only or ["ops", "memory", "handover", "keepalive", "sim", "survival"]
    started = time.perf_counter()
    section_s: dict[str, float] = {}
    isolate = len(sections) > 1 and not args.in_process
    for name in sections:
        _log(args, f"bench: {name} ...")
        t0 = time.perf_counter()
        if isolate:
            _run_isolated(name, report, args)
        else:
            SECTIONS[name](report, args)
        section_s[name] = round(time.perf_counter() - t0, 2)
    report.put("elapsed_s", round(time.perf_counter() - started, 2))
    report.put("section_s", section_s)
    if report.quick and report.results["elapsed_s"] > QUICK_BUDGET_S:
        report.notes.append(f"--quick took {report.results['elapsed_s']} s, over its {QUICK_BUDGET_S} s budget "
                            f"(per section: {section_s}); a loaded machine, or a section to shrink")
    report.put("targets", _targets(report))
    if args.json:
        print(json.dumps({**report.results, "notes": report.notes}, indent=2, sort_keys=True))
    else:
        _print_table(report)
    return 0


def _run_isolated(name: str, report: Report, args: argparse.Namespace) -> None:
    """Section ``name`` in a fresh interpreter; its figures and notes join ``report``.

    Why: a section leaves its heap behind. After ``ops`` (100k entries, ~750k
    objects freed by the collector) the next section's handover p99 measured
    3.5x higher (7.0 ms against 1.8-2.2 ms) in the same process, while a run
    of its own did not: the figure described the previous section, not the take.
    """
    cmd = [sys.executable, "-m", "natpool", "bench", "--only", name, "--json", "--in-process"]
    if args.quick:
        cmd.append("--quick")
    if args.uvloop:
        cmd.append("--uvloop")
    if args.window is not None:
        cmd += ["--window", str(args.window)]
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - our own module
    if proc.returncode != 0:
        raise RuntimeError(f"bench section {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    child = json.loads(proc.stdout)
    if name in child:
        report.put(name, child[name])
    report.notes.extend(n for n in child.get("notes", []) if n not in report.notes)


def _run(args: argparse.Namespace, coro: Coroutine[Any, Any, T]) -> T:
    """One measurement on a fresh loop: uvloop with ``--uvloop`` (when installed), else asyncio."""
    return aio_run(coro, use_uvloop=bool(args.uvloop))


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr, flush=True)


# --- keepalive CPU -----------------------------------------------------------------------------


def _fd_budget() -> int:
    """Pairs that fit with both ends in one process: raise the soft fd limit to the hard one, keep 200 spare."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(1, (soft - 200) // 2)


async def _cpu_over(window: float) -> float:
    """Process CPU seconds per wall second over ``window`` (the loop keeps running meanwhile)."""
    c0, w0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(window)
    return (time.process_time() - c0) / (time.perf_counter() - w0)


async def _paced(i: int, n: int, t0: float, span: float) -> None:
    """Wait until pair ``i`` of ``n`` is due: both sides add their pairs on the same schedule.

    A pair's ping phase is the time it was added. Unpaced, each side's phases
    spread over its own setup time (the raw baseline adds 1k pairs in ~0.12 s,
    natpool in ~0.5 s), so at 1k pairs the raw side woke ~25 times a second and
    natpool ~130: the ratio compared two schedules, not two implementations.
    Paced, both spread their phases uniformly over one ping interval (pairs
    punched at unrelated times, as in use), so both wake as often.
    """
    delay = t0 + span * i / n - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _keepalive_raw(n: int, interval: float, window: float) -> dict[str, float]:
    raw = RawKeepalive(interval)
    t0 = time.perf_counter()
    for i in range(n):
        await _paced(i, n, t0, interval)
        await raw.add_pair()
    await asyncio.sleep(interval * 1.2)  # every pair has pinged; steady state
    p0, k0 = raw.pongs, raw.wakeups
    w0 = time.perf_counter()
    cpu = await _cpu_over(window)
    elapsed = time.perf_counter() - w0
    rate = (raw.pongs - p0) / elapsed
    wakeups = (raw.wakeups - k0) / elapsed
    raw.close()
    await asyncio.sleep(0)
    return {"cpu": cpu, "exchanges_per_s": rate, "wakeups_per_s": wakeups}


def _bench_key(i: int) -> bytes:
    """A distinct 32-byte key per pair, as the traversal layer would export one per pair."""
    return hashlib.blake2b(i.to_bytes(8, "big"), person=b"natpool-bench").digest()[:32]


async def _keepalive_natpool(n: int, interval: float, window: float, keyed: bool = False) -> dict[str, float]:
    """natpool's keepalive CPU; ``keyed``: every pair with its own key (34-byte MAC'd frames)."""
    cfg = PairConfig(ping_interval=interval, no_inbound_timeout=max(30.0, 10 * interval),
                     ping_lifespan=min(2.0, interval))
    async with AsyncPairPool("a", cfg) as a, AsyncPairPool("b", cfg) as b:
        pingers = []
        t0 = time.perf_counter()
        for i in range(n):
            await _paced(i, n, t0, interval)
            sa, sb = open_udp(), open_udp()
            pair = EndpointPair(Endpoint("a", "127.0.0.1", sa.getsockname()[1]),
                                Endpoint("b", "127.0.0.1", sb.getsockname()[1]), i + 1)
            key = _bench_key(i) if keyed else None
            pingers.append(await a.add(pair, True, sock=sa, key=key))
            await b.add(pair, False, sock=sb, key=key)
        await asyncio.sleep(interval * 1.2)
        r0 = sum(e.stats.received for e in pingers)
        k0 = a.stats.timer_wakeups + b.stats.timer_wakeups
        w0 = time.perf_counter()
        cpu = await _cpu_over(window)
        elapsed = time.perf_counter() - w0
        rate = (sum(e.stats.received for e in pingers) - r0) / elapsed
        wakeups = (a.stats.timer_wakeups + b.stats.timer_wakeups - k0) / elapsed  # both pools' timers
        alive = len(a)
    return {"cpu": cpu, "exchanges_per_s": rate, "alive": alive, "wakeups_per_s": wakeups}


def _core_us_per_exchange(n: int, rounds: int, keyed: bool = False) -> float:
    """CPU of the sans-IO core alone per ping/pong exchange (two Nodes, no sockets): the driver's floor.

    The same calls the asyncio driver makes: ``handle_timer`` and ``datagrams_to_send`` for the pings,
    ``receive_and_reply`` for each datagram (the ponger's answer comes back in that call), ``get_timer``.
    """
    cfg = PairConfig(ping_interval=1.0, no_inbound_timeout=30.0, ping_lifespan=1.0)
    a, b = Node("a", cfg), Node("b", cfg)
    for i in range(n):
        pair = EndpointPair(Endpoint("a", "127.0.0.1", 1 + i % 60000), Endpoint("b", "127.0.0.2", 1 + i % 60000),
                            i + 1)
        key = _bench_key(i) if keyed else None
        a.add(pair, True, 0.0, key=key)
        b.add(pair, False, 0.0, key=key)

    def one_round(now: float) -> None:
        a.handle_timer(now)
        for nonce, data, _ in a.datagrams_to_send(now):
            replies = b.receive_and_reply(nonce, data, ("127.0.0.1", 1 + (nonce - 1) % 60000), now)
            if isinstance(replies, list):
                for pong, _addr in replies:
                    a.receive_and_reply(nonce, pong, ("127.0.0.2", 1 + (nonce - 1) % 60000), now)
        a.get_timer()
        b.get_timer()

    one_round(0.0)
    t0 = time.process_time()
    for r in range(1, rounds + 1):
        one_round(float(r))
    return 1e6 * (time.process_time() - t0) / (rounds * n)


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (the ratios are taken per round, see _keepalive)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _keepalive(report: Report, args: argparse.Namespace) -> None:
    interval = 1.0
    window = args.window or (1.0 if report.quick else 5.0)
    budget = _fd_budget()
    sizes = [1000] if report.quick else [1000, 10_000]  # quick: one size; each costs ~5 s of settle + window
    rounds = args.rounds or (1 if report.quick else 3)
    out: dict[str, Any] = {"interval_s": interval, "window_s": window, "fd_pair_budget": budget,
                           "ping_phases": "uniform over one interval, both sides (see _paced)"}
    for requested in sizes:
        n = min(requested, budget)
        if n < requested:
            report.notes.append(f"keepalive: {requested} pairs with both ends need {2 * requested} sockets; "
                                f"the open-file limit allows {n} pairs, measured those")
        # ABAB: raw, unkeyed and keyed runs interleaved (the order rotating each round), each ratio taken within
        # its round and the median reported, so one loaded moment on a shared machine moves one round only.
        setups: dict[str, Callable[[], Coroutine[Any, Any, dict[str, float]]]] = {
            "raw": lambda: _keepalive_raw(n, interval, window),  # noqa: B023 - called within this iteration
            "unkeyed": lambda: _keepalive_natpool(n, interval, window),  # noqa: B023
            "keyed": lambda: _keepalive_natpool(n, interval, window, keyed=True),  # noqa: B023
        }
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in setups}
        kinds = list(setups)
        for r in range(rounds):
            for kind in kinds[r % 3:] + kinds[:r % 3]:
                gc.collect()
                runs[kind].append(_run(args, setups[kind]()))
        raw = _median_run(runs["raw"])
        nat = _median_run(runs["unkeyed"])
        keyed = _median_run(runs["keyed"])
        round_ratios = [u["cpu"] / b["cpu"] for b, u in zip(runs["raw"], runs["unkeyed"], strict=True) if b["cpu"] > 0]
        keyed_round_ratios = [k["cpu"] / b["cpu"] for b, k in zip(runs["raw"], runs["keyed"], strict=True)
                              if b["cpu"] > 0]
        core_us = _core_us_per_exchange(min(n, 2000), 5 if report.quick else 20)
        keyed_core_us = _core_us_per_exchange(min(n, 2000), 5 if report.quick else 20, keyed=True)
        out[str(requested)] = {
            "pairs": n,
            "raw_us_per_exchange": round(1e6 * raw["cpu"] / max(1.0, raw["exchanges_per_s"]), 2),
            "natpool_us_per_exchange": round(1e6 * nat["cpu"] / max(1.0, nat["exchanges_per_s"]), 2),
            "core_only_us_per_exchange": round(core_us, 2),
            "raw_cpu_pct": round(100 * raw["cpu"], 2),
            "natpool_cpu_pct": round(100 * nat["cpu"], 2),
            "rounds": rounds,
            "ratio": round(statistics.median(round_ratios), 2) if round_ratios else None,
            "round_ratios": [round(x, 2) for x in round_ratios],
            # Per exchange: above ``ratio`` when natpool completed fewer exchanges (the CPU ratio flatters it).
            "ratio_per_exchange": (round(nat["cpu"] * raw["exchanges_per_s"] / (raw["cpu"] * nat["exchanges_per_s"]),
                                         2) if raw["cpu"] > 0 and nat["exchanges_per_s"] > 0 else None),
            "raw_exchanges_per_s": round(raw["exchanges_per_s"], 1),
            # Timer wake-ups per second: the raw baseline schedules each pair at now + interval (one wake-up
            # per distinct phase, within 1 ms); natpool's pings share PING_TICKS grid points per interval.
            "raw_wakeups_per_s": round(raw["wakeups_per_s"], 1),
            "natpool_wakeups_per_s": round(nat["wakeups_per_s"], 1),
            "natpool_exchanges_per_s": round(nat["exchanges_per_s"], 1),
            "natpool_alive": nat["alive"],
            # Keyed keepalives (issue 10): the same run with a key per pair, against the same raw baseline.
            "keyed_cpu_pct": round(100 * keyed["cpu"], 2),
            "keyed_ratio": round(statistics.median(keyed_round_ratios), 2) if keyed_round_ratios else None,
            "keyed_round_ratios": [round(x, 2) for x in keyed_round_ratios],
            "keyed_ratio_per_exchange": (
                round(keyed["cpu"] * raw["exchanges_per_s"] / (raw["cpu"] * keyed["exchanges_per_s"]), 2)
                if raw["cpu"] > 0 and keyed["exchanges_per_s"] > 0 else None),
            "keyed_us_per_exchange": round(1e6 * keyed["cpu"] / max(1.0, keyed["exchanges_per_s"]), 2),
            "keyed_core_only_us_per_exchange": round(keyed_core_us, 2),
            "keyed_exchanges_per_s": round(keyed["exchanges_per_s"], 1),
            "keyed_alive": keyed["alive"],
        }
    report.put("keepalive", out)


# --- memory ------------------------------------------------------------------------------------


def _memory_probe(kind: str, n: int, metric: str) -> float:
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        [sys.executable, "-m", "natpool.bench.memory", kind, str(n), metric],
        capture_output=True, text=True, check=True, timeout=120,
    )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["bytes_per_endpoint"])


def _memory(report: Report, args: argparse.Namespace) -> None:
    n = 500 if report.quick else 4000  # quick: the tracemalloc probe is the slow one (~4 s at 1000 pairs)
    out: dict[str, Any] = {"pairs": n, "unit": "bytes per endpoint (one pair on one node)"}
    for metric in ("rss", "heap"):
        row: dict[str, Any] = {k: round(_memory_probe(k, n, metric)) for k in ("socket", "asyncio", "natpool")}
        # A bare socket's user-space RSS (~0.1 KB) is near the page-granular resolution of RSS deltas.
        row["ratio_vs_socket"] = round(row["natpool"] / row["socket"], 2) if row["socket"] >= 16 else None
        row["ratio_vs_asyncio_endpoint"] = round(row["natpool"] / max(1, row["asyncio"]), 2)
        # Estimate only: adds the kernel's per-UDP-socket slab from shared/notes/measured-facts.md to both.
        row["ratio_vs_socket_incl_kernel_est"] = round((row["natpool"] + KERNEL_SLAB_EST) /
                                                       (row["socket"] + KERNEL_SLAB_EST), 2)
        out[metric] = row
    report.notes.append("memory: RSS and tracemalloc are user space only; the kernel adds ~2.7 KB of slab per "
                        "UDP socket to every row alike")
    report.put("memory", out)


# --- pool operations ---------------------------------------------------------------------------


def _cpu_probe() -> None:
    """Fixed pure-Python work (~3.3 ms on an idle machine of this kind): a gauge of the machine's own speed."""
    total = 0
    for i in range(100_000):
        total += i


#: What :func:`_c_probe` hashes: 1 MiB, made once and written (not calloc's untouched zero pages, whose first
#: read would fault them in inside the first sample).
_C_PROBE_DATA = bytes(range(256)) * 4096


def _c_probe() -> None:
    """Fixed work in C (SHA-256 of 1 MiB, ~0.7 ms here): the reference :func:`_cpu_probe` is read against.

    Why both: on this machine kind the pure-Python probe's time moves by 2x
    and more within a minute while this one stays much steadier (measured in
    20 handover runs, 11 samples each: 3.10-9.79 ms against 0.68-1.07 ms; the
    C probe's median 0.68-0.74 ms in every run). A slow phase of the host
    then shows as a slow Python probe next to a steady C one: the interpreter
    itself ran slower, and every figure made of Python code with it.
    """
    hashlib.sha256(_C_PROBE_DATA).digest()


class _MachineProbe:
    """Both probes, sampled together between timed spans (never inside one)."""

    def __init__(self) -> None:
        self.python: list[float] = []
        self.c: list[float] = []

    def sample(self) -> None:
        self.python.append(_per_op(_cpu_probe, 1))
        self.c.append(_per_op(_c_probe, 1))

    def figures(self) -> dict[str, dict[str, float]]:
        """``machine_probe_ms`` (the pure-Python probe) and ``machine_probe_c_ms`` (the C one)."""
        return {"machine_probe_ms": _probe_figures(self.python), "machine_probe_c_ms": _probe_figures(self.c)}


def _probe_figures(probes: list[float]) -> dict[str, float]:
    """One probe's times in ms: min, median, max, max/min and the sample count (a shared VM's speed moves 2x+)."""
    return {"min": round(min(probes) * 1e3, 2), "median": round(statistics.median(probes) * 1e3, 2),
            "max": round(max(probes) * 1e3, 2), "max_over_min": round(max(probes) / min(probes), 2),
            "samples": len(probes)}


class _HoldTimer:
    """A lock wrapper that records each hold, from just after acquire to just before release."""

    __slots__ = ("_lock", "_out", "_t0")

    def __init__(self, lock: threading.Lock, out: list[float]) -> None:
        self._lock, self._out, self._t0 = lock, out, 0.0

    def acquire(self) -> bool:
        got = self._lock.acquire()
        self._t0 = time.perf_counter()
        return got

    def release(self) -> None:
        self._out.append(time.perf_counter() - self._t0)
        self._lock.release()


def _per_op(fn: Callable[[], None], ops: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / ops


def _ops(report: Report, args: argparse.Namespace) -> None:
    n = 20_000 if report.quick else 100_000
    claims = 500 if report.quick else 3000
    pairs = [EndpointPair(Endpoint("a", "127.0.0.1", 1 + i % 60000), Endpoint("b", "127.0.0.1", 1 + i % 60000),
                          i + 1) for i in range(n)]
    keys = [p.nonce for p in pairs]
    lookups = random.Random(1).choices(keys, k=n)  # noqa: S311 - a benchmark's lookup order
    quiet = PairConfig(ping_interval=3600.0, no_inbound_timeout=7200.0)
    pool = PairPool("a", quiet)
    d: dict[int, EndpointPair] = {}

    def dict_insert() -> None:
        for p in pairs:
            d[p.nonce] = p

    def pool_add() -> None:
        for p in pairs:
            pool.add(p, False, 0.0)

    def dict_get() -> None:
        for k in lookups:
            d[k]

    def pool_get() -> None:
        get = pool.get
        for k in lookups:
            get(k)

    def dict_take() -> None:
        for k in keys[:claims]:
            d.pop(k)

    def pool_take_any() -> None:
        claim_any = pool.claim_any
        for _ in range(claims):
            claim_any("b", 1.0)

    hold: list[float] = []
    per_call: list[float] = []

    def pool_take_any_each() -> None:
        # Each claim_any timed on its own (lock included): the p50 the issue asks for.
        claim_any, clock = pool.claim_any, time.perf_counter
        for _ in range(claims):
            t0 = clock()
            claim_any("b", 1.0)
            per_call.append(clock() - t0)

    def pool_take_any_hold() -> None:
        # What claim_any does while holding the pool lock, timed from inside the lock: the pool's lock is
        # swapped for one that reads the clock once acquired and again before releasing.
        real = pool.lock
        pool.lock = _HoldTimer(real, hold)  # type: ignore[assignment]  # duck-typed: acquire/release only
        try:
            claim_any = pool.claim_any
            for _ in range(claims):
                claim_any("b", 1.0)
        finally:
            pool.lock = real

    gc.collect()
    gc.disable()
    try:
        t_dict_insert = _per_op(dict_insert, n)
        t_add = _per_op(pool_add, n)
        # Interleaved rounds (lookup, take_any, lookup, ...), each ratio within its round, the median reported:
        # one loaded moment on a shared machine then moves one round, not the figure.
        rounds: list[tuple[float, float]] = []
        machine = _MachineProbe()
        for _ in range(TAKE_ANY_ROUNDS):
            machine.sample()
            base = _per_op(dict_get, n)
            rounds.append((base, _per_op(pool_take_any, claims)))
        machine.sample()
        t_dict_get = statistics.median(b for b, _ in rounds)
        t_take_any = statistics.median(t for _, t in rounds)
        take_any_ratio = statistics.median(t / b for b, t in rounds)
        t_get = _per_op(pool_get, n)
        pool_take_any_hold()
        pool_take_any_each()
        t_dict_take = _per_op(dict_take, claims)
        # The claims' events, drained as a driver does: the claim queues them, next_event builds them.
        queued = pool.pending_events
        t_drain = _per_op(lambda: _drain(pool), max(1, queued // 2))
    finally:
        gc.enable()
    # For comparison: one general lifecycle transition (what claim_any steps inline for a drained entry, and
    # what a claim with pings outstanding, listeners or strict mode pays), on an entry outside any pool.
    from natpool.core.entry import PairEntry

    probe = PairEntry(pairs[0], "a", False, quiet, 0.0)

    def transitions() -> None:
        for _ in range(100):
            probe.begin_lock(1.0)
            probe.abort_lock(1.0)

    gc.disable()
    try:
        t_machine = _per_op(transitions, 200)
    finally:
        gc.enable()
    report.put("ops", {
        "pairs": n,
        "add_us": round(t_add * 1e6, 3), "dict_insert_us": round(t_dict_insert * 1e6, 3),
        "add_ratio": round(t_add / t_dict_insert, 1),
        "get_us": round(t_get * 1e6, 3), "dict_get_us": round(t_dict_get * 1e6, 3),
        "get_ratio": round(t_get / t_dict_get, 1),
        "take_any_us": round(t_take_any * 1e6, 3), "dict_pop_us": round(t_dict_take * 1e6, 3),
        "take_any_ratio": round(take_any_ratio, 1),
        "take_any_round_ratios": [round(t / b, 2) for b, t in rounds],
        "take_any_samples": claims,
        # next_event for one claim's two events (StateChanged, Drained): what a driver pays later, per claim.
        "take_any_events_drain_us": round(t_drain * 1e6, 3),
        "take_any_p50_us": round(statistics.median(per_call) * 1e6, 3),
        "take_any_p50_ratio": round(statistics.median(per_call) / t_dict_get, 1),
        "take_any_lock_hold_us": {"p50": round(statistics.median(hold) * 1e6, 2),
                                  "p99": round(statistics.quantiles(hold, n=100)[98] * 1e6, 2)},
        "machine_transition_us": round(t_machine * 1e6, 2),
        # The same fixed work (pure Python, and C beside it), timed before, between and after the rounds: how much
        # the machine's own speed moved while they ran (a shared VM's does, by 2x and more within seconds).
        **machine.figures(),
        "expiry": expiry_figures(500 if report.quick else 2000, lambda coro: _run(args, coro)),
    })
    report.notes.append("ops: take_any = PairPool.claim_any (lock + idle index + the claim stepping the compiled "
                        "Entry table's row inline, its two events queued as markers and the lock deadline's FIFO "
                        "slot); its ratio is against a dict lookup (median of interleaved rounds); building the "
                        "two events when next_event hands them out is take_any_events_drain_us; the lock hold is timed "
                        "inside the lock; machine_transition_us is one general begin_lock/abort_lock transition, "
                        "for comparison")


# --- handover latency --------------------------------------------------------------------------


def _drain(pool: PairPool) -> None:
    next_event = pool.next_event
    while next_event() is not None:
        pass


def _handover(report: Report, args: argparse.Namespace) -> None:
    count = 50 if report.quick else 400
    out: dict[str, Any] = {"takes": count}
    rtts = _run(args, udp_rtts(count * 4))
    tcp = _run(args, tcp_exchange_times(count))
    out["udp_rtt_us"] = _pcts(rtts)
    out["tcp_connect_2rt_us"] = _pcts(tcp)
    try:
        from natpool.bench.handover import handover_times, open_exchange_times
    except ImportError as exc:  # the handover driver is not there yet
        report.notes.append(f"handover: not measured ({exc})")
        report.put("handover", out)
        return
    machine = _MachineProbe()  # around and during the two runs the bar is judged on (see _c_probe)
    machine.sample()
    out["open_conn_2rt_us"] = _pcts(_run(args, open_exchange_times(count * 2)))
    machine.sample()
    times = _run(args, handover_times(count, gauge=machine.sample))
    machine.sample()
    out.update(machine.figures())
    out["handover_us"] = _pcts(times)  # persistent reference signalling (the default)
    out["p50_vs_open_conn_2rt"] = round(out["handover_us"]["p50"] / out["open_conn_2rt_us"]["p50"], 1)
    out["p99_vs_open_conn_2rt"] = round(out["handover_us"]["p99"] / out["open_conn_2rt_us"]["p99"], 1)
    out["handover_per_take_tcp_us"] = pt = _pcts(_run(args, handover_times(count, transport="tcp-per-take")))
    out["per_take_p50_vs_tcp_exchange"] = round(pt["p50"] / out["tcp_connect_2rt_us"]["p50"], 2)
    out["handover_memory_signalling_us"] = _pcts(_run(args, handover_times(count, transport="memory")))
    # Issue 10: the same takes with signing — a key per pair (MAC'd keepalives, signed fresh signals) over
    # the persistent signalling with the authenticated (challenge-response) hello; the ratio is against the
    # unkeyed figure of this run.
    out["handover_keyed_us"] = ky = _pcts(_run(args, handover_times(count, keyed=True)))
    out["keyed_p50_vs_unkeyed"] = round(ky["p50"] / out["handover_us"]["p50"], 2)
    out["keyed_p99_vs_unkeyed"] = round(ky["p99"] / out["handover_us"]["p99"], 2)
    out["keyed_p50_vs_open_conn_2rt"] = round(ky["p50"] / out["open_conn_2rt_us"]["p50"], 1)
    # The deployed shape: the peer pool in a child process (its own loop, its own core). Reported next to the
    # raw exchange across the same boundary; the bar stays judged on the one-loop figure above.
    from natpool.bench.two_process import handover_times_two_process, open_exchange_times_two_process
    try:
        raw2 = _pcts(_run(args, open_exchange_times_two_process(count * 2)))
        tp = _pcts(_run(args, handover_times_two_process(count)))
    except (OSError, RuntimeError) as exc:  # no child process here (a sandbox without multiprocessing, say)
        report.notes.append(f"handover: two-process figure not measured ({exc!r})")
    else:
        out["open_conn_2rt_two_process_us"] = raw2
        out["handover_two_process_us"] = tp
        out["two_process_p50_vs_open_conn_2rt"] = round(tp["p50"] / raw2["p50"], 1)
        out["two_process_p99_vs_open_conn_2rt"] = round(tp["p99"] / raw2["p99"], 1)
    out["p50_vs_udp_rtt"] = round(out["handover_us"]["p50"] / out["udp_rtt_us"]["p50"], 1)
    out["p50_vs_tcp_exchange"] = round(out["handover_us"]["p50"] / out["tcp_connect_2rt_us"]["p50"], 2)
    report.put("handover", out)


# --- simulator speed ---------------------------------------------------------------------------


def _sim(report: Report, args: argparse.Namespace) -> None:
    """Virtual seconds per wall second of the deterministic simulator (what bounds the stateful tests)."""
    from natpool.sim.bench import bench_ratio

    runs = [(100, 60.0)] if report.quick else [(100, 600.0), (1000, 120.0)]
    out: dict[str, Any] = {}
    for pairs, virtual in runs:
        gc.collect()
        res = bench_ratio(pairs=pairs, virtual_seconds=virtual)
        out[str(pairs)] = {
            "pairs": pairs, "virtual_s": virtual, "wall_s": round(res.wall_seconds, 3),
            "virtual_per_wall": round(res.ratio, 1), "datagrams": res.datagrams, "events": res.events,
            "wall_us_per_datagram": round(1e6 * res.wall_seconds / max(1, res.datagrams), 2),
        }
    report.put("sim", out)


def _survival(report: Report, args: argparse.Namespace) -> None:
    """Keepalive survival at 10/30/50 % loss on the simulator, defaults vs the old 5 s / 21 s (natpool.sim.survival)."""
    from natpool.sim.survival import bench_figure

    report.put("survival", bench_figure(quick=report.quick))


def _pcts(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=100, method="inclusive") if len(s) > 1 else [s[0]] * 99
    return {"p50": round(q[49] * 1e6, 1), "p99": round(q[98] * 1e6, 1), "n": len(s)}


SECTIONS: dict[str, Callable[[Report, argparse.Namespace], None]] = {
    "keepalive": _keepalive,
    "memory": _memory,
    "handover": _handover,
    "ops": _ops,
    "sim": _sim,
    "survival": _survival,
}


# --- output ------------------------------------------------------------------------------------


def _targets(report: Report) -> dict[str, Any]:
    r = report.results
    out: dict[str, Any] = {}
    ka = r.get("keepalive", {})
    ratios = [v["ratio"] for k, v in ka.items() if isinstance(v, dict) and v.get("ratio") is not None]
    if ratios:
        worst = max(ratios)
        out["keepalive_cpu_ratio"] = {"value": worst, "target": TARGETS["keepalive_cpu_ratio"],
                                      "met": worst <= TARGETS["keepalive_cpu_ratio"]}
    keyed = [v["keyed_ratio"] for v in ka.values() if isinstance(v, dict) and v.get("keyed_ratio") is not None]
    if keyed:
        worst = max(keyed)
        out["keyed_keepalive_cpu_ratio"] = {"value": worst, "target": TARGETS["keyed_keepalive_cpu_ratio"],
                                            "met": worst <= TARGETS["keyed_keepalive_cpu_ratio"]}
    if "memory" in r:
        v = r["memory"]["rss"]["ratio_vs_socket"] or r["memory"]["heap"]["ratio_vs_socket"]
        out["memory_ratio_vs_socket"] = {"value": v, "target": TARGETS["memory_ratio"],
                                         "met": v is not None and v <= TARGETS["memory_ratio"]}
        v = r["memory"]["rss"]["ratio_vs_asyncio_endpoint"]
        out["memory_ratio_vs_asyncio_endpoint"] = {"value": v, "target": TARGETS["memory_ratio"],
                                                   "met": v <= TARGETS["memory_ratio"]}
    ho = r.get("handover", {}).get("handover_us")
    if ho:
        for p in ("p50", "p99"):
            ms = ho[p] / 1000
            out[f"handover_{p}_ms"] = {"value": round(ms, 3), "target": TARGETS[f"handover_{p}_ms"],
                                       "met": ms <= TARGETS[f"handover_{p}_ms"]}
    if "ops" in r:
        v = r["ops"]["take_any_ratio"]
        out["take_any_ratio"] = {"value": v, "target": TARGETS["take_any_ratio"], "met": v <= TARGETS["take_any_ratio"]}
        v = r["ops"]["expiry"]["expiry_loop_stall_ms"]
        out["expiry_loop_stall_ms"] = {"value": v, "target": TARGETS["expiry_loop_stall_ms"],
                                       "met": v <= TARGETS["expiry_loop_stall_ms"]}
    return out


def _print_table(report: Report) -> None:
    r = report.results
    per = ", ".join(f"{k} {v} s" for k, v in r.get("section_s", {}).items())
    print(f"natpool bench{' --quick' if report.quick else ''}  (python {sys.version.split()[0]}, {r['loop']}, "
          f"elapsed {r.get('elapsed_s')} s: {per})")
    if "keepalive" in r:
        ka = r["keepalive"]
        print(f"\nkeepalive CPU, % of one core, both ends in one process, 1 ping/{ka['interval_s']:g}s, "
              f"{ka['window_s']:g}s window")
        print(f"  {'pairs':>8} {'raw %':>8} {'natpool %':>10} {'ratio':>7} {'raw ex/s':>10} {'natpool ex/s':>13} "
              f"{'µs/ex raw':>10} {'natpool':>8} {'core alone':>11}")
        for v in ka.values():
            if isinstance(v, dict):
                print(f"  {v['pairs']:>8} {v['raw_cpu_pct']:>8.2f} {v['natpool_cpu_pct']:>10.2f} "
                      f"{v['ratio']!s:>7} {v['raw_exchanges_per_s']:>10.0f} {v['natpool_exchanges_per_s']:>13.0f} "
                      f"{v['raw_us_per_exchange']:>10} {v['natpool_us_per_exchange']:>8} "
                      f"{v['core_only_us_per_exchange']:>11}")
        print("  (core alone = two sans-IO Nodes exchanging the same frames with no sockets: the part of "
              "natpool's cost the driver cannot remove)")
        wakes = [f"{v['pairs']}: raw {v['raw_wakeups_per_s']:.0f}, natpool {v['natpool_wakeups_per_s']:.0f}"
                 for v in ka.values() if isinstance(v, dict) and "raw_wakeups_per_s" in v]
        print(f"  timer wake-ups/s ({'; '.join(wakes)}): raw schedules each pair at now + interval, natpool's "
              "pings share 64 grid points per interval")
        print(f"  keyed (a key per pair, 34-byte MAC'd frames), same raw baseline:\n"
              f"  {'pairs':>8} {'keyed %':>8} {'ratio':>7} {'unkeyed':>8} {'keyed ex/s':>11} {'µs/ex':>8} "
              f"{'core alone':>11}")
        for v in ka.values():
            if isinstance(v, dict) and "keyed_ratio" in v:
                print(f"  {v['pairs']:>8} {v['keyed_cpu_pct']:>8.2f} {v['keyed_ratio']!s:>7} {v['ratio']!s:>8} "
                      f"{v['keyed_exchanges_per_s']:>11.0f} {v['keyed_us_per_exchange']:>8} "
                      f"{v['keyed_core_only_us_per_exchange']:>11}")
    if "memory" in r:
        m = r["memory"]
        print(f"\nmemory per endpoint ({m['pairs']} pairs, both ends)")
        for metric in ("rss", "heap"):
            row = m[metric]
            print(f"  {metric:>5}: bare socket {row['socket']} B, asyncio endpoint {row['asyncio']} B, "
                  f"natpool {row['natpool']} B  -> {row['ratio_vs_socket']}x socket, "
                  f"{row['ratio_vs_asyncio_endpoint']}x asyncio endpoint; with the kernel's ~2.7 KB/socket "
                  f"(estimate) {row['ratio_vs_socket_incl_kernel_est']}x socket")
    if "handover" in r:
        h = r["handover"]
        print("\nhandover latency on loopback (µs)")
        print(f"  raw UDP RTT          p50 {h['udp_rtt_us']['p50']:>9} p99 {h['udp_rtt_us']['p99']:>9}")
        print(f"  raw TCP connect+2RT  p50 {h['tcp_connect_2rt_us']['p50']:>9} "
              f"p99 {h['tcp_connect_2rt_us']['p99']:>9}")
        if "handover_us" in h:
            print(f"  raw 2RT, open conn.  p50 {h['open_conn_2rt_us']['p50']:>9} p99 {h['open_conn_2rt_us']['p99']:>9}")
            print(f"  natpool take()       p50 {h['handover_us']['p50']:>9} p99 {h['handover_us']['p99']:>9}"
                  f"   ({h['p50_vs_open_conn_2rt']}x / {h['p99_vs_open_conn_2rt']}x raw 2RT on an open connection;"
                  f" persistent signalling)")
            pt = h["handover_per_take_tcp_us"]
            print(f"  same, per-take TCP   p50 {pt['p50']:>9} p99 {pt['p99']:>9}"
                  f"   ({h['per_take_p50_vs_tcp_exchange']}x TCP connect+2RT)")
            m = h["handover_memory_signalling_us"]
            print(f"  same, in-process signalling p50 {m['p50']:>9} p99 {m['p99']:>9}   (protocol cost without TCP)")
            k = h["handover_keyed_us"]
            print(f"  keyed (signed)       p50 {k['p50']:>9} p99 {k['p99']:>9}   ({h['keyed_p50_vs_unkeyed']}x / "
                  f"{h['keyed_p99_vs_unkeyed']}x unkeyed; a key per pair, authenticated hello)")
            mp, mc = h["machine_probe_ms"], h["machine_probe_c_ms"]
            print(f"  the same fixed work took {mp['min']}–{mp['max']} ms (median {mp['median']}) in Python "
                  f"({mp['max_over_min']}x) and {mc['min']}–{mc['max']} ms in C ({mc['max_over_min']}x), "
                  f"{mp['samples']} samples around and during the raw 2RT and take() runs: the machine's own "
                  f"speed while they ran")
        if "handover_two_process_us" in h:
            r2, t2 = h["open_conn_2rt_two_process_us"], h["handover_two_process_us"]
            print("  two processes (the peer in a child process, as deployed; the bar is judged on the figures above):")
            print(f"    raw 2RT, open conn. p50 {r2['p50']:>9} p99 {r2['p99']:>9}   (a cross-process wake-up per hop)")
            print(f"    natpool take()      p50 {t2['p50']:>9} p99 {t2['p99']:>9}   "
                  f"({h['two_process_p50_vs_open_conn_2rt']}x / {h['two_process_p99_vs_open_conn_2rt']}x that raw 2RT)")
    if "ops" in r:
        o = r["ops"]
        print(f"\npool operations at {o['pairs']} pairs (sans-IO PairPool vs dict), µs per op")
        print(f"  add       {o['add_us']:>9} vs insert {o['dict_insert_us']:>7}  ({o['add_ratio']}x)")
        print(f"  get       {o['get_us']:>9} vs lookup {o['dict_get_us']:>7}  ({o['get_ratio']}x)")
        print(f"  take_any  {o['take_any_us']:>9} vs lookup {o['dict_get_us']:>7}  ({o['take_any_ratio']}x); "
              f"one general transition (what its inline row replaces) {o['machine_transition_us']} µs")
        m, mc = o["machine_probe_ms"], o["machine_probe_c_ms"]
        print(f"  the same fixed work took {m['min']}–{m['max']} ms in Python ({m['max_over_min']}x) and "
              f"{mc['min']}–{mc['max']} ms in C ({mc['max_over_min']}x) across those rounds: the machine's own "
              f"speed while they ran")
        h = o["take_any_lock_hold_us"]
        print(f"  take_any holds the pool lock p50 {h['p50']} µs, p99 {h['p99']} µs (the CAS: idle index + "
              f"the claim's row, events and lock slot; timed inside the lock)")
        print(f"  take_any per call p50 {o['take_any_p50_us']} µs ({o['take_any_p50_ratio']}x lookup); its two events "
              f"drained later {o['take_any_events_drain_us']} µs")
        x = o["expiry"]
        print(f"  {x['entries']} expiries at once: event loop stalled {x['expiry_loop_stall_ms']} ms (quiet loop "
              f"{x['quiet_loop_max_iteration_ms']} ms); core {x['expiry_us_per_entry']} µs/expiry, "
              f"{x['removal_us_per_entry']} µs/removal (dict delete {x['dict_delete_us']} µs)")
    if "sim" in r:
        print("\nsimulator (2 nodes, default PairConfig, virtual clock), no target")
        for v in r["sim"].values():
            print(f"  {v['pairs']:>6} pairs: {v['virtual_s']:g} s virtual in {v['wall_s']} s wall -> "
                  f"{v['virtual_per_wall']:,}x real time ({v['datagrams']} datagrams, "
                  f"{v['wall_us_per_datagram']} µs wall each)")
    if "survival" in r:
        from natpool.sim.survival import format_figure

        print("\n" + format_figure(r["survival"]))
    print("\ntargets (reported, not asserted)")
    for key, t in r.get("targets", {}).items():
        print(f"  {key:<34} {t['value']!s:>8}  target <= {t['target']:<5} {'met' if t['met'] else 'MISSED'}")
    for note in report.notes:
        print(f"note: {note}")
