"""``natpool demo --nat``: runs its self-checks behind the kernel NATs; refuses clearly without root."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import natpool.netlab.lab as lab_module
from natpool.cli import main
from natpool.netlab import Lab
from natpool.netlab.lab import PREFIX, list_namespaces


def test_demo_nat_without_root_exits_2_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Not root: exit status 2 and a message that says why and what to do, before any namespace is made."""
    monkeypatch.setattr(lab_module, "_probed", False)
    monkeypatch.setattr(lab_module, "_unavailable", None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    built: list[Lab] = []
    monkeypatch.setattr(Lab, "setup", lambda self: built.append(self))
    assert main(["demo", "--nat"]) == 2
    err = capsys.readouterr().err
    assert "natpool demo --nat: the NAT lab needs root" in err and "plain `natpool demo`" in err, err
    assert built == []  # refused before touching the network configuration


def test_demo_nat_self_checks_hold(make_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]) -> None:
    """A short ``natpool demo --nat`` exits 0: silence after lock checked on the routers' own counters.

    (``make_lab`` is requested only for its skip/cleanup policy; the demo builds its own lab.)
    """
    code = main(["demo", "--nat", "--pairs", "24", "--takes", "6", "--duration", "3", "--quiet", "--no-uvloop",
                 "--seed", "7"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "after a lock: 0" in out and "hole punch failures: 0" in out, out[-3000:]
    checked = int(out.split("silent pairs checked on the routers' per-flow counters: ")[1].split(",")[0])
    assert checked >= 1, out[-3000:]  # at least one pair went silent and was checked on the routers
    mine = f"{PREFIX}{os.getpid()}n"
    assert not [n for n in list_namespaces() if n.startswith(mine)], "the demo left its namespaces behind"
