"""In-memory UDP network with seeded loss, duplication, delay/reordering and partitions.

Every random choice comes from one ``random.Random`` handed in by the
simulation, so the same seed replays the same fates. Reordering is not a
separate knob: each copy of a datagram gets its own delay drawn from
``[delay_min, delay_max]``, so any spread lets later datagrams overtake.

For exhaustive/stateful tests a link (or the whole network) can be put in
``manual`` mode: datagrams then wait in :attr:`Network.in_flight` until the
test calls :meth:`Network.deliver`, :meth:`Network.drop` or
:meth:`Network.duplicate`, so hypothesis can choose every fate itself.

For scripted faults on a timed (non-manual) network, :attr:`Network.fate`
decides per datagram how many copies travel ("lose exactly the pong of the
ping in flight", "duplicate everything from now on"), instead of the
link's random ``loss``/``duplicate``; :attr:`Network.in_transit` counts the
copies still on their way, so a test can run until the wire is empty.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from natpool.sim.clock import Scheduler, SimulationError

Addr = tuple[str, int]
Handler = Callable[[bytes, Addr, Addr], None]  # (data, src, dst)
#: Per-datagram fate hook: the datagram as sent -> how many copies travel (0 = lost, 2 = duplicated).
Fate = Callable[["InFlight"], int]


class HasHost(Protocol):
    @property
    def host(self) -> str: ...


HostLike = str | HasHost


def _host(x: HostLike) -> str:
    return x if isinstance(x, str) else x.host


@dataclass(frozen=True, slots=True)
class NetConfig:
    """Fate of datagrams on a link. Probabilities are per datagram; delays in virtual seconds.

    ``loss`` is drawn once per datagram; a surviving datagram is duplicated
    with probability ``duplicate`` and every copy gets its own delay.
    ``manual`` ignores all three: datagrams queue in ``Network.in_flight``.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    delay_min: float = 0.01
    delay_max: float = 0.01
    manual: bool = False

    def __post_init__(self) -> None:
        if not (0.0 <= self.loss <= 1.0 and 0.0 <= self.duplicate <= 1.0):
            raise SimulationError(f"loss/duplicate must be probabilities, got {self.loss}/{self.duplicate}")
        if not 0.0 <= self.delay_min <= self.delay_max:
            raise SimulationError(f"need 0 <= delay_min <= delay_max, got {self.delay_min}..{self.delay_max}")


@dataclass(slots=True)
class InFlight:
    """One datagram copy on its way. ``id`` is shared by duplicates of one send; ``copy`` tells them apart."""

    id: int
    src: Addr
    dst: Addr
    data: bytes
    sent_at: float
    copy: int = 0


@dataclass(slots=True)
class NetStats:
    """What happened to datagram copies (``sent`` counts sends, the rest count copies)."""

    sent: int = 0
    delivered: int = 0
    lost: int = 0  # random loss
    partitioned: int = 0  # dropped at send or on arrival because the hosts were partitioned
    duplicated: int = 0  # extra copies created (random or manual)
    unowned: int = 0  # arrived at an address nobody has bound
    dropped_manually: int = 0
    dropped_by_fate: int = 0  # the ``fate`` hook chose 0 copies


