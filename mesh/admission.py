"""Backpressure for spawns: a burst is refused early with Busy and a retry hint, rather
than queued until its callers time out (issue 22).

The supervisor starts at most START_CONCURRENCY children at once; more spawns wait for a
slot. Knowing how many wait and how fast starts finish lately, it can tell a spawn that
would not start before its caller stops waiting (the request's ttl), and refuse it at
once with Busy and `retry_after_ms`; a Busy with that hint is retryable, so the client
waits that long and sends it again. A spawn that waited for a slot past its caller's
deadline does no work: it is refused the same way when its turn comes.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .clock import Clock
from .errors import Busy

WINDOW_S = 2.0     # starts finished within this long make the rate
MAX_HINT_S = 5.0   # the longest retry hint given


class SpawnQueue:
    def __init__(self, clock: Clock, capacity: int):
        self.clock, self.capacity = clock, capacity
        self.waiting = 0  # spawns whose start has not finished (under way or waiting for a slot)
        self._finished: deque[float] = deque()

    def begin(self) -> None:
        self.waiting += 1

    def end(self) -> None:
        self.waiting -= 1
        self._finished.append(self.clock.now())
        self._trim()

    def rate(self) -> float:
        """Starts finished per second lately."""
        self._trim()
        return len(self._finished) / WINDOW_S

    def refusal(self, ttl_s: float | None) -> Busy | None:
        """Busy for a spawn that would not start within `ttl_s`; None to take it."""
        if not ttl_s or self.waiting < self.capacity:
            return None
        rate = self.rate()
        if rate <= 0:  # nothing finished lately: no estimate to refuse on
            return None
        wait = (self.waiting - self.capacity + 1) / rate
        if wait <= ttl_s:
            return None
        return busy(f"{self.waiting:,} spawns are waiting to start ({rate:,.0f} a second): this one would "
                    f"wait about {wait:.1f}s, longer than its caller's {ttl_s:g}s", wait - ttl_s)

    def _trim(self) -> None:
        horizon = self.clock.now() - WINDOW_S
        while self._finished and self._finished[0] < horizon:
            self._finished.popleft()


def busy(message: str, retry_after_s: float) -> Busy:
    return Busy(message, {"retry_after_ms": max(1, int(min(MAX_HINT_S, retry_after_s) * 1000))})


class Slots:
    """At most `n` holders at once (`async with slots:`); the others wait in arrival order.

    In place of asyncio.Semaphore, whose release walks past the waiters it woke that have
    not run yet (up to `n` of them): 50,000 waiters through 512 slots took 1.9 s of the
    loop there, 1.1 s here. A release hands its slot straight to the first waiter still
    waiting, and a waiter that gave up is skipped when its turn comes: O(1) per
    operation, amortized."""

    def __init__(self, n: int):
        self.free = n
        self._waiters: deque[asyncio.Future] = deque()

    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def __aenter__(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # done: a release handed its slot to this waiter
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed over just as it was cancelled: pass it on
            raise

    async def __aexit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.free += 1
