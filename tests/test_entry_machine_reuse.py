"""The reusable per-thread EntryMachine behaves exactly like a machine bound afresh per transition.

``natpool.core.entry._run_machine`` (via ``natpool.core.binding.fire``) fires events on one machine per thread
bound to a proxy model. These tests run the same random operations against
the real code and against a reference that binds a fresh ``EntryMachine``
for every event, and require identical states, listener callbacks, events
and errors.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from statemachine.exceptions import TransitionNotAllowed

import natpool.core.entry as entry_mod
from natpool.config import PairConfig
from natpool.core import binding
from natpool.core.entry import ExpiryReason, PairEntry
from natpool.endpoints import Endpoint, EndpointPair
from natpool.errors import InvalidState
from natpool.machines import EntryMachine
from natpool.machines.entry import EVENTS, EntryEvent
from natpool.wire.frame import Frame, Kind, encode

ALICE = Endpoint("alice", "127.0.0.1", 40001)
BOB = Endpoint("bob", "127.0.0.1", 40002)
CFG = PairConfig(lock_timeout=PairConfig().no_inbound_timeout - PairConfig().ping_interval, settle_time=0.5)


def _fresh_run_machine(entry: PairEntry, event: EntryEvent, listeners: tuple[object, ...]) -> None:
    """The reference: a fresh binding per event (what the runtime did before the reuse)."""
    EntryMachine(model=entry, start_value=entry.state, listeners=list(listeners)).fire(event)


class Recorder:
    """Listener recording what python-statemachine tells it, with the model it passes."""

    def __init__(self, entries: list[PairEntry]) -> None:
        self.entries = entries
        self.seen: list[tuple[str, str, str, int]] = []

    def after_transition(self, event: Any, source: Any, target: Any, model: Any) -> None:
        index = next(i for i, e in enumerate(self.entries) if e is model)  # the real entry, not the proxy
        self.seen.append((str(event), str(source.value), str(target.value), index))


OPS = st.lists(
    st.tuples(
        st.integers(0, 3),  # which entry
        st.sampled_from(["begin_lock", "finish_lock", "abort_lock", "use", "expire", "pong", "tick", "raw"]),
        st.sampled_from(EVENTS),  # for "raw": an event fired straight at the machine, table or not
    ),
    max_size=40,
)


def _run(ops: list[tuple[int, str, str]], fresh: bool, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    with monkeypatch.context() as m:
        if fresh:
            m.setattr(entry_mod, "_run_machine", _fresh_run_machine)
        entries: list[PairEntry] = []
        rec = Recorder(entries)
        for i in range(4):
            pair = EndpointPair(ALICE, BOB, 0x100 + i)
            entries.append(PairEntry(pair, "alice" if i % 2 == 0 else "bob", i % 2 == 0, CFG, 0.0, (rec,)))
        trace: list[object] = []
        now = 0.0
        for index, op, raw_event in ops:
            now += 0.3
            e = entries[index]
            try:
                if op == "begin_lock":
                    trace.append(e.begin_lock(now))
                elif op == "finish_lock":
                    trace.append(e.finish_lock(now))
                elif op == "abort_lock":
                    e.abort_lock(now)
                elif op == "use":
                    trace.append(e.use(now))
                elif op == "expire":
                    e.expire(ExpiryReason.CLOSED, now)
                elif op == "pong":  # answers the pinger's outstanding ping (changes ``drained``)
                    e.datagrams_to_send(now)
                    e.receive_datagram(encode(Frame(e.nonce, Kind.PONG)), ("127.0.0.1", e.remote.port), now)
                elif op == "tick":
                    e.handle_timer(now)
                else:  # bypass the table pre-check: the machine alone decides (guards included)
                    event: EntryEvent = raw_event  # type: ignore[assignment]
                    entry_mod._run_machine(e, event, e._listeners)
                    trace.append("fired")
            except (TransitionNotAllowed, InvalidState) as exc:
                trace.append(type(exc).__name__)
            trace.append(tuple(x.state for x in entries))
        trace.append(rec.seen)
        trace.append([[(type(ev).__name__, ev) for ev in iter(x.next_event, None)] for x in entries])
        return trace


@given(OPS)
def test_reusable_machine_matches_fresh_binding(ops: list[tuple[int, str, str]]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        assert _run(ops, fresh=False, monkeypatch=mp) == _run(ops, fresh=True, monkeypatch=mp)


def _entry(nonce: int, listeners: tuple[object, ...] = ()) -> PairEntry:
    return PairEntry(EndpointPair(ALICE, BOB, nonce), "bob", False, CFG, 0.0, listeners)


def test_a_listener_that_transitions_another_entry_gets_a_fresh_binding() -> None:
    other = _entry(0x2)
    seen: list[tuple[int, str, str]] = []

    class Chain:
        def after_transition(self, event: Any, source: Any, target: Any, model: Any) -> None:
            seen.append((model.nonce, str(source.value), str(target.value)))
            if model is not other and str(event) == "begin_lock":
                assert other.begin_lock(1.0)  # reentrant: the reusable machine is busy

    chain = Chain()
    first = _entry(0x1, (chain,))
    other._listeners = (chain,)
    assert first.begin_lock(1.0)
    assert (first.state, other.state) == ("InLocking", "InLocking")
    assert seen == [(0x1, "Idle", "InLocking"), (0x2, "Idle", "InLocking")]
    first.abort_lock(2.0)  # the reusable machine still works afterwards
    assert first.state == "Idle"


def test_a_failing_listener_discards_the_reusable_machine() -> None:
    class Boom:
        armed = True

        def after_transition(self) -> None:
            if self.armed:
                raise RuntimeError("listener failed")

    boom = Boom()
    e = _entry(0x3, (boom,))
    with pytest.raises(RuntimeError):
        e.begin_lock(1.0)
    assert (EntryMachine, id(boom)) not in binding.reusable_machines()
    boom.armed = False
    state = e.state
    e2 = _entry(0x4, (boom,))
    assert e2.begin_lock(1.0)
    assert e2.state == "InLocking"
    assert state in ("Idle", "InLocking")


def test_transitions_on_other_threads_use_their_own_machine() -> None:
    entries = [_entry(0x10 + i) for i in range(4)]
    machines: list[object] = []

    def work(e: PairEntry) -> None:
        assert e.begin_lock(1.0)
        e.abort_lock(1.1)
        machines.append(binding.reusable_machines()[(EntryMachine,)].machine)

    threads = [threading.Thread(target=work, args=(e,)) for e in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.state for e in entries] == ["Idle"] * 4
    assert len({id(m) for m in machines}) == 4


def test_the_proxy_keeps_no_entry_between_transitions() -> None:
    e = _entry(0x20)
    assert e.begin_lock(1.0)
    reusable = binding.reusable_machines()[(EntryMachine,)]
    assert reusable.proxy.target is None
    assert reusable.machine.model is reusable.proxy
    assert not reusable.busy
