"""Timer configuration for one pair entry, with the reasoning behind each default."""

from __future__ import annotations

from dataclasses import dataclass

from natpool.errors import LocalError


@dataclass(frozen=True, slots=True)
class PairConfig:
    """Keepalive and locking timers, in seconds.

    Defaults are chosen for real NATs and lossy paths. A NAT's UDP mapping
    dies after a stretch of silence: Linux conntrack drops an *unreplied*
    (or young) UDP flow after 30 s (``nf_conntrack_udp_timeout``), but once
    the flow has seen traffic both ways it is ASSURED and lives 120 s
    (``nf_conntrack_udp_timeout_stream``); RFC 4787 asks for >= 2 min, and
    many home routers use 30 s whatever the state. A pair must therefore be
    declared dead well inside 30 s, and keepalive must survive heavy loss.

    Measured on the simulator (:mod:`natpool.sim.survival`; one pair per
    seed, 10 virtual minutes, random loss both ways, 10-80 ms one-way delay;
    ``natpool bench`` prints the same figure for the current defaults):

    =========================  ===========  ===========  ===========
    ping / no-inbound          10 % loss    30 % loss    50 % loss
    =========================  ===========  ===========  ===========
    5 s / 21 s (old defaults)  46/50 (384)  0/50 (81)    0/50 (29)
    2 s / 25 s                 50/50        44/50 (396)  7/50 (179)
    1 s / 15 s                 50/50        48/50 (152)  5/50 (202)
    1 s / 21 s (defaults)      50/50        50/50        38/50 (142)
    =========================  ===========  ===========  ===========

    (alive of 50 seeds; in brackets the median first expiry, in virtual
    seconds, of those that expired.) Over 500 seeds 1 s / 21 s kept 500 of
    500 pairs alive at 30 % loss and 491 of 500 at 40 %.

    * ``ping_interval`` 1 s — at 30 % loss each way an exchange succeeds
      with probability 0.49, so what keeps a pair alive is the number of
      exchanges per no-inbound window: with 5 s pings four lost exchanges
      in a row (p = 0.51^4 = 7 %) killed every pair within minutes. 1 s
      costs 5x the packets of 5 s (9-byte frames; ~16-23 % of a core for
      10k pairs, see shared measured-facts) and is the upstream default.
      Pings leave on a grid of ``PING_TICKS`` (64) points per interval,
      each pair at a fixed phase (``natpool.core.entry``): the pings due on
      one point share one timer wake-up, so a pool wakes at most 64 times
      per interval whatever its size, and phases never drift into one burst.
      The first ping leaves at ``add``, the second up to 1/64 interval more
      than one interval later; after that the gaps are one interval. A
      wake-up later than 4/64 interval (a stalled loop) restarts the ping
      one to two intervals on, at the pair's own phase again, so a stall
      never merges the pairs it delayed into one burst; with less than two
      intervals between ``ping_interval`` and ``no_inbound_timeout`` the
      restart stays within half that margin (spread over fewer points).
    * ``no_inbound_timeout`` 21 s — tolerates twenty consecutive lost
      exchanges (0.51^20 ~ 1.4e-6 per ping at 30 % loss, ~1e-3 per pair per
      10 minutes) and still declares the path dead 9 s before a 30 s mapping
      can be silently gone. Must exceed ``ping_interval`` and
      ``lock_timeout`` (see below), and should exceed ``ping_interval +
      ping_lifespan``: a pong may take up to the lifespan, so a tighter
      window expires a slow path that still answers.
    * ``ping_lifespan`` 1 s (= ``ping_interval``) — an answer later than
      this is treated as lost. Must exceed the maximum datagram lifetime
      (the model's assumption that timeouts are honest): 1 s is well above
      Internet RTTs, geostationary satellite included. Keep it <=
      ``ping_interval``: then every ping is answered or given up before the
      next one leaves, so at most one is outstanding. Legacy pongs carry no
      sequence number (keyed ones answer their own ping id, see
      ``natpool.wire.keepalive``), so with a longer lifespan a lost ping stays in the
      outstanding list, every later pong retires the ping before its own,
      and the entry always shows one phantom outstanding ping and an RTT
      one interval too long: measured on the simulator (1 s pings, 10-80 ms
      one way), the median take took 1.6 s instead of 0.08 s at 10 % or
      30 % loss with a 2 s lifespan, as every drain waited out the full
      lifespan. Not rejected: it is safe (the phantom only makes the drain
      wait longer), and fast-ping configurations (tests, the README's quick
      start) run on lossless loopback, where no phantom appears.
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
      round trips plus one drain fit easily. No pings flow once the pinger's
      entry is claimed, so a handover that times out has used
      ``lock_timeout`` of both entries' no-inbound window: it must be below
      ``no_inbound_timeout`` (5 s + one interval leaves 15 s of the 21).
      It should also leave room for the drain grace plus ``settle_time``
      plus the signalling: otherwise a take whose outstanding ping lost its
      pong times out (the pair returns to Idle; not rejected, as it is safe).
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

    ``__post_init__`` rejects (:class:`~natpool.errors.LocalError`)
    combinations that defeat the protocol whatever the network does; each
    message says why.
    """

    ping_interval: float = 1.0
    no_inbound_timeout: float = 21.0
    ping_lifespan: float = 1.0
    drain_grace_rtts: float = 4.0
    min_drain_grace: float = 0.2
    lock_timeout: float = 5.0
    max_send_failures: int = 5
    settle_time: float = 0.0
    nat_mapping_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("ping_interval", "no_inbound_timeout", "ping_lifespan", "lock_timeout", "min_drain_grace",
                     "drain_grace_rtts", "nat_mapping_timeout"):
            if not getattr(self, name) > 0:  # NaN too: it compares false everywhere, so no timer would ever fire
                raise LocalError(f"PairConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.settle_time >= 0:
            raise LocalError(f"PairConfig.settle_time must be >= 0, got {self.settle_time!r}")
        if self.max_send_failures < 1:
            raise LocalError("PairConfig.max_send_failures must be >= 1")
        if self.no_inbound_timeout <= self.ping_interval:
            raise LocalError(
                f"PairConfig.no_inbound_timeout ({self.no_inbound_timeout:g} s) must exceed ping_interval "
                f"({self.ping_interval:g} s): both sides would expire a lossless path between two pings")
        if self.lock_timeout >= self.no_inbound_timeout:
            raise LocalError(
                f"PairConfig.lock_timeout ({self.lock_timeout:g} s) must be below no_inbound_timeout "
                f"({self.no_inbound_timeout:g} s): once the pinger's entry is claimed no pings flow, so a take "
                "that times out leaves both entries without inbound for lock_timeout: a peer entry still Idle "
                "expires for no inbound meanwhile, a claimed one the moment it returns to Idle, and the timed-out "
                "take loses the pair on both sides")
        if self.ping_lifespan < self.min_drain_grace:
            raise LocalError(
                f"PairConfig.ping_lifespan ({self.ping_lifespan:g} s) must be >= min_drain_grace "
                f"({self.min_drain_grace:g} s): the drain grace is capped at the lifespan, so the grace asked for "
                "(the bound on one-way delay that CleanHandover relies on) would silently not be given")
        if self.settle_time >= self.lock_timeout:
            raise LocalError(
                f"PairConfig.settle_time ({self.settle_time:g} s) must be below lock_timeout "
                f"({self.lock_timeout:g} s): a Locked entry may be used only settle_time after it locked, and the "
                "handover is bounded by lock_timeout from the claim, so every take would time out")
