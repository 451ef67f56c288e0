"""Shared steps of the lab tests: two agents, a hole punch, pools, signalling over the side link."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from natpool.netlab import Lab
from natpool.netlab.client import Agent

Status = dict[str, Any]
NONCE = 0x5EED_0000_0000_0001


@dataclass
class Hosts:
    """Host a and b's agents in one lab, their punched local ports (assumed public ports) and the punch results."""

    lab: Lab
    a: Agent
    b: Agent
    port: dict[str, int]
    punch: dict[str, dict[str, Any]]
    nonce: int = NONCE

    def agent(self, host: str) -> Agent:
        return self.a if host == "a" else self.b

    @property
    def pair(self) -> dict[str, Any]:
        """The pair as the punch produced it: each side's router address and the *local* port (port preserving)."""
        return {"a": ["a", self.lab.public_addr("a"), self.port["a"]],
                "b": ["b", self.lab.public_addr("b"), self.port["b"]], "nonce": self.nonce}

    def status(self) -> tuple[Status, Status]:
        ra, rb = self.a.request("status"), self.b.request("status")
        return self.a.reply(ra), self.b.reply(rb)

    def start_pools(self, config: dict[str, Any], pinger: str = "a") -> None:
        """Both pools up and the punched sockets added (``pinger`` pings); returns once both hold the entry."""
        for h in ("a", "b"):
            self.agent(h).call("pool", identity=h, config=config)
        ra = self.a.request("add", pair=self.pair, is_pinger=pinger == "a")
        rb = self.b.request("add", pair=self.pair, is_pinger=pinger == "b")
        self.a.reply(ra)
        self.b.reply(rb)

    def signalling(self, responder: str = "b", send_on_lease: list[int] | None = None,
                   taken_delay: float = 0.0) -> None:
        """The responder serves the TCP reference signalling on its side-link address; the other dials it.

        ``taken_delay``: the initiator receives TAKEN (its 2nd message) that much later.
        """
        initiator = "a" if responder == "b" else "b"
        addr = self.agent(responder).call("serve", host=self.lab.side_addr(responder),
                                          send_on_lease=send_on_lease or [])["address"]
        self.agent(initiator).call("peer", identity=responder, host=addr[0], port=addr[1],
                                   delay_recv=2 if taken_delay else 0, delay=taken_delay)


def punched_hosts(lab: Lab, make_agent: Callable[[Lab, str], Agent], *, require: bool = True,
                  open_ports: tuple[str, ...] = (), punch_timeout: float = 3.0) -> Hosts:
    """Start both agents, bind, punch simultaneously to the peer's assumed public endpoint, drain strays."""
    a, b = make_agent(lab, "a"), make_agent(lab, "b")
    port = {h: agent.call("bind", host=lab.lan_addr(h))["port"] for h, agent in (("a", a), ("b", b))}
    for h in open_ports:
        lab.open_port(h, port[h])
    ra = a.request("punch", peer=[lab.public_addr("b"), port["b"]], timeout=punch_timeout)
    rb = b.request("punch", peer=[lab.public_addr("a"), port["a"]], timeout=punch_timeout)
    punch = {"a": a.reply(ra, punch_timeout + 10), "b": b.reply(rb, punch_timeout + 10)}
    if require:
        assert punch["a"]["done"] and punch["b"]["done"], punch
    time.sleep(0.05)  # a last punch datagram may still be in flight
    a.call("drain")
    b.call("drain")
    return Hosts(lab, a, b, port, punch)


def poll(predicate: Callable[[], bool], bound: float, every: float = 0.1) -> float | None:
    """Poll until ``predicate()``: the monotonic time it first held, or None after ``bound`` (a failure bound)."""
    deadline = time.monotonic() + bound
    while True:
        t = time.monotonic()
        if predicate():
            return t
        if t > deadline:
            return None
        time.sleep(every)


def keepalive_sends(status: Status, before: float | None = None) -> int:
    """Keepalive frames this agent's pool put on the wire (optionally only those sent before ``before``)."""
    return sum(1 for t, direction, _state, size, _port in status["wire"]
               if direction == "send" and size == 9 and (before is None or t < before))


def event_time(status: Status, target: str) -> float | None:
    for ev in status["events"]:
        if ev["target"] == target:
            return float(ev["t"])
    return None


def expiry(status: Status) -> tuple[float, str] | None:
    for ev in status["events"]:
        if ev["target"] == "Expired":
            return float(ev["t"]), str(ev["reason"])
    return None
