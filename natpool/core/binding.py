"""Fire events on the generated machines, bound to a runtime object only while it transitions.

Holding one python-statemachine instance per entry costs ~10.7 KB, and a
fresh binding per event ~150–215 µs. python-statemachine reads the active
state from the model's ``state`` field on every event (its configuration
cache is keyed by the identity of that value) and resolves guards as
attribute reads on the model given at construction. So ONE machine per
thread and machine class, bound to a proxy whose ``state`` and guard fields
forward to a swappable target, behaves per event exactly like a machine
freshly bound to that target, at about a third of the cost. Every
transition still goes through the generated class.

``machine.model`` (what listeners receive as ``model``) is the real target
while the event runs. A fresh binding is used instead when the target state
is final (the engine stops for good there), when the event is not in the
table (so the machine raises exactly as it would), and on reentry (a
listener that transitions another object mid-event). A failed fire discards
the reusable machine, so no half-processed engine state carries over.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from statemachine import StateMachine

from natpool.machines.tables import Table

_MAX_REUSABLE: Final = 8  # per thread: pools with distinct listener objects come and go (tests)
_local = threading.local()


class _ProxyBase:
    __slots__ = ("target",)

    def __init__(self, target: object) -> None:
        self.target: Any = target

    def _target(self) -> Any:
        target = self.target
        assert target is not None, "reusable machine used outside binding.fire"
        return target


def _forward(name: str) -> property:
    return property(lambda self: getattr(self._target(), name))


_PROXY_TYPES: dict[type[StateMachine], type[_ProxyBase]] = {}


def _proxy_type(cls: type[StateMachine], table: Table) -> type[_ProxyBase]:
    """A proxy class forwarding ``state`` and every guard the spec names for ``cls``."""
    proxy = _PROXY_TYPES.get(cls)
    if proxy is None:
        namespace: dict[str, object] = {
            "__slots__": (),
            "state": property(lambda self: self._target().state,
                              lambda self, value: setattr(self._target(), "state", value)),
        }
        for guard in sorted({g for _, g in table.transitions.values() if g}):
            namespace[guard] = _forward(guard)
        proxy = _PROXY_TYPES[cls] = type(f"{cls.__name__}Proxy", (_ProxyBase,), namespace)
    return proxy


class Reusable:
    """One thread's reusable machine for one machine class and listener set."""

    __slots__ = ("busy", "listeners", "machine", "proxy")

    def __init__(self, cls: type[StateMachine], table: Table, target: Any, listeners: tuple[object, ...]) -> None:
        self.proxy = _proxy_type(cls, table)(target)
        self.listeners = listeners  # held, so the ids in the cache key stay unique
        self.machine = cls(model=self.proxy, start_value=target.state, listeners=list(listeners))
        self.busy = False


def reusable_machines() -> dict[tuple[object, ...], Reusable]:
    """This thread's cache, keyed by ``(machine class, *listener ids)`` (for tests and diagnostics)."""
    cache: dict[tuple[object, ...], Reusable] | None = getattr(_local, "machines", None)
    if cache is None:
        cache = _local.machines = {}
    return cache


def fire(cls: type[StateMachine], table: Table, target: Any, event: str, listeners: tuple[object, ...]) -> None:
    """Fire ``event`` on ``target`` (whose ``state`` field the machine owns) through ``cls``."""
    hit = table.transitions.get((target.state, event))
    if hit is not None and hit[0] not in table.final:
        cache = reusable_machines()
        key = (cls, *map(id, listeners))
        reusable = cache.get(key)
        if reusable is None:
            if len(cache) >= _MAX_REUSABLE:
                del cache[next(iter(cache))]
            reusable = cache[key] = Reusable(cls, table, target, listeners)
        if not reusable.busy:
            reusable.busy = True
            machine, proxy = reusable.machine, reusable.proxy
            proxy.target = target
            machine.model = target
            try:
                machine.send(event)
            except BaseException:
                if cache.get(key) is reusable:  # not if a nested call already replaced it
                    del cache[key]
                raise
            finally:
                proxy.target = None
                machine.model = proxy
                reusable.busy = False
            return
    cls(model=target, start_value=target.state, listeners=list(listeners)).send(event)
