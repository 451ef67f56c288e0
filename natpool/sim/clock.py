"""Virtual time for the simulator: a clock and a heap scheduler.

Nothing here reads the wall clock: time only moves when the scheduler pops
the next event, so a run is a pure function of its seed and inputs. Events
with equal times fire in the order they were scheduled (a sequence number
breaks ties), which keeps runs deterministic without relying on float luck.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

Callback = Callable[[], None]


class SimulationError(RuntimeError):
    """The simulation itself was misused or detected a livelock (a harness bug, not a protocol outcome)."""


class VirtualClock:
    """Monotonic virtual time in seconds; only the scheduler (or a test) advances it."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        """Move forward by ``dt`` >= 0 and return the new time."""
        if dt < 0:
            raise SimulationError(f"cannot move virtual time backwards by {dt}")
        self._now += dt
        return self._now

    def advance_to(self, t: float) -> float:
        """Move to absolute time ``t``; never backwards."""
        if t < self._now:
            raise SimulationError(f"cannot move virtual time back from {self._now} to {t}")
        self._now = float(t)
        return self._now


class TimerHandle:
    """A scheduled callback; ``cancel()`` is O(1) (the heap entry is skipped lazily)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        return f"TimerHandle(when={self.when}, cancelled={self.cancelled})"


class Scheduler:
    """Heap of ``(time, seq, handle)``; one instance drives a whole simulation.

    ``max_same_time`` bounds how many events may fire without time moving:
    a component that keeps re-arming a timer at ``now`` would otherwise spin
    forever, which is a bug we want reported, not hidden.
    """

    def __init__(self, clock: VirtualClock, max_same_time: int = 1_000_000) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = 0
        self._live = 0
        self.max_same_time = max_same_time
        self._same_time_count = 0
        self._last_time = clock.now()
        self.fired = 0

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        """Schedule ``callback`` at absolute virtual time ``when`` (clamped to now)."""
        now = self.clock.now()
        if when < now:
            when = now
        handle = TimerHandle(when, callback)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, handle))
        return handle

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        return self.call_at(self.clock.now() + max(delay, 0.0), callback)

    def next_time(self) -> float | None:
        """Time of the next live event, or None when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pending(self) -> int:
        """Number of live (not cancelled) scheduled events; O(n), for tests and quiescence checks."""
        return sum(1 for _, _, h in self._heap if not h.cancelled)

    def step(self) -> bool:
        """Fire the next live event (advancing the clock to it); False if none is left."""
        heap = self._heap
        while heap:
            when, _, handle = heapq.heappop(heap)
            if handle.cancelled:
                continue
            handle.cancelled = True  # a fired handle is spent; cancel() afterwards is a no-op
            if when == self._last_time:
                self._same_time_count += 1
                if self._same_time_count > self.max_same_time:
                    raise SimulationError(
                        f"{self.max_same_time} events fired at virtual time {when} without time advancing "
                        "(a timer is re-armed at 'now' forever?)"
                    )
            else:
                self._same_time_count = 0
                self._last_time = when
            self.clock.advance_to(when)
            self.fired += 1
            handle.callback()
            return True
        return False

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Fire every event due at or before ``t``, then set the clock to ``t``.

        With ``stop``, check it after every event and return True as soon as it
        holds (the clock then stays at that event's time). Returns False if the
        deadline was reached without ``stop`` holding.
        """
        if stop is not None and stop():
            return True
        heap = self._heap
        while True:
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
            if not heap or heap[0][0] > t:
                break
            self.step()
            if stop is not None and stop():
                return True
        if t > self.clock.now():
            self.clock.advance_to(t)
        return False
