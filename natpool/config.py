"""Timer configuration for one pair entry, with the reasoning behind each default."""

from __future__ import annotations

from dataclasses import dataclass

from natpool.errors import LocalError


@dataclass(frozen=True, slots=True)
class PairConfig:
    """Keepalive and locking timers, in seconds.

    Defaults are chosen for real NATs, whose UDP mappings commonly expire
    after ~30 s of silence (Linux conntrack: 30 s; RFC 4787 asks for >= 2 min
    but many home routers use 30 s):

    * ``ping_interval`` 5 s — six refreshes per 30 s window, so the mapping
      survives several lost pings; upstream's 1 s costs 5x the packets for
      no extra safety.
    * ``no_inbound_timeout`` 21 s — tolerates four consecutive lost
      exchanges (the fifth pong lands at ~20 s + RTT, inside the deadline
      while RTT < 1 s) and still declares the path dead before a 30 s
      mapping can be silently gone. Exactly 4 x interval would tolerate
      only three: the fourth answer arrives one RTT after the deadline.
    * ``ping_lifespan`` 2 s — an answer later than this is treated as lost.
      Must exceed the maximum datagram lifetime (the model's assumption that
      timeouts are honest); 2 s is far above any loopback/Internet RTT.
    * ``drain_grace_rtts`` / ``min_drain_grace`` — while locking, an
      outstanding ping is given up after ``max(min_drain_grace,
      drain_grace_rtts * srtt)`` (capped at ``ping_lifespan``), so one lost
      pong does not stall a handover for the whole lifespan. This is an
      explicit timing assumption: CleanHandover needs every outstanding
      frame to be delivered or lost before its timeout fires. A one-way
      delay longer than the grace breaks it (the model checker shows the
      trace under its ``early_timeouts`` switch); raise ``min_drain_grace``
      or set ``settle_time`` on paths with long delay spikes.
    * ``lock_timeout`` 5 s — bound on a whole handover; several signalling
      round trips plus one drain fit easily.
    * ``max_send_failures`` 5 — consecutive socket errors before expiring.
    * ``settle_time`` 0 — extra quiet period before ``use``. Zero is exact
      on networks that do not duplicate datagrams; set it to the maximum
      datagram lifetime where duplicates are possible (see spec/properties).
    * ``nat_mapping_timeout`` 30 s — not a timer of the pool: how long the
      NAT on the path keeps a silent UDP mapping. After the hand-over no
      keepalive refreshes it, so the application must send before
      ``Lease.mapping_deadline`` (the last inbound keepalive plus this).
      Linux conntrack drops an unreplied or young UDP flow after 30 s
      (``nf_conntrack_udp_timeout``) and an ASSURED one (traffic seen both
      ways) after 120 s (``nf_conntrack_udp_timeout_stream``); a punched pair
      is usually ASSURED, but many home routers use 30 s for every flow, so
      the default assumes the short one. Measured through a real Linux NAT:
      a silent application has exactly this minus the time since the last
      keepalive before the peer's datagrams are dropped at the router.
    """

    ping_interval: float = 5.0
    no_inbound_timeout: float = 21.0
    ping_lifespan: float = 2.0
    drain_grace_rtts: float = 4.0
    min_drain_grace: float = 0.2
    lock_timeout: float = 5.0
    max_send_failures: int = 5
    settle_time: float = 0.0
    nat_mapping_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("ping_interval", "no_inbound_timeout", "ping_lifespan", "lock_timeout", "min_drain_grace"):
            if getattr(self, name) <= 0:
                raise LocalError(f"PairConfig.{name} must be > 0")
        if self.settle_time < 0 or self.drain_grace_rtts <= 0:
            raise LocalError("PairConfig.settle_time must be >= 0 and drain_grace_rtts > 0")
        if self.no_inbound_timeout <= self.ping_interval:
            raise LocalError("PairConfig.no_inbound_timeout must exceed ping_interval")
        if self.max_send_failures < 1:
            raise LocalError("PairConfig.max_send_failures must be >= 1")
        if self.nat_mapping_timeout <= 0:
            raise LocalError("PairConfig.nat_mapping_timeout must be > 0")
