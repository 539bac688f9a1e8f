"""A node's garbage collector: its pauses follow what the node allocates, not what it holds.

CPython's full collection walks every tracked object with the loop held: about 1 µs an
object on a large heap here, 6.7 s for the 6.7 million objects of a node with 750,000
agents in its registry and records (measured: docs/benchmarks.md, "Three namespaced
hosts"). Any pause past a lease makes the nodes drop their agents (G3). So:

- what is loaded at start is frozen (a launcher freezes it before it forks, so that its
  children share those pages), and so is what survives each full collection: the next
  one walks only what came since;
- a full collection runs as soon as `FULL_AFTER` objects wait in the oldest generation
  (checked on the loop after each middle collection), not when they reach a quarter of
  everything that ever survived; so no collection walks more than a few hundred
  thousand objects (a few tenths of a second), whatever the node holds;
- the youngest generation is collected after 50,000 allocations rather than 700: with
  hundreds of requests in flight, the default collects every few of them and promotes
  what they hold (futures, coroutines, envelopes) into the older generations.

The price: a reference cycle among objects that had survived a full collection is never
freed. Almost everything goes by its count of references; agents stopped after a freeze
left no such cycle (tests/test_gc.py). A collection that holds the loop `SLOW_S` or more
is logged.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("mesh.serve")

YOUNG = 50_000       # allocations between two collections of the youngest generation (Python: 700)
MIDDLE = 3           # ... of those, between two of the middle one (Python: 10), which walks up to 150,000
FULL_AFTER = 50_000  # objects in the oldest generation that make a full collection due
SLOW_S = 1.0         # a collection this long is logged

_began = [0.0]
_due = [False]


def tune() -> None:
    """Set this process's collector as above; its loop calls `check` (see `watch`)."""
    gc.freeze()  # no collection first: on a restart after kill -9 it would cost tens of ms
    gc.set_threshold(YOUNG, MIDDLE, gc.get_threshold()[2])
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def watch(loop: asyncio.AbstractEventLoop, every_s: float = 0.1) -> None:
    """Run `check` on the loop every `every_s` (a collection cannot start one itself)."""
    def tick():
        check()
        loop.call_later(every_s, tick)
    loop.call_soon(tick)


def check() -> None:
    """A full collection now if the oldest generation holds `FULL_AFTER` objects."""
    if _due[0]:
        _due[0] = False
        if len(gc.get_objects(2)) >= FULL_AFTER:
            gc.collect(2)


def _on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _began[0] = time.monotonic()
        return
    took = time.monotonic() - _began[0]
    if info["generation"] == 2:
        gc.freeze()
    elif info["generation"] == 1:
        _due[0] = True  # its survivors went to the oldest generation
    if took >= SLOW_S:
        log.warning("garbage collection of generation %d held the loop %.2fs (%d collected, %d objects frozen)",
                    info["generation"], took, info["collected"], gc.get_freeze_count())
