"""Counterexample traces: a readable table and a JSON file the simulator can replay.

JSON format ``natpool-trace/1`` (one object)::

    {
      "format": "natpool-trace/1",
      "model": "fast-race",            # models/<name>.toml
      "mutant": null | "no-drain",     # seeded bug the trace was found with
      "property": "CleanHandover",     # or "Deadlock"
      "kind": "invariant" | "action" | "deadlock" | "liveness",
      "instance": {"n": 0, "p": 0},    # the property's parameters that fail
      "detail": "...",
      "constants": {"K": 1, "T0": 1, ...},
      "pinger": [0, 1, ...],           # pair p -> node that pings (the other pongs)
      "sessions": [{"id": 0, "initiator": 0, "responder": 1}, ...],
      "steps": [
        {"step": 0, "action": "init", "params": {}, "node": null, "state": {...}},
        {"step": 1, "action": "take", "params": {"s": 0, "p": 0}, "node": 0, "state": {...}},
        ...
      ],
      "loop_start": null | k           # liveness: steps[k:] repeat forever (last state == steps[k])
    }

``state`` maps every variable of spec/system.toml to its value (tuples become
lists): ``entry[node][pair]`` Entry states, ``ini[s]``/``resp[s]`` role
states ("-" = not started), ``pair[s]``, ``pings[p]``/``pongs[p]`` frames in
flight, ``outst[p]`` outstanding pings, ``toresp[s]``/``toini[s]`` queued
signals (LOCK, LOCKED, BUSY, UNKNOWN (= ABORT(unknown)), TAKE, TAKEN),
``closed[s]``, ``owner``, ``handed``. Action names are those of
spec/system.toml; a replayer maps each to the sans-IO call it models (e.g.
``take`` -> ``pool.start_take(nonce)`` on ``node``, ``ping_answer`` -> deliver
a ping datagram, ``lose_ping`` -> drop it, ``chan_break`` -> ``channel_closed``,
``ini_fail``/``resp_fail`` -> timeout or channel EOF).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from natpool.check.compile import Compiled, State
from natpool.check.engine import Search, Violation, concretize

FORMAT = "natpool-trace/1"


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def build_steps(search: Search, v: Violation) -> list[dict[str, Any]]:
    cs = search.cs
    concrete = concretize(cs, [search.states[s] for s in v.path])
    steps = []
    for k, (label, st) in enumerate(concrete):
        if label is None:
            action, params, node = "init", {}, None
        else:
            aid, pvals = label
            action = cs.action_names[aid]
            params = dict(zip(cs.action_params[aid], pvals, strict=True))
            at = cs.action_at[aid]
            prev = concrete[k - 1][1]
            node = at(prev, *pvals) if at is not None else None
        steps.append({"step": k, "action": action, "params": params, "node": node,
                      "state": state_dict(cs, st)})
    return steps


def to_json(search: Search, v: Violation) -> dict[str, Any]:
    cs = search.cs
    mutant = cs.system.mutant.name if cs.system.mutant else None
    sessions = []
    ini_node = cs.system.defines.get("ini_node")
    for s in cs.domains.get("Sessions", ()):
        c = cs.model.constants
        takers = int(c.get("T0", 0)) + int(c.get("T1", 0))
        if ini_node is None:
            node = 0
        elif s < takers or "R" not in c:
            node = 0 if s < int(c.get("T0", 0)) else 1
        else:
            node = (s - takers) % 2  # a rogue slot (spec/system.toml define ini_node)
        sessions.append({"id": s, "initiator": node, "responder": 1 - node, "rogue_slot": s >= takers})
    return {
        "format": FORMAT, "model": cs.model.name, "mutant": mutant, "property": v.prop, "kind": v.kind,
        "instance": v.instance, "detail": v.detail, "constants": dict(cs.model.constants),
        "pinger": [p % 2 for p in cs.domains.get("Pairs", ())], "sessions": sessions,
        "steps": build_steps(search, v), "loop_start": v.loop_start,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _fmt_state(cs: Compiled, st: dict[str, Any]) -> tuple[str, str, str, str]:
    entry = st.get("entry", [])
    pairs = range(len(entry[0])) if entry else range(0)
    ents = "  ".join(f"p{p}:{entry[0][p]}|{entry[1][p]}" for p in pairs)
    heard = st.get("heard")

    def _heard(p: int) -> str:
        nodes = "".join(str(n) for n in range(2) if heard and heard[n][p])
        return f" h{nodes}" if nodes else ""

    frames = "  ".join(f"p{p}:{st['pings'][p]}>{st['pongs'][p]}< o{st['outst'][p]}{_heard(p)}" for p in pairs)
    sess = []
    sigs = []
    rogue = st.get("rogue", [])
    for s in range(len(st.get("ini", []))):
        kind = rogue[s] if s < len(rogue) and rogue[s] != "-" else ""
        if st["ini"][s] == "-" and not kind and st["resp"][s] == "-":
            continue
        tag = f"[{kind}]" if kind else ""
        sess.append(f"s{s}{tag}(p{st['pair'][s]}):{st['ini'][s]}/{st['resp'][s]}{'#' if st['closed'][s] else ''}")
        if st["toresp"][s] or st["toini"][s]:
            sigs.append(f"s{s}:{','.join(st['toresp'][s])}>{','.join(st['toini'][s])}<")
    return ents, " ".join(sess), frames, " ".join(sigs)


def render(doc: dict[str, Any], cs: Compiled) -> str:
    """Step-by-step table: node, action, entries of both nodes, sessions, frames and signals in flight."""
    inst = ", ".join(f"{k}={v}" for k, v in doc["instance"].items())
    head = f"{doc['property']} violated ({doc['kind']}{', ' + inst if inst else ''})"
    if doc.get("mutant"):
        head += f" with mutant {doc['mutant']}"
    lines = [head + f" in model {doc['model']}: {len(doc['steps']) - 1} steps"]
    if doc.get("detail"):
        lines.append(f"  {doc['detail']}")
    lines.append("  entries: pair:node0|node1   sessions: s(pair):initiator/responder (# = channel closed)")
    lines.append("  frames: pings>pongs< o=outstanding   signals: s:to-responder>to-initiator<")
    if "rogue" in cs.variables:
        lines.append("  adversary: s[foreign]/s[replay] = a rogue session;  hN = node N's entry heard a frame "
                     "this window")
    rows = [("step", "node", "action", "entries", "sessions", "frames", "signals")]
    for k, step in enumerate(doc["steps"]):
        ents, sess, frames, sigs = _fmt_state(cs, step["state"])
        params = ",".join(f"{a}={b}" for a, b in step["params"].items())
        label = step["action"] + (f"({params})" if params else "")
        if doc.get("loop_start") is not None and k == doc["loop_start"]:
            label = "@loop " + label
        node = "" if step["node"] is None else str(step["node"])
        rows.append((str(k), node, label, ents, sess, frames, sigs))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        lines.append("  " + "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    if doc.get("loop_start") is not None:
        lines.append(f"  (steps {doc['loop_start']}..{len(doc['steps']) - 1} repeat forever under weak fairness)")
    return "\n".join(lines)


def state_dict(cs: Compiled, st: State) -> dict[str, Any]:
    """One model state as JSON-ready ``{variable: value}``."""
    return {name: _jsonable(val) for name, val in zip(cs.variables, st, strict=True)}
