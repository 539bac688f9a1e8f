"""One agent incarnation inside a node: mailbox, the message in hand, the reply window.

A Runner handles one message at a time. A plain handler runs inline, in the loop turn
that read the message; an async one runs as a task while later messages wait in the
mailbox (bounded). After every message the runner packs the state and compares it with
the last good one. A message that changed the state, or that sends anything (casts,
timers), is an *effect*: the state goes into the node's current commit group, the call's
reply is recorded in the window (so a repeat of its request id is answered from the
record, G2), and the reply and the casts leave only when that group is committed (G1).
A message with no effect is answered at once, unless an earlier change of this agent is
still uncommitted, in which case it waits for that commit too.

A crash (an exception that is not a CallError) answers the caller with AgentCrashed,
throws away what the handler did, keeps the last good state and the mailbox, and
reports the exit to the supervisor, which decides whether and how to restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import msgpack

from . import supervision, wire
from .agent import Agent, CallContext, TimerRef
from .caller import derived_id
from .errors import AgentCrashed, AgentDown, Busy, CallError, CallTimeout, error_to_wire
from .wire import Kind

if TYPE_CHECKING:
    from .node import Node, Origin

log = logging.getLogger("mesh.runner")

STARTING, RUNNING, CRASHED, STOPPED = "starting", "running", "crashed", "stopped"


class Envelope:
    """A message waiting for or being handled by an agent."""

    __slots__ = ("msg", "origin", "deadline")

    def __init__(self, msg: wire.Msg, origin: "Origin", deadline: float):
        self.msg, self.origin, self.deadline = msg, origin, deadline


class Runner:
    __slots__ = (
        "node", "name", "kind", "args", "agent", "incarnation", "seq", "status", "mailbox",
        "inflight", "window", "unsaved", "forgotten", "last_state", "pending_group", "effects", "stop_reason",
        "task", "started_at", "handled", "restarts", "_current_rid", "_nested", "supervisor",
        "interrupted", "replicas", "superseded",
    )

    def __init__(self, node: "Node", name: str, kind: str, args: dict, incarnation: int):
        self.node, self.name, self.kind, self.args = node, name, kind, args
        self.incarnation = incarnation
        self.agent: Agent | None = None
        self.seq = 0
        self.status = STARTING
        self.mailbox: deque[Envelope] | None = None
        self.inflight: dict[str, list] = {}
        self.window: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # rid -> (response, time)
        self.unsaved: list[tuple[str, bytes, float]] = []  # recorded since the last commit
        self.forgotten: list[str] = []                     # aged out since the last commit
        self.last_state: bytes | None = msgpack.packb(None)  # None: not durable, read the store
        self.pending_group = None
        self.effects: list | None = None
        self.stop_reason: str | None = None
        self.task: asyncio.Task | None = None
        self.started_at = 0.0
        self.handled = 0
        self.restarts = 0
        self._current_rid: str | None = None
        self._nested = 0
        self.supervisor: str | None = None
        self.interrupted = False
        self.replicas: tuple[str, ...] = ()  # hosts that hold a copy of every commit
        # dropped, or replaced by an incarnation that did not take over its memory: nothing
        # it did after its last commit may be acknowledged any more, whatever lands later
        self.superseded = False

    @property
    def clock(self):
        return self.node.clock

    @property
    def busy(self) -> bool:
        return self.task is not None or self.status != RUNNING

    def depth(self) -> int:
        return len(self.mailbox) if self.mailbox else 0

    # --- intake ------------------------------------------------------------------------------

    def deliver(self, env: Envelope) -> None:
        msg = env.msg
        rid = msg.id if msg.kind == Kind.CALL else None
        if rid is not None:
            # only a running incarnation answers from its window: a crashed one may hold the
            # reply of a call whose commit failed; the next incarnation's window is the store's
            recorded = self.window.get(rid) if self.status == RUNNING else None
            if recorded is not None:
                self.node.stats["replayed"] += 1
                self.node.send_response(self, [env.origin], rid, recorded[0])
                return
            joined = self.inflight.get(rid)
            if joined is not None:
                joined.append(env.origin)
                return
        if self.busy or self.mailbox:
            if self.mailbox is None:
                self.mailbox = deque()
            if len(self.mailbox) >= self.node.limits.mailbox:
                self.node.stats["mailbox_full"] += 1
                if rid is not None:
                    err = Busy(f"mailbox of {self.name!r} is full ({self.node.limits.mailbox})")
                    self.node.send_response(self, [env.origin], rid, error_response(err))
                return
            self.mailbox.append(env)
            if rid is not None:
                self.inflight[rid] = [env.origin]
            return
        if rid is not None:
            self.inflight[rid] = [env.origin]
        self._handle(env)

    def run_mailbox(self) -> None:
        while self.mailbox and not self.busy:
            env = self.mailbox.popleft()
            if env.msg.kind == Kind.CALL and env.msg.id in self.window:
                self.node.stats["replayed"] += 1  # waited here while an earlier attempt committed
                self._answer(env, self.window[env.msg.id][0])
                continue
            if env.msg.kind == Kind.CALL and self.clock.now() > env.deadline:
                # its caller has given up; running it now would only surprise
                self.node.stats["expired"] += 1
                self._answer(env, error_response(CallTimeout(f"call to {self.name!r} expired in its mailbox")))
                continue
            self._handle(env)

    # --- handling ----------------------------------------------------------------------------

    def _handle(self, env: Envelope) -> None:
        msg, agent = env.msg, self.agent
        if msg.kind == Kind.CALL and agent.max_batch > 1:
            self._handle_batch(env)
            return
        self._current_rid = msg.id if msg.kind == Kind.CALL else None
        self._nested = 0
        self.effects = []
        self.handled += 1
        envs = [env]
        try:
            if msg.kind == Kind.CALL:
                stream = self.node.streamer(env) if msg.meta and msg.meta.get("stream") else None
                result = agent.handle_call(msg.body, CallContext(msg.id, msg.sender, env.deadline, self, stream))
            elif msg.kind == Kind.CAST:
                result = agent.handle_cast(msg.body)
            else:
                result = agent.handle_info(msg.body)
        except CallError as err:
            self._finish(envs, [err])
            return
        except Exception as exc:
            self._crash(envs, exc, supervision.CRASH)
            return
        if type(result) is CoroutineType:
            self._start_task(envs, result, single=True)
        else:
            self._finish(envs, [result])

    def _handle_batch(self, first: Envelope) -> None:
        """Hand this call and the calls queued behind it to handle_call_batch at once."""
        envs = [first]
        mailbox, now = self.mailbox, self.clock.now()
        while mailbox and len(envs) < self.agent.max_batch and mailbox[0].msg.kind == Kind.CALL:
            env = mailbox.popleft()
            if now > env.deadline:
                self.node.stats["expired"] += 1
                self._answer(env, error_response(CallTimeout(f"call to {self.name!r} expired in its mailbox")))
            else:
                envs.append(env)
        self._current_rid = None
        self.effects = []
        self.handled += len(envs)
        ctxs = [CallContext(e.msg.id, e.msg.sender, e.deadline, self) for e in envs]
        try:
            results = self.agent.handle_call_batch([e.msg.body for e in envs], ctxs)
        except CallError as err:
            self._finish(envs, [err] * len(envs))
            return
        except Exception as exc:
            self._crash(envs, exc, supervision.CRASH)
            return
        if type(results) is CoroutineType:
            self._start_task(envs, results, single=False)
        else:
            self._finish_batch(envs, results)

    def _start_task(self, envs: list[Envelope], coro, single: bool) -> None:
        self.started_at = self.clock.now()
        self.task = asyncio.ensure_future(self._run_async(envs, coro, single))
        self.node.busy_runners.add(self)

    async def _run_async(self, envs: list[Envelope], coro, single: bool) -> None:
        try:
            result = await coro
        except asyncio.CancelledError:
            self._end_task()
            if not self.interrupted:  # cancelled by the handler deadline
                self._crash(envs, TimeoutError(f"handler ran past {self.node.timing.handler_timeout_s:g}s"), supervision.TIMEOUT)
            else:  # this incarnation was stopped or replaced: its callers try the next one
                down = error_response(AgentDown(f"{self.name!r} was restarted while handling this call"))
                for env in envs:
                    if env.msg.kind == Kind.CALL:
                        self._answer(env, down)
            return
        except CallError as err:
            self._end_task()
            self._finish(envs, [err] * len(envs))
        except Exception as exc:
            self._end_task()
            self._crash(envs, exc, supervision.CRASH)
            return
        else:
            self._end_task()
            if single:
                self._finish(envs, [result])
            else:
                self._finish_batch(envs, result)
        self.run_mailbox()

    def _end_task(self) -> None:
        self.task = None
        self.node.busy_runners.discard(self)

    def _finish_batch(self, envs: list[Envelope], results: Any) -> None:
        if not isinstance(results, list) or len(results) != len(envs):
            self._crash(envs, TypeError(f"handle_call_batch must return a list of {len(envs)} replies"), supervision.CRASH)
            return
        self._finish(envs, results)

    def _finish(self, envs: list[Envelope], results: list) -> None:
        """Commit what the handler did and answer: `results[i]` is envs[i]'s reply, or a
        CallError to answer it with."""
        try:
            packed = msgpack.packb(self.agent.state)
        except Exception as exc:
            self._crash(envs, TypeError(f"state is not serializable: {exc}"), supervision.CRASH)
            return
        responses: list[bytes | None] = []
        for env, result in zip(envs, results):
            if env.msg.kind != Kind.CALL:
                if isinstance(result, CallError):
                    log.info("agent %s answered a %s with %s", self.name, env.msg.kind.name.lower(), result)
                responses.append(None)
            elif isinstance(result, CallError):
                responses.append(error_response(result))
            else:
                try:
                    responses.append(wire.REPLY_TAG + msgpack.packb(result))
                except Exception as exc:
                    self._crash(envs, TypeError(f"reply is not serializable: {exc}"), supervision.CRASH)
                    return
        effects, self.effects = self.effects, None
        if packed != self.last_state or effects:
            self.seq += 1
            self.last_state = packed
            for env, response in zip(envs, responses):
                if response is not None:
                    self._record(env.msg.id, response)
            self.node.mark_dirty(self)
            if effects:
                self.node.queue_effects(self, effects)
        for env, response in zip(envs, responses):
            if response is not None:
                self._answer(env, response)
        if self.stop_reason is not None:
            reason, self.stop_reason = self.stop_reason, None
            self.node.stop_runner(self, reason, supervision.stop_exit(reason))

    def _record(self, rid: str, response: bytes) -> None:
        """Keep the response for a repeat of `rid`: for `dedup_s` seconds, and at most
        `dedup_window` of them (oldest out first)."""
        window, limits = self.window, self.node.limits
        if limits.dedup_window <= 0:
            return
        now = self.clock.wall()
        window[rid] = (response, now)
        window.move_to_end(rid)
        self.unsaved.append((rid, response, now))
        oldest = now - limits.dedup_s
        while window and (len(window) > limits.dedup_window or next(iter(window.values()))[1] < oldest):
            self.forgotten.append(window.popitem(last=False)[0])

    def take_replies(self) -> tuple[list, list]:
        """The replies recorded and forgotten since the last commit (for the next one)."""
        unsaved, forgotten = self.unsaved, self.forgotten
        self.unsaved, self.forgotten = [], []
        return unsaved, forgotten

    def _answer(self, env: Envelope, response: bytes) -> None:
        origins = self.inflight.pop(env.msg.id, None) or [env.origin]
        self.node.send_response(self, origins, env.msg.id, response)

    def _crash(self, envs: list[Envelope], exc: BaseException, how: str) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("agent %s (incarnation %d) crashed: %s", self.name, self.incarnation, reason)
        self.node.stats["crashes"] += 1
        self.effects = None
        self.stop_reason = None
        err = AgentCrashed(f"{self.name}: {reason}", {"exception": type(exc).__name__})
        for env in envs:
            if env.msg.kind == Kind.CALL:
                self._answer(env, error_response(err))
        self.status = CRASHED
        self.agent = None
        self.node.report_exit(self, how, reason)

    # --- lifecycle -----------------------------------------------------------------------------

    def crash(self, exc: BaseException, how: str = supervision.CRASH) -> None:
        """Crash from outside a handler: its state could not be made durable (the store
        failed: CRASH; a replica host did not answer: LOST, which is no fault of its own)."""
        self.interrupt()
        self._crash([], exc, how)

    def interrupt(self) -> None:
        """Cancel the handler in flight because this incarnation ends; its callers get
        AgentDown and try the next incarnation."""
        if self.task is not None:
            self.interrupted = True
            self.task.cancel()

    def check_deadline(self, now: float) -> None:
        """Cancel an async handler that ran past the handler deadline (a silent agent)."""
        if self.task is not None and now - self.started_at > self.node.timing.handler_timeout_s:
            self.task.cancel()

    def fail_queued(self, make_error) -> None:
        """Answer every waiting call with make_error(); casts are handed to `node.forward`."""
        mailbox, self.mailbox = self.mailbox, None
        for env in mailbox or ():
            if env.msg.kind != Kind.CALL:
                self.node.forward(env)
        for rid, origins in self.inflight.items():
            self.node.send_response(self, origins, rid, error_response(make_error()))
        self.inflight = {}

    # --- services for Agent ----------------------------------------------------------------

    def _next_rid(self) -> str | None:
        if self._current_rid is None:
            return None
        self._nested += 1
        return derived_id(self._current_rid, self._nested)

    async def call_out(self, name: str, msg: Any, timeout: float | None) -> Any:
        timeout = timeout if timeout is not None else self.node.timing.call_timeout_s
        return await self.node.caller.call(name, msg, timeout, self._next_rid())

    def cast_out(self, name: str, msg: Any) -> None:
        if self.effects is not None:
            self.effects.append(("cast", name, msg))
        else:
            self.node.caller.cast(name, msg)

    def send_after(self, delay_s: float, msg: Any) -> TimerRef:
        ref = TimerRef()
        if self.effects is not None:
            self.effects.append(("timer", delay_s, msg, ref))
        else:
            self.node.arm_timer(self, delay_s, msg, ref)
        return ref

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        if self.effects is not None:
            self.effects.append(("stop",))

    async def spawn_out(self, name: str, kind: str, args: dict, restart: str, supervisor: str | None = None) -> dict:
        return await self.node.spawn_via_supervisor(name, kind, args, restart, self._next_rid(), supervisor)


def error_response(err: CallError) -> bytes:
    return wire.ERROR_TAG + msgpack.packb(error_to_wire(err))
