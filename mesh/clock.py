"""Monotonic time behind a small interface, so logic can run on a fake clock in tests.

Every timer in the mesh goes through a Clock: `call_after` is relative (seconds from
now), `call_at` absolute (on this clock's monotonic scale). Wall-clock time is never
used for deadlines; `wall()` exists only for records that people read (the served
records, log lines), and every wall-clock reading of a node goes through it.

`wall()` adds `wall_offset()`: the seconds in $MESH_WALL_OFFSET_S (default 0), read once
per process. It exists to skew one host's wall clock against the others' (the chaos
suite gives each namespaced host its own offset), from this one place: nothing in the
mesh may decide anything by it, so a skewed host must work as well as any other.

`Backoff` is the wait between the attempts of a retry loop: every loop that tries
again after a failure waits on one, so a loop whose every attempt fails at once (all
links known down) sleeps instead of spinning, and wakes early when something that may
help happens (a link comes up).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import random
import time
from typing import Callable, Protocol

WALL_OFFSET_ENV = "MESH_WALL_OFFSET_S"
RETRY_BASE_S = 0.02   # the first wait of a retry loop
RETRY_CAP_S = 0.5     # the longest: a recovery is noticed within this, or at once when it wakes the wait


_wall_offset: float | None = None


def wall_offset() -> float:
    """This process's wall-clock skew in seconds ($MESH_WALL_OFFSET_S; 0 when unset)."""
    global _wall_offset
    if _wall_offset is None:
        raw = os.environ.get(WALL_OFFSET_ENV, "").strip()
        try:
            _wall_offset = float(raw) if raw else 0.0
        except ValueError:
            raise ValueError(f"${WALL_OFFSET_ENV} must be a number of seconds, not {raw!r}") from None
        if not math.isfinite(_wall_offset):
            raise ValueError(f"${WALL_OFFSET_ENV} must be finite, not {raw!r}")
    return _wall_offset


def wall() -> float:
    """Wall-clock time on this host: time.time() plus the host's offset (see the docstring)."""
    return time.time() + wall_offset()


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock:
    """The real clock: time.monotonic and the running loop's timers."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return wall()

    def call_after(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self.call_after(when - self.now(), callback)

    async def sleep(self, delay: float) -> None:
        """Wait `delay` seconds of this clock (of a fake clock too, as its timers do)."""
        done = asyncio.get_running_loop().create_future()
        timer = self.call_after(delay, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            timer.cancel()


class Backoff:
    """Exponential waits with jitter for one retry loop, capped, never past a deadline.

    The n-th wait is drawn from the upper half of min(cap_s, base_s * 2**n): never zero
    (the loop yields and sleeps), and callers that failed together do not retry in step."""

    def __init__(self, clock: Clock, base_s: float = RETRY_BASE_S, cap_s: float = RETRY_CAP_S,
                 rand: Callable[[], float] = random.random):
        self.clock, self.base_s, self.cap_s, self.rand = clock, base_s, cap_s, rand
        self.attempts = 0

    def next_delay(self) -> float:
        step = min(self.cap_s, self.base_s * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return step / 2 + self.rand() * step / 2

    def reset(self) -> None:
        self.attempts = 0

    async def wait(self, deadline: float | None = None, wake: asyncio.Future | None = None) -> None:
        """Sleep the next delay (at most until `deadline`), or until `wake` is done."""
        delay = self.next_delay()
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - self.clock.now()))
        done = asyncio.get_running_loop().create_future()
        def end(_=None) -> None:
            if not done.done():
                done.set_result(None)
        timer = self.clock.call_after(delay, end)
        if wake is not None:
            wake.add_done_callback(end)
        try:
            await done
        finally:
            timer.cancel()
            if wake is not None:
                wake.remove_done_callback(end)


class _FakeTimer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(Clock):
    """A clock that moves only when a test calls `advance`; timers fire in order then."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._heap: list[tuple[float, int, _FakeTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now

    def call_after(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _FakeTimer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._heap, (timer.when, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every due timer at its own time, in order."""
        end = self._now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
        self._now = end

    def pending(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)
