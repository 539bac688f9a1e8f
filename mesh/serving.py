"""The Serving behaviour: an agent that holds a model and answers in dynamic batches.

    class Doubler(Serving):
        batch_size = 32
        def load(self, args):              # in the worker thread, once per incarnation
            self.factor = 2
        def predict_batch(self, inputs):   # in the worker thread; one output per input
            return [x * self.factor for x in inputs]

    call {"input": x}          -> output
    call {"inputs": [x, ...]}  -> [output, ...]
    call {"op": "stats"}       -> {"batches", "inputs", "mean_batch", "queue_ms", "inference_ms", ...}

Why a worker thread: inference takes milliseconds to seconds, and the node's one event
loop must keep answering every other agent (and its heartbeats) meanwhile. `load` and
`predict_batch` run in one thread of the agent's own; their results come back to the
loop through asyncio's thread-safe futures, so no socket, store or agent state is
touched from the worker (pyzmq sockets are not thread-safe). Libraries that release
the GIL (onnxruntime, numpy) then run beside the loop; one that holds it would stall
the loop and should run in a process instead.

Why the worker runs at a lower CPU priority (`worker_nice`, 10 by default, added to the
node's own; Linux, where a thread has a nice value of its own): on a host with fewer
cores than busy threads, the scheduler otherwise gives the model's thread and the node's
loop equal turns, and a `get` to another agent waits behind a slice of inference. At
nice 10 the loop runs as soon as it has work; the model keeps every cycle the loop does
not use. Threads the library starts from the worker (onnxruntime's, tokenizers') inherit
it. 0 turns it off.

Loading: `load(args)` starts in the worker when the incarnation starts (`init` does not
wait for it). Calls that come meanwhile wait for it, each within its own deadline (a
caller whose deadline passes gets CallTimeout saying the model is still loading); a
load that raises crashes the agent at the first call that needs the model, so its
supervisor restarts it and the next incarnation loads again.

Dynamic batching, as Nx.Serving does it: a call that finds the agent idle waits up to
`batch_timeout_ms` for others (the runtime's `batch_wait_s`); the calls gathered, up to
`batch_size` of them, are handled together, their inputs joined into batches of at most
`batch_size` inputs (a call may carry several; a large call spans batches) and each
caller gets its own outputs back. Right before each batch runs, the inputs of callers
whose deadline has passed are dropped: no inference for nobody. At most `queue` calls
wait; beyond that callers get Busy at once (the runtime's `mailbox_limit`).

A `predict_batch` that raises (or returns the wrong number of outputs) crashes the agent:
the callers of the calls in hand get AgentCrashed naming the exception, the supervisor
restarts the agent, and the new incarnation loads the model again.

The behaviour keeps no durable state (the model is code and files, not state), so its
replies need no commit and leave as soon as inference ends. Its figures are per
incarnation, in memory. Settings are class attributes, and may be given in args
(`batch_size`, `batch_timeout_ms`, `queue`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .agent import Agent, CallContext
from .errors import BadRequest, CallError, CallTimeout

log = logging.getLogger("mesh.serving")

SAMPLES = 1024  # the newest samples kept for the percentiles


class Serving(Agent):
    """Subclass this, and override `load` and `predict_batch` (and `inputs` for another
    call shape). Do not override handle_call_batch."""

    batch_size: int = 32          # inputs per predict_batch, at most
    batch_timeout_ms: float = 5   # how long a lone call waits for company
    queue: int = 256              # calls that may wait; beyond, Busy at once
    max_call_inputs: int = 1024   # inputs one call may carry
    worker_nice: int = 10         # added to the worker thread's nice value (0: the loop's own)

    # --- what a kind provides --------------------------------------------------------------

    def load(self, args: dict) -> None:
        """Load the model (files, sessions). Runs in the worker thread, once per
        incarnation, before any predict_batch. Raising makes the incarnation crash."""

    def predict_batch(self, inputs: list) -> list:
        """The outputs of `inputs`, one each, in order. Runs in the worker thread; may
        raise (the agent crashes, its batch's callers get AgentCrashed)."""
        raise NotImplementedError(f"{type(self).__name__} has no predict_batch")

    def inputs(self, msg: Any) -> tuple[list, bool]:
        """A call's inputs, and whether it asked for several (its reply is then a list).
        The default takes {"input": x} or {"inputs": [x, ...]}; raise BadRequest otherwise."""
        if isinstance(msg, dict) and "input" in msg:
            return [msg["input"]], False
        if isinstance(msg, dict) and isinstance(msg.get("inputs"), list):
            return msg["inputs"], True
        raise BadRequest(f"{type(self).__name__}: send {{'input': x}} or {{'inputs': [x, ...]}}")

    # --- the behaviour -----------------------------------------------------------------------

    def init(self, args: dict, state: Any) -> Any:
        self.batch_size = int(args.get("batch_size", self.batch_size))
        self.batch_timeout_ms = float(args.get("batch_timeout_ms", self.batch_timeout_ms))
        self.queue = int(args.get("queue", self.queue))
        self.worker_nice = int(args.get("worker_nice", self.worker_nice))
        if self.batch_size < 1 or self.queue < 1 or self.batch_timeout_ms < 0:
            raise ValueError("serving: batch_size and queue must be at least 1, batch_timeout_ms not negative")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"serving: worker_nice must be 0 to 19, not {self.worker_nice}")
        # the runtime's side of it: gather up to batch_size calls, wait for them, bound the queue
        self.max_batch = max(2, self.batch_size)
        self.batch_wait_s = self.batch_timeout_ms / 1000
        self.mailbox_limit = self.queue
        self.figures = Figures()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"serving-{self.name}")
        self.figures.load_started = time.monotonic()
        self._loaded = asyncio.wrap_future(self._worker.submit(self._start_worker, args))
        self._loaded.add_done_callback(self._on_loaded)
        return state

    def _start_worker(self, args: dict) -> None:
        """In the worker thread: lower its priority, then load the model."""
        if self.worker_nice and sys.platform == "linux":
            thread = threading.get_native_id()
            try:
                os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + self.worker_nice))
            except OSError as exc:
                log.warning("serving %s: could not lower the worker's priority: %s", self.name, exc)
        self.load(args)

    def _on_loaded(self, future: asyncio.Future) -> None:
        self.figures.load_s = time.monotonic() - self.figures.load_started
        if future.cancelled():
            return
        err = future.exception()
        if err is not None:
            self.figures.load_error = f"{type(err).__name__}: {err}"[:300]
            log.warning("serving %s: loading the model failed: %s", self.name, self.figures.load_error)

    def terminate(self, reason: str) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def handle_call(self, msg: Any, ctx: CallContext) -> Any:
        return (await self.handle_call_batch([msg], [ctx]))[0]

    async def handle_call_batch(self, msgs: list, ctxs: list[CallContext]) -> list:
        replies: list[Any] = [None] * len(msgs)
        calls = []  # (index, inputs, many)
        for i, msg in enumerate(msgs):
            if isinstance(msg, dict) and msg.get("op") == "stats":
                replies[i] = self.figures.report(self._loaded)
                continue
            try:
                items, many = self.inputs(msg)
                if len(items) > self.max_call_inputs:
                    raise BadRequest(f"{self.name}: at most {self.max_call_inputs} inputs per call, got {len(items)}")
            except CallError as err:
                replies[i] = err
                continue
            if items:
                calls.append((i, items, many))
            else:
                replies[i] = []
        if calls:
            await self._wait_for_model(calls, ctxs, replies)
            await self._run(calls, ctxs, replies)
        return replies

    async def _wait_for_model(self, calls: list, ctxs: list[CallContext], replies: list) -> None:
        if self._loaded.done():
            self._raise_if_load_failed()
            return
        latest = max(ctxs[i].deadline for i, _, _ in calls)
        try:
            await asyncio.wait_for(asyncio.shield(self._loaded), max(0.0, latest - self._runner.clock.now()))
        except TimeoutError:
            pass
        if not self._loaded.done():
            for i, _, _ in calls:
                replies[i] = CallTimeout(f"{self.name}: the model is still loading")
            calls.clear()
            return
        self._raise_if_load_failed()

    def _raise_if_load_failed(self) -> None:
        """A failed load crashes the agent (its supervisor restarts it, and it loads again)."""
        err = self._loaded.exception()
        if err is not None:
            raise RuntimeError(f"loading the model failed: {type(err).__name__}: {err}") from err

    async def _run(self, calls: list, ctxs: list[CallContext], replies: list) -> None:
        """Run the calls' inputs in batches of at most batch_size, dropping those of callers
        whose deadline passed before their batch, and split the outputs per caller."""
        clock = self._runner.clock
        pending = deque((i, j, x) for i, items, _ in calls for j, x in enumerate(items))
        outputs: dict[int, list] = {i: [None] * len(items) for i, items, _ in calls}
        expired: set[int] = set()
        while pending:
            now = clock.now()
            batch = []
            while pending and len(batch) < self.batch_size:
                i, j, x = pending.popleft()
                if i in expired or now > ctxs[i].deadline:
                    if i not in expired:
                        expired.add(i)
                        self.figures.dropped += 1
                    continue
                if j == 0:
                    self.figures.queue_ms.append((now - ctxs[i].received) * 1000)
                batch.append((i, j, x))
            if not batch:
                break
            t0 = time.monotonic()
            results = await asyncio.get_running_loop().run_in_executor(
                self._worker, self.predict_batch, [x for _, _, x in batch])
            self.figures.inference_ms.append((time.monotonic() - t0) * 1000)
            if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                raise TypeError(f"predict_batch returned {type(results).__name__} of "
                                f"{len(results) if hasattr(results, '__len__') else '?'} outputs for {len(batch)} inputs")
            self.figures.batches += 1
            self.figures.inputs += len(batch)
            for (i, j, _), out in zip(batch, results):
                outputs[i][j] = out
        for i, _, many in calls:
            if i in expired:
                replies[i] = CallTimeout(f"{self.name}: the call's deadline passed before its inputs ran")
            else:
                replies[i] = outputs[i] if many else outputs[i][0]


class Figures:
    """What a serving agent measured in this incarnation (`{"op": "stats"}`)."""

    def __init__(self):
        self.batches = self.inputs = self.dropped = 0
        self.queue_ms: deque[float] = deque(maxlen=SAMPLES)
        self.inference_ms: deque[float] = deque(maxlen=SAMPLES)
        self.load_started = 0.0
        self.load_s: float | None = None
        self.load_error: str | None = None

    def report(self, loaded: asyncio.Future) -> dict:
        return {
            "model": "failed" if self.load_error else ("ready" if loaded.done() else "loading"),
            "load_s": None if self.load_s is None else round(self.load_s, 3),
            "load_error": self.load_error,
            "batches": self.batches,
            "inputs": self.inputs,
            "mean_batch": round(self.inputs / self.batches, 2) if self.batches else 0.0,
            "dropped_calls": self.dropped,
            "queue_ms": percentiles(self.queue_ms),
            "inference_ms": percentiles(self.inference_ms),
        }


def percentiles(samples) -> dict:
    """p50 and p99 of the samples, in ms, by the nearest rank."""
    if not samples:
        return {"p50": None, "p99": None}
    ordered = sorted(samples)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99)}
