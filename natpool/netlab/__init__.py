"""A real-NAT lab: Linux network namespaces, nftables masquerade and conntrack (Linux, root only).

natpool's job is to keep NAT mappings alive and hand a clean path over; the
simulator checks that against a NAT model we wrote ourselves. This package
builds one nobody here wrote — the kernel's — so tests and ``natpool demo
--nat`` can watch the real mapping table::

    host a (10.0.1.2) -- lan -- router a (198.18.0.1) ==== wan ==== router b (198.19.0.2) -- lan -- host b (10.0.2.2)
        \\________________________ side link, not NATed (10.99.0.1 <-> 10.99.0.2) ________________________/

* :mod:`natpool.netlab.lab` — :class:`~natpool.netlab.lab.Lab`: builds and
  always tears down the namespaces (unique, pid-tagged names, so reruns and
  parallel runs never collide; stale ones of dead runs are removed first),
  runs commands inside them, reads ``conntrack -L`` and the routers' nft
  counters, lowers the per-namespace UDP conntrack timeouts.
* :mod:`natpool.netlab.agent` — the per-host process (``ip netns exec ...
  python -m natpool.netlab.agent``): hole-punches with a plain socket, then
  hands it to :meth:`natpool.AsyncPairPool.add`; driven by JSON lines.
* :mod:`natpool.netlab.client` — :class:`~natpool.netlab.client.Agent`, the
  test side of that JSON-lines conversation.

The routers masquerade (source-port preserving, or ``fully-random`` for a
symmetric NAT), drop unsolicited inbound UDP (conntrack state filtering, like
home routers) and count keepalive-shaped datagrams (UDP length 17, kind byte
0 or 1) in each direction. All addresses live only inside the namespaces the
lab creates; 198.18.0.0/15 is the benchmarking range (RFC 2544), never routed.
"""

from natpool.netlab.lab import CtEntry, Lab, LabConfig, LabError, lab_unavailable_reason

__all__ = ["CtEntry", "Lab", "LabConfig", "LabError", "lab_unavailable_reason"]