class Network:
    """Datagram transport between bound ``(host, port)`` addresses; see the module docstring."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, config: NetConfig | None = None) -> None:
        self.scheduler = scheduler
        self.rng = rng
        self.config = config if config is not None else NetConfig()
        self.stats = NetStats()
        self.in_flight: list[InFlight] = []  # manual-mode datagrams, oldest first
        #: When set, decides the number of copies of every datagram sent on a non-manual link
        #: (after partitions, instead of the link's random loss/duplicate; delays stay random).
        self.fate: Fate | None = None
        self.in_transit = 0  # timed-mode copies scheduled and not yet arrived (or lost on arrival)
        self._bindings: dict[Addr, Handler] = {}
        self._links: dict[tuple[str, str], NetConfig] = {}
        self._partitions: set[frozenset[str]] = set()
        self._isolated: set[str] = set()
        self._next_id = 0

    # --- addresses ------------------------------------------------------------

    def bind(self, addr: Addr, handler: Handler) -> None:
        if addr in self._bindings:
            raise SimulationError(f"address {addr} is already bound")
        self._bindings[addr] = handler

    def unbind(self, addr: Addr) -> None:
        self._bindings.pop(addr, None)

    def is_bound(self, addr: Addr) -> bool:
        return addr in self._bindings

    # --- topology -------------------------------------------------------------

    def set_link(self, a: HostLike, b: HostLike, config: NetConfig, both_ways: bool = True) -> None:
        """Override the network config for datagrams from ``a`` to ``b`` (and back unless ``both_ways=False``)."""
        ha, hb = _host(a), _host(b)
        self._links[(ha, hb)] = config
        if both_ways:
            self._links[(hb, ha)] = config

    def clear_link(self, a: HostLike, b: HostLike) -> None:
        ha, hb = _host(a), _host(b)
        self._links.pop((ha, hb), None)
        self._links.pop((hb, ha), None)

    def link(self, src_host: str, dst_host: str) -> NetConfig:
        """The config in force from ``src_host`` to ``dst_host``."""
        return self._links.get((src_host, dst_host), self.config)

    def partition(self, a: HostLike, b: HostLike | None = None) -> None:
        """Cut ``a`` from ``b`` (both directions), or from every host when ``b`` is None.

        Datagrams are checked at send and again on arrival, so copies already
        in flight across the cut are lost too (except manual deliveries,
        which the test asked for explicitly).
        """
        if b is None:
            self._isolated.add(_host(a))
        else:
            self._partitions.add(frozenset((_host(a), _host(b))))

    def heal(self, a: HostLike | None = None, b: HostLike | None = None) -> None:
        """Remove one cut (``a``, ``b``), every cut involving ``a``, or every cut (no arguments)."""
        if a is None:
            self._partitions.clear()
            self._isolated.clear()
        elif b is None:
            ha = _host(a)
            self._isolated.discard(ha)
            self._partitions = {p for p in self._partitions if ha not in p}
        else:
            self._partitions.discard(frozenset((_host(a), _host(b))))

    def is_partitioned(self, a: HostLike, b: HostLike) -> bool:
        ha, hb = _host(a), _host(b)
        if not self._partitions and not self._isolated:
            return False
        return ha in self._isolated or hb in self._isolated or frozenset((ha, hb)) in self._partitions

    # --- sending ----------------------------------------------------------------

    def send(self, src: Addr, dst: Addr, data: bytes) -> int:
        """Hand one datagram to the network; returns its id (shared by any duplicates)."""
        self._next_id += 1
        dg_id = self._next_id
        self.stats.sent += 1
        if (self._partitions or self._isolated) and self.is_partitioned(src[0], dst[0]):
            self.stats.partitioned += 1
            return dg_id
        cfg = self._links.get((src[0], dst[0]), self.config) if self._links else self.config
        now = self.scheduler.clock.now()
        if cfg.manual:
            self.in_flight.append(InFlight(dg_id, src, dst, data, now))
            return dg_id
        rng = self.rng
        if self.fate is not None:
            copies = self.fate(InFlight(dg_id, src, dst, data, now))
            if copies <= 0:
                self.stats.dropped_by_fate += 1
                return dg_id
            self.stats.duplicated += copies - 1
        else:
            if cfg.loss > 0.0 and rng.random() < cfg.loss:
                self.stats.lost += 1
                return dg_id
            copies = 1
            if cfg.duplicate > 0.0 and rng.random() < cfg.duplicate:
                copies = 2
                self.stats.duplicated += 1
        self.in_transit += copies
        for copy in range(copies):
            delay = cfg.delay_min if cfg.delay_max == cfg.delay_min else rng.uniform(cfg.delay_min, cfg.delay_max)
            dg = InFlight(dg_id, src, dst, data, now, copy)
            self.scheduler.call_at(now + delay, partial(self._arrive_timed, dg))
        return dg_id

    def _arrive_timed(self, dg: InFlight) -> None:
        self.in_transit -= 1
        self._arrive(dg, True)

    def _arrive(self, dg: InFlight, check_partition: bool) -> None:
        if check_partition and (self._partitions or self._isolated) and self.is_partitioned(dg.src[0], dg.dst[0]):
            self.stats.partitioned += 1
            return
        handler = self._bindings.get(dg.dst)
        if handler is None:
            self.stats.unowned += 1
            return
        self.stats.delivered += 1
        handler(dg.data, dg.src, dg.dst)

    # --- manual control -----------------------------------------------------------

    def _take(self, i: int) -> InFlight:
        if not 0 <= i < len(self.in_flight):
            raise SimulationError(f"no in-flight datagram at index {i} (have {len(self.in_flight)})")
        return self.in_flight.pop(i)

    def deliver(self, i: int = 0) -> None:
        """Deliver in-flight datagram ``i`` now (synchronously), regardless of partitions."""
        self._arrive(self._take(i), check_partition=False)

    def drop(self, i: int = 0) -> None:
        self._take(i)
        self.stats.dropped_manually += 1

    def duplicate(self, i: int = 0) -> None:
        """Put a copy of datagram ``i`` right after it in :attr:`in_flight`."""
        if not 0 <= i < len(self.in_flight):
            raise SimulationError(f"no in-flight datagram at index {i} (have {len(self.in_flight)})")
        dg = self.in_flight[i]
        self.in_flight.insert(i + 1, InFlight(dg.id, dg.src, dg.dst, dg.data, dg.sent_at, dg.copy + 1))
        self.stats.duplicated += 1

    def deliver_all(self) -> int:
        """Deliver everything in flight in FIFO order, including datagrams sent meanwhile; returns the count."""
        n = 0
        while self.in_flight:
            self.deliver(0)
            n += 1
        return n
