"""The stateful test's own checks: they name the spec's properties and do fail on bad runtimes.

Deterministic scenarios on the same :class:`~tests.support.stateful.world.World` the
hypothesis machine drives, so a green stateful run means "checked", not
"the checks were blind".
"""

from __future__ import annotations

import tomllib

import pytest

from natpool import props
from natpool.core.lease import Lease
from natpool.machines.tables import TABLES
from natpool.resources import spec_dir
from natpool.spec.load import load_machines
from tests.support.stateful.mutants import no_drain
from tests.support.stateful.world import MAX_LIFETIME, A, B, Violation, World

SPEC = spec_dir().path  # the checkout's spec/, or the copy installed with natpool


def test_property_names_are_the_specs() -> None:
    names = {p["name"] for p in tomllib.loads((SPEC / "properties.toml").read_text())["property"]}
    ours = {props.ATOMIC_TAKE, props.STRICT_SILENCE, props.CLEAN_HANDOVER, props.SYMMETRY, props.NO_LEAK}
    assert ours <= names
    assert set(props.LIVENESS_PARTS) <= names


def test_predicates() -> None:
    assert props.atomic_take(1, 1) and not props.atomic_take(2, 0) and not props.atomic_take(0, 2)
    assert props.strict_silence("Idle") and props.strict_silence(None) and not props.strict_silence("Locked")
    assert props.clean_handover("Locked", "InUse", 0) and not props.clean_handover("Locked", "InUse", 1)
    assert props.clean_handover("Idle", "InLocking", 3)
    assert props.symmetry("InUse", None) and props.symmetry("InUse", "Locked") and not props.symmetry("InUse", "Idle")
    assert props.symmetry_step("Locked", "Expired") and not props.symmetry_step("Locked", "Idle")
    assert props.no_leak("Idle", False) and not props.no_leak("Locked", False)
    assert props.spec_allows("Entry", "Idle", "begin_lock", "InLocking")
    assert not props.spec_allows("Entry", "Locked", "abort_lock", "Idle")


def test_handover_passes_every_check_and_liveness() -> None:
    world = World(settle=True)
    pair = world.punch(A)
    link = world.take(B, pair)
    assert link is not None
    world.flush()
    world.advance(1.0)
    world.flush()
    world.check()
    world.heal_and_run(3 * world.config.lock_timeout)
    world.check()
    world.check_liveness()
    assert sorted(lease.role for _, lease in world.leases()) == ["initiator", "responder"]
    assert world.state(A, pair.nonce) == world.state(B, pair.nonce) == "InUse"
    assert all(isinstance(s.outcome, Lease) for _, s in world.sessions())


def test_forbidden_step_fails_with_the_offending_trace() -> None:
    world = World(settle=False)
    pair = world.punch(A)
    world.record(A, world.entries[(A, pair.nonce)], "finish_lock", "Idle", "Locked")
    with pytest.raises(Violation) as caught:
        world.check()
    assert caught.value.prop == props.TRACE
    assert "Idle --finish_lock--> Locked" in str(caught.value)


def test_state_written_around_the_machine_is_caught() -> None:
    world = World(settle=False)
    pair = world.punch(A)
    world.entries[(B, pair.nonce)].state = "Expired"  # no transition recorded
    with pytest.raises(Violation) as caught:
        world.check()
    assert caught.value.prop == props.TRACE
    assert "last recorded transition left it Idle" in str(caught.value)


def test_clean_handover_sees_a_keepalive_still_in_flight() -> None:
    """Without the drain, the pinger hands out while its ping (sent at punch) is still in the network."""
    world = World(settle=False)
    pair = world.punch(A)
    assert world.keepalive_in_flight(pair.pair)
    with no_drain(), pytest.raises(Violation) as caught:  # raised by the check after the delivery
        link = world.take(A, pair)
        assert link is not None
        for _ in range(4):
            world.deliver_signal(link, link.resp_node)
            world.deliver_signal(link, link.ini_node)
    assert caught.value.prop == props.CLEAN_HANDOVER
    assert "Locked --use--> InUse" in str(caught.value)


def test_datagrams_die_after_their_lifetime() -> None:
    world = World(settle=False)
    world.punch(A)
    assert world.sim.network.in_flight
    world.advance(MAX_LIFETIME)
    assert world.sim.network.in_flight == []
    world.check()


def test_claim_without_a_session_is_a_leak() -> None:
    world = World(settle=False)
    pair = world.punch(A)
    world.nodes[A].pool.claim(pair.nonce, world.now)  # a claim no session owns: NoLeak
    world.nodes[A].pump()
    with pytest.raises(Violation) as caught:
        world.check()
    assert caught.value.prop == props.NO_LEAK


def test_trace_validation_uses_the_specs_relation() -> None:
    """The tables the trace is validated against are exactly spec/*.toml's transition relation."""
    for name, spec in load_machines(SPEC).items():
        table = TABLES[name]
        assert {key: t.target for key, t in spec.table().items()} == {
            key: target for key, (target, _guard) in table.transitions.items()}
        assert (table.initial, table.final) == (spec.initial, spec.final)
