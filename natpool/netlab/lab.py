"""Build, inspect and always tear down the two-NAT namespace topology.

Why it is shaped this way:

* **Names carry the owner's pid** (``nplab<pid>n<k>-ha`` ...), so two runs at
  once never collide and a rerun can tell a dead run's leftovers (pid gone)
  from a live one's; :func:`cleanup_stale` removes only the former.
* **Veths are created directly inside their namespaces** (``ip link add ...
  netns A peer ... netns B``), so they never exist in the root namespace and
  die with their namespace: deleting the four namespaces is a complete
  teardown. Processes still inside a namespace are killed first (only ones
  in our own namespaces).
* **Teardown is idempotent** and runs from ``__exit__`` whatever happened; every
  step tolerates "already gone".
* Conntrack timeouts are per network namespace, so lowering them in the
  routers never touches the machine's own settings (whose values
  :meth:`Lab.default_timeouts` records).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

PREFIX = "nplab"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)n(\d+)-")
_counter = 0

HOSTS = ("a", "b")
LAN = {"a": ("10.0.1.2", "10.0.1.1"), "b": ("10.0.2.2", "10.0.2.1")}  # (host, router) on each LAN
PUBLIC = {"a": "198.18.0.1", "b": "198.19.0.2"}  # the routers' wan addresses, inside 198.18.0.0/15
SIDE = {"a": "10.99.0.1", "b": "10.99.0.2"}  # the non-NATed signalling link between the hosts
UDP_TIMEOUT_KEYS = ("net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream")

#: Datagrams shaped like a natpool keepalive frame: 9-byte payload (UDP length 17) whose kind byte (the 9th,
#: bit offset 128 from the UDP header) is PING (0) or PONG (1). Application data of 9 bytes whose last byte is
#: >= 2 is therefore not counted, which is what lets a test send a 9-byte app datagram and still count frames.
KEEPALIVE_MATCH = "udp length 17 @th,128,8 < 2"


class LabError(RuntimeError):
    """The lab could not be built or a command inside it failed (a test-environment problem, not natpool's)."""


@dataclass(frozen=True)
class LabConfig:
    """Knobs of one lab instance.

    ``udp_timeout`` / ``udp_stream_timeout``: the routers' conntrack timeouts
    (s) for unreplied/young and for ASSURED UDP flows (kernel defaults 30 and
    120). ``symmetric``: hosts whose router masquerades ``fully-random`` (a
    new public port per flow: a symmetric NAT). ``endpoint_independent``:
    hosts whose router forwards inbound UDP to a port the host registered with
    :meth:`Lab.open_port` from *any* remote endpoint (endpoint-independent
    filtering for that port), instead of only replies to a conntrack entry.
    """

    udp_timeout: int = 6
    udp_stream_timeout: int = 6
    symmetric: frozenset[str] = field(default_factory=frozenset)
    endpoint_independent: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class CtEntry:
    """One ``conntrack -L -p udp`` line: the original and reply tuples, seconds left, flags."""

    timeout: int
    orig: tuple[str, str, int, int]  # src, dst, sport, dport
    reply: tuple[str, str, int, int]
    flags: frozenset[str]

    @property
    def unreplied(self) -> bool:
        return "UNREPLIED" in self.flags

    @property
    def assured(self) -> bool:
        return "ASSURED" in self.flags


def parse_conntrack(text: str) -> list[CtEntry]:
    """Parse ``conntrack -L -p udp`` output (default format); lines that are not UDP entries are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0] != "udp":
            continue
        kv: list[tuple[str, str]] = []
        flags = set()
        for f in fields[3:]:
            if f.startswith("[") and f.endswith("]"):
                flags.add(f.strip("[]"))
            elif "=" in f:
                k, v = f.split("=", 1)
                kv.append((k, v))
        tuples = []
        for start in (0, 4):
            part = dict(kv[start:start + 4])
            tuples.append((part["src"], part["dst"], int(part["sport"]), int(part["dport"])))
        entries.append(CtEntry(int(fields[2]), tuples[0], tuples[1], frozenset(flags)))
    return entries


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 10.0,
         input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,  # noqa: S603
                              input=input_text, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


_unavailable: str | None = None
_probed = False


def lab_unavailable_reason() -> str | None:
    """Why the lab cannot run here (None if it can): not Linux, not root, no ``ip``/``nft``/``conntrack``, no netns."""
    global _unavailable, _probed
    if _probed:
        return _unavailable
    _probed = True
    if not sys.platform.startswith("linux"):
        _unavailable = "the NAT lab needs Linux network namespaces"
    elif os.geteuid() != 0:
        _unavailable = "the NAT lab needs root (ip netns, nftables, conntrack)"
    elif missing := [t for t in ("ip", "nft", "conntrack") if shutil.which(t) is None]:
        _unavailable = (f"the NAT lab needs {', '.join(missing)} "
                        "(apt-get install -y iproute2 nftables conntrack)")
    else:
        probe = f"{PREFIX}{os.getpid()}probe"
        made = _run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            _unavailable = f"ip netns add failed: {made.stderr.strip()}"
        else:
            nft = _run(["ip", "netns", "exec", probe, "nft", "add", "table", "ip", "probe"], check=False)
            _run(["ip", "netns", "del", probe], check=False)
            if nft.returncode != 0:
                _unavailable = f"nftables does not work in a namespace: {nft.stderr.strip()}"
    return _unavailable


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete lab namespaces left by runs whose process is gone (never a live run's). Returns their names."""
    removed = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m is None and not (name.startswith(PREFIX) and name.endswith("probe")):
            continue
        pid = int(m.group(1)) if m is not None else int(name[len(PREFIX):-len("probe")] or 0)
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _delete_namespace(name)
        removed.append(name)
    return removed


def _delete_namespace(name: str) -> None:
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for p in pids:
        if p.isdigit() and int(p) != os.getpid():  # never ourselves (a thread left inside by a failed setns)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)


def _ruleset(symmetric: bool, endpoint_independent: bool) -> str:
    """A home router: masquerade on wan, drop unsolicited inbound UDP, count keepalive-shaped datagrams."""
    masq = "masquerade fully-random" if symmetric else "masquerade"
    eif = "\n    iifname \"wan\" ct status dnat accept" if endpoint_independent else ""
    return f"""
table ip natpool {{
  counter keepalive_out {{}}
  counter keepalive_in {{}}
  counter udp_out {{}}
  counter udp_in {{}}
  counter dropped_in {{}}
  set flows_out {{
    type inet_service . inet_service; flags dynamic; counter; size 65535;
  }}
  set flows_in {{
    type inet_service . inet_service; flags dynamic; counter; size 65535;
  }}
  chain count {{
    type filter hook forward priority -10; policy accept;
    oifname "wan" {KEEPALIVE_MATCH} counter name keepalive_out
    iifname "wan" {KEEPALIVE_MATCH} counter name keepalive_in
    oifname "wan" meta l4proto udp counter name udp_out
    iifname "wan" meta l4proto udp counter name udp_in
    oifname "wan" {KEEPALIVE_MATCH} update @flows_out {{ udp sport . udp dport }}
    iifname "wan" {KEEPALIVE_MATCH} update @flows_in {{ udp sport . udp dport }}
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "wan" ct state established,related accept{eif}
    iifname "wan" counter name dropped_in drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" meta l4proto udp counter name dropped_in drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {masq}
  }}
}}
"""


class Lab:
    """Two hosts behind two kernel NATs, plus a side link; a context manager that always cleans up.

    ``ns("ha")`` / ``ns("ra")`` ... name the host and router namespaces of
    host ``a``/``b``. Use ``with Lab(LabConfig()) as lab:``.
    """

    def __init__(self, config: LabConfig | None = None) -> None:
        global _counter
        _counter += 1
        self.config = config if config is not None else LabConfig()
        self.prefix = f"{PREFIX}{os.getpid()}n{_counter}"
        self.created: list[str] = []
        self.default_timeouts: dict[str, int] = {}
        self.setup_seconds = 0.0
        self._torn_down = False

    # --- names and addresses ---------------------------------------------------------------------

    def ns(self, short: str) -> str:
        """``ha``, ``hb`` (hosts) or ``ra``, ``rb`` (routers) -> the namespace's full name."""
        return f"{self.prefix}-{short}"

    @staticmethod
    def lan_addr(host: str) -> str:
        return LAN[host][0]

    @staticmethod
    def public_addr(host: str) -> str:
        return PUBLIC[host]

    @staticmethod
    def side_addr(host: str) -> str:
        return SIDE[host]

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    def setup(self) -> None:
        """Build the topology (after removing dead runs' leftovers); LabError if any step fails."""
        reason = lab_unavailable_reason()
        if reason is not None:
            raise LabError(reason)
        started = time.monotonic()
        cleanup_stale()
        for short in ("ha", "ra", "hb", "rb"):
            name = self.ns(short)
            if name in list_namespaces():  # our own pid and counter: only after a crash mid-setup
                _delete_namespace(name)
            _run(["ip", "netns", "add", name])
            self.created.append(name)
            self.ip(short, "link", "set", "lo", "up")
        links = [("ha", "lan", "ra", "lan"), ("hb", "lan", "rb", "lan"), ("ra", "wan", "rb", "wan"),
                 ("ha", "side", "hb", "side")]
        for ns1, if1, ns2, if2 in links:
            _run(["ip", "link", "add", if1, "netns", self.ns(ns1), "type", "veth", "peer", "name", if2,
                  "netns", self.ns(ns2)])
        for h in HOSTS:
            host_ip, router_ip = LAN[h]
            self.ip(f"h{h}", "addr", "add", f"{host_ip}/24", "dev", "lan")
            self.ip(f"r{h}", "addr", "add", f"{router_ip}/24", "dev", "lan")
            self.ip(f"r{h}", "addr", "add", f"{PUBLIC[h]}/15", "dev", "wan")
            self.ip(f"h{h}", "addr", "add", f"{SIDE[h]}/30", "dev", "side")
            for short, ifs in ((f"h{h}", ("lan", "side")), (f"r{h}", ("lan", "wan"))):
                for ifname in ifs:
                    self.ip(short, "link", "set", ifname, "up")
            self.ip(f"h{h}", "route", "add", "default", "via", router_ip)
            self.exec(f"r{h}", "sysctl", "-qw", "net.ipv4.ip_forward=1")
            rules = _ruleset(h in self.config.symmetric, h in self.config.endpoint_independent)
            _run(["ip", "netns", "exec", self.ns(f"r{h}"), "nft", "-f", "-"], input_text=rules)
        for key in UDP_TIMEOUT_KEYS:  # conntrack is loaded in the routers now (their rules use ct)
            self.default_timeouts[key] = int(self.exec("ra", "sysctl", "-n", key).stdout.strip())
        self.set_timeouts(self.config.udp_timeout, self.config.udp_stream_timeout)
        self.setup_seconds = time.monotonic() - started

    def teardown(self) -> None:
        """Kill whatever still runs in our namespaces and delete them (veths go with them). Idempotent."""
        for name in reversed(self.created):
            _delete_namespace(name)
        leftover = [n for n in self.created if n in list_namespaces()]
        self.created = leftover
        self._torn_down = not leftover
        if leftover:
            raise LabError(f"could not delete namespaces {leftover}")

    # --- commands inside the lab -----------------------------------------------------------------

    def exec(self, short: str, *argv: str, check: bool = True,
             timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", self.ns(short), *argv], check=check, timeout=timeout)

    def ip(self, short: str, *argv: str) -> None:
        _run(["ip", "-n", self.ns(short), *argv])

    def set_timeouts(self, udp: int, stream: int) -> None:
        """Set both routers' UDP conntrack timeouts (per namespace; the machine's own stay untouched)."""
        for h in HOSTS:
            self.exec(f"r{h}", "sysctl", "-qw", f"{UDP_TIMEOUT_KEYS[0]}={udp}", f"{UDP_TIMEOUT_KEYS[1]}={stream}")

    def timeouts(self, host: str) -> dict[str, int]:
        return {key: int(self.exec(f"r{host}", "sysctl", "-n", key).stdout.strip()) for key in UDP_TIMEOUT_KEYS}

    def open_port(self, host: str, port: int) -> None:
        """Forward inbound UDP to ``port`` on the router's public address to the host, from any remote.

        Only meaningful for hosts in ``LabConfig.endpoint_independent``: that
        router's forward chain accepts DNATed flows, so this emulates an
        endpoint-independent-filtering NAT for the port.
        """
        self.exec(f"r{host}", "nft", "add", "rule", "ip", "natpool", "prerouting", "iifname", "wan", "udp",
                  "dport", str(port), "dnat", "to", f"{LAN[host][0]}:{port}")

    def conntrack(self, host: str) -> list[CtEntry]:
        """The UDP entries of host ``host``'s router (``conntrack -L -p udp``)."""
        return parse_conntrack(self.exec(f"r{host}", "conntrack", "-L", "-p", "udp").stdout)

    def mapping(self, host: str, port: int) -> CtEntry | None:
        """The router's entry for the host's flow from local ``port`` (None: the mapping is gone)."""
        for e in self.conntrack(host):
            if e.orig[0] == LAN[host][0] and e.orig[2] == port:
                return e
        return None

    def delete_mapping(self, host: str, port: int) -> int:
        """Delete the router's entries for the host's flows from ``port``; the number deleted."""
        proc = self.exec(f"r{host}", "conntrack", "-D", "-p", "udp", "--orig-src", LAN[host][0],
                         "--orig-port-src", str(port), check=False)
        m = re.search(r"(\d+) flow entries have been deleted", proc.stderr)
        return int(m.group(1)) if m else 0

    def counters(self, host: str) -> dict[str, int]:
        """The router's nft counters (packets): keepalive_out/in, udp_out/in, dropped_in."""
        data = json.loads(self.exec(f"r{host}", "nft", "-j", "list", "counters", "table", "ip", "natpool").stdout)
        out: dict[str, int] = {}
        for item in data.get("nftables", []):
            c = item.get("counter")
            if isinstance(c, dict) and "name" in c:
                out[str(c["name"])] = int(c.get("packets", 0))
        return out

    def flow_counters(self, host: str) -> dict[str, dict[tuple[int, int], int]]:
        """Keepalive-shaped datagrams per flow through the router: ``{"out"|"in": {(sport, dport): packets}}``.

        Ports as the forward hook sees them: on the way out the host's local
        port (before masquerade), on the way in the router already mapped the
        destination back to it. With port-preserving masquerade that is the
        pair's (local port, peer public port) in both directions, so one pair
        among hundreds can be counted on its own.
        """
        out: dict[str, dict[tuple[int, int], int]] = {"out": {}, "in": {}}
        for direction in ("out", "in"):
            data = json.loads(self.exec(f"r{host}", "nft", "-j", "list", "set", "ip", "natpool",
                                        f"flows_{direction}").stdout)
            for item in data.get("nftables", []):
                s = item.get("set")
                if not isinstance(s, dict):
                    continue
                for elem in s.get("elem", []):
                    e = elem.get("elem", {}) if isinstance(elem, dict) else {}
                    key = e.get("val", {}).get("concat") if isinstance(e.get("val"), dict) else None
                    counter = e.get("counter") or {}
                    if isinstance(key, list) and len(key) == 2:
                        out[direction][(int(key[0]), int(key[1]))] = int(counter.get("packets", 0))
        return out

    def agent_argv(self, host: str, *extra: str) -> list[str]:
        """argv that runs the natpool agent inside host ``host``'s namespace with this interpreter."""
        return ["ip", "netns", "exec", self.ns(f"h{host}"), sys.executable, "-m", "natpool.netlab.agent", *extra]

    # --- sockets opened in a namespace from this process -----------------------------------------

    @contextlib.contextmanager
    def entered(self, short: str) -> Iterator[None]:
        """Run the block with this thread in namespace ``short``: sockets created there stay there."""
        with enter_netns(self.ns(short)):
            yield

    def udp_socket(self, host: str, port: int = 0) -> socket.socket:
        """A non-blocking UDP socket bound to host ``host``'s LAN address, living in its namespace."""
        with self.entered(f"h{host}"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.bind((LAN[host][0], port))
        except BaseException:
            s.close()
            raise
        return s


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def enter_netns(name: str) -> Iterator[None]:
    """Switch the calling thread's network namespace to ``/run/netns/<name>`` and back (``setns(2)``).

    A socket keeps the namespace it was created in, so a single process can
    own sockets in several namespaces: create them inside this block.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({name}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:  # pragma: no cover - cannot fail for our own ns
                raise LabError(f"setns back from {name}: {os.strerror(ctypes.get_errno())}")
