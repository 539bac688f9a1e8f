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

The window and the requests that share an id are Runner's base class, in replies.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import deque
from enum import StrEnum
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Callable, Protocol

import msgpack

from . import logs, otel, supervision, wire
from .agent import Agent, CallContext, TimerRef
from .caller import derived_id
from .store import unpack_state
from .errors import AgentCrashed, AgentDown, BadRequest, Busy, CallError, CallTimeout
from .replies import Replies, error_response, rerun
from .wire import Kind

if TYPE_CHECKING:
    from collections import Counter

    from .caller import Caller
    from .clock import Clock
    from .commits import Commits
    from .config import Limits, Timing
    from .incarnations import Incarnations
    from .node import Origin

log = logging.getLogger("mesh.runner")

# pack the state after calls declared read-only too, and crash the ones that changed it
CHECK_READS = os.environ.get("MESH_CHECK_READS", "") not in ("", "0")


class Host(Protocol):
    """What a runner needs of the node it runs in (Node is one; so could a test be)."""

    clock: "Clock"
    limits: "Limits"
    timing: "Timing"
    stats: "Counter"
    caller: "Caller"              # for the calls its agent makes
    commits: "Commits"            # its changes, replies and effects, durable before they leave
    incarnations: "Incarnations"  # its own stop, and its exits reported to the supervisor
    busy_runners: set             # runners whose async handler is under way (deadlines)

    def streamer(self, env: "Envelope") -> Callable[[Any], None]: ...

    def forward(self, env: "Envelope") -> None: ...

    async def spawn_via_supervisor(self, name: str, kind: str, args: dict, restart: str, rid: str | None,
                                   supervisor: str | None = None) -> dict: ...

class AgentStatus(StrEnum):
    """Where one incarnation of an agent is, on its node (a supervisor's view of a child
    is another machine: tree.ChildStatus)."""

    STARTING = "starting"  # init ran; its first commit (the claim) is under way
    RUNNING = "running"    # it handles messages
    CRASHED = "crashed"    # a handler raised; its queued calls wait for the supervisor's word
    STOPPED = "stopped"    # it ended (stopped, replaced, or its node stops)


class Envelope:
    """A message waiting for or being handled by an agent."""

    __slots__ = ("msg", "origin", "deadline", "peer", "arrived", "span")

    def __init__(self, msg: wire.Msg, origin: "Origin", deadline: float, peer: str | None = None):
        self.msg, self.origin, self.deadline = msg, origin, deadline
        self.peer = peer  # the authenticated identity that delivered it (see Node.peer)
        self.arrived = 0.0  # when its runner took it (its clock): the start of its queue time
        self.span = None  # its handler's span, while tracing (mesh.otel)


class Runner(Replies):
    __slots__ = (
        "node", "name", "kind", "args", "agent", "incarnation", "seq", "status", "mailbox",
        "inflight", "last_state", "pending_group", "effects", "stop_reason",
        "task", "started_at", "handled", "restarts", "_current_rid", "_parent", "_nested", "supervisor",
        "interrupted", "replicas", "superseded", "durable", "_rollback_error",
        "_running", "since", "vsn", "paused", "_idle", "_gathering", "_checkpointed", "tracer",
        "traced_change", "_reading",
    )

    def in_hand(self) -> list[Envelope]:
        """The messages its handler under way was given (none between two messages)."""
        return list(self._running) if self.task is not None else []

    def __init__(self, node: Host, name: str, kind: str, args: dict, incarnation: int):
        super().__init__(node.clock)
        self.node, self.name, self.kind, self.args = node, name, kind, args
        self.incarnation = incarnation
        self.agent: Agent | None = None
        self.seq = 0
        self.status = AgentStatus.STARTING
        self.mailbox: deque[Envelope] | None = None
        self.inflight: dict[str, list] = {}
        self.last_state: bytes | None = msgpack.packb(None)  # None: not durable, read the store
        self.durable: tuple[int, bytes] | None = None  # (seq, state) of its last commit
        self._rollback_error: CallError | None = None    # set while a rollback cancels a handler
        self._running: list[Envelope] = []                 # the messages of the handler in hand
        self.pending_group = None
        self.effects: list | None = None
        self.stop_reason: str | None = None
        self.task: asyncio.Task | None = None
        self.started_at = 0.0
        self.handled = 0
        self.restarts = 0
        self._current_rid: str | None = None   # the id its nested calls' ids derive from ...
        self._parent: list[Envelope] = []         # ... with the requests (bodies) it names
        self._nested = 0
        self.supervisor: str | None = None
        self.since = 0  # the first incarnation of its life (since its spawn): calls to earlier ones are not its
        self.vsn = 1  # the version of its kind's code that runs it, and that wrote its state
        self.paused = False  # held between two messages by an upgrade (upgrade.py): later ones wait
        self._idle: list[asyncio.Future] = []  # waiting for its handler in hand to finish (see until_idle)
        self.interrupted = False
        self.replicas: tuple[str, ...] = ()  # hosts that hold a copy of every commit
        # dropped, or replaced by an incarnation that did not take over its memory: nothing
        # it did after its last commit may be acknowledged any more, whatever lands later
        self.superseded = False
        self._gathering = None  # the timer of a batch being gathered (Agent.batch_wait_s)
        self._checkpointed = False  # the handler in hand made its state durable midway
        self._reading = False       # the handler in hand was declared read-only (Agent.read_ops)
        self.tracer = None  # a tracing.Trace while someone traces it (mesh trace)
        self.traced_change = None  # the handler span whose change waits for a commit (mesh.otel)

    @property
    def clock(self):
        return self.node.clock

    @property
    def busy(self) -> bool:
        return (self.task is not None or self.status != AgentStatus.RUNNING or self.paused
                or self._gathering is not None)

    def depth(self) -> int:
        return len(self.mailbox) if self.mailbox else 0

    # --- intake ------------------------------------------------------------------------------

    def deliver(self, env: Envelope) -> None:
        msg = env.msg
        env.arrived = self.clock.now()
        if self.tracer is not None:
            self.tracer.arrived(env)
        rid = msg.id if msg.kind == Kind.CALL else None
        if rid is not None:
            # only a running incarnation answers from its window: a crashed one may hold the
            # reply of a call whose commit failed; the next incarnation's window is the store's
            recorded = self.window.get(rid) if self.status == AgentStatus.RUNNING else None
            if recorded is not None:
                self.node.commits.send_response(self, [env.origin], rid, self._replay(env, recorded))
                return
            joined = self.inflight.get(rid)
            if joined is not None:
                if rerun(env) or self._same_request(rid, msg.body):
                    joined.append(env.origin)
                else:
                    self._wait_for_first(env)
                return
        if self.busy or self.mailbox:
            if self.mailbox is None:
                self.mailbox = deque()
            limit = min(self.node.limits.mailbox, getattr(self.agent, "mailbox_limit", 0) or self.node.limits.mailbox)
            if len(self.mailbox) >= limit:
                self.node.stats["mailbox_full"] += 1
                if rid is not None:
                    err = Busy(f"mailbox of {self.name!r} is full ({limit})")
                    self.node.commits.send_response(self, [env.origin], rid, error_response(err))
                return
            self.mailbox.append(env)
            if rid is not None:
                self.inflight[rid] = [env.origin]
            if self._gathering is not None and self.agent is not None and len(self.mailbox) >= self.agent.max_batch:
                self._gathered()  # a whole batch is here: no reason to wait longer
            return
        if rid is not None:
            self.inflight[rid] = [env.origin]
        if msg.kind == Kind.CALL and self.agent.max_batch > 1 and self.agent.batch_wait_s > 0:
            # as Nx.Serving's batch_timeout: a call that finds the agent idle waits a moment
            # for others to join its batch (they queue in the mailbox meanwhile)
            self.mailbox = deque([env])
            self._gathering = self.clock.call_after(self.agent.batch_wait_s, self._gathered)
            return
        self._handle(env)

    def _gathered(self) -> None:
        """The batch being gathered is complete (its wait ran out, or max_batch calls came)."""
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
            self.run_mailbox()

    def run_mailbox(self) -> None:
        while self.mailbox and not self.busy:
            env = self.mailbox.popleft()
            if env.msg.kind == Kind.CALL and env.msg.id in self.window:
                # waited here while an earlier attempt committed
                self._answer(env, self._replay(env, self.window[env.msg.id]))
                continue
            if env.msg.kind == Kind.CALL and self.clock.now() > env.deadline:
                # its caller has given up; running it now would only surprise
                self.node.stats["expired"] += 1
                self._answer(env, error_response(CallTimeout(f"call to {self.name!r} expired in its mailbox")))
                continue
            self._handle(env)

    # --- handling ----------------------------------------------------------------------------

    def _handle(self, env: Envelope) -> None:
        if otel.tracer is not None:
            env.span = self._span(env)
        if not logs.tagging and env.span is None:
            self._dispatch(env)
            return
        token = logs.AGENT.set((self.name, self.incarnation)) if logs.tagging else None  # its lines name it
        current = otel.current(env.span) if env.span is not None else None  # its own spans nest under it
        try:
            self._dispatch(env)
        finally:
            if current is not None:
                otel.restore(current)
            if token is not None:
                logs.AGENT.reset(token)

    def _span(self, env: Envelope, links=None):
        kind = env.msg.kind
        return otel.start(f"{self.kind} {kind.name.lower()}", otel.parent(env.msg.meta),
                          otel.kinds().SERVER if kind == Kind.CALL else otel.kinds().CONSUMER,
                          {"mesh.agent": self.name, "mesh.kind": self.kind, "mesh.incarnation": self.incarnation,
                           "mesh.node": self.node.name, "mesh.request_id": env.msg.id or ""}, links)

    def _span_ends(self, env: Envelope, error=None) -> None:
        span, env.span = env.span, None
        otel.end(span, error)

    def _dispatch(self, env: Envelope) -> None:
        msg, agent = env.msg, self.agent
        if msg.kind == Kind.CALL and agent.max_batch > 1:
            self._handle_batch(env)
            return
        if self.tracer is not None:
            self.tracer.handling([env])
        self._current_rid = msg.id if msg.kind == Kind.CALL else None
        self._parent = [env]
        self._nested = 0
        self.effects = []
        self._checkpointed = self._reading = False
        self.handled += 1
        envs = [env]
        try:
            if msg.kind == Kind.CALL:
                self._reading = agent.reads_only(msg.body)
                stream = self.node.streamer(env) if msg.meta and msg.meta.get("stream") else None
                result = agent.handle_call(msg.body, CallContext(msg.id, env.peer, env.deadline, self, stream,
                                                                  msg.sender, env.arrived))
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
        if self.tracer is not None:
            self.tracer.handling(envs)
        if first.span is not None:  # each call of the batch has its own span, linked to the first's
            for env in envs[1:]:
                env.span = self._span(env, [otel.link(first.span)])
        # the calls a batch handler makes get ids derived from the whole batch's: a re-run of
        # the same batch repeats none of them (a batch that forms otherwise is a new request)
        rids = sorted(e.msg.id for e in envs)
        self._current_rid = rids[0] if len(rids) == 1 else "batch:" + hashlib.blake2b(
            "\0".join(rids).encode(), digest_size=12).hexdigest()
        self._parent = envs
        self._nested = 0
        self.effects = []
        self._checkpointed = self._reading = False
        self.handled += len(envs)
        ctxs = [CallContext(e.msg.id, e.peer, e.deadline, self, None, e.msg.sender, e.arrived) for e in envs]
        try:
            self._reading = all(self.agent.reads_only(e.msg.body) for e in envs)
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
        self._running = envs
        task = self.task = asyncio.ensure_future(self._run_async(envs, coro, single))
        task.add_done_callback(lambda _: self._cancelled_before_it_ran(task, envs, coro))
        self.node.busy_runners.add(self)

    def _cancelled_before_it_ran(self, task: asyncio.Task, envs: list[Envelope], coro) -> None:
        """A task cancelled in the loop turn that started it (a rollback, an interrupt)
        ends without running a line of _run_async: Python throws the cancellation in before
        its first step, so its `except` never runs. Still the runner's handler in hand, it
        would keep the agent busy for good: end it here as _run_async would have."""
        if self.task is not task:
            return  # _run_async ran and ended it
        coro.close()  # the handler's coroutine never started
        self._cancelled(envs)

    async def _run_async(self, envs: list[Envelope], coro, single: bool) -> None:
        try:
            result = await coro
        except asyncio.CancelledError:
            self._cancelled(envs)
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

    def _cancelled(self, envs: list[Envelope]) -> None:
        """The handler in hand was cancelled: by a rollback, by the end of this incarnation,
        or by the handler deadline."""
        self._end_task()
        if self._rollback_error is not None:  # what it built on was not kept: its callers retry
            err, self._rollback_error = self._rollback_error, None
            for env in envs:
                if env.msg.kind == Kind.CALL:
                    self._answer(env, error_response(err))
            self.run_mailbox()
            return
        if self.interrupted:
            self.discard_unfinished()
        if not self.interrupted:  # cancelled by the handler deadline
            self._crash(envs, TimeoutError(f"handler ran past {self.node.timing.handler_timeout_s:g}s"), supervision.TIMEOUT)
        else:  # this incarnation was stopped or replaced: its callers try the next one
            down = error_response(AgentDown(f"{self.name!r} was restarted while handling this call"))
            for env in envs:
                if env.msg.kind == Kind.CALL:
                    self._answer(env, down)

    def _end_task(self) -> None:
        self.task = None
        self._running = []
        self.node.busy_runners.discard(self)
        idle, self._idle = self._idle, []
        for future in idle:
            if not future.done():
                future.set_result(None)

    async def until_idle(self) -> None:
        """Return once no handler of this agent is under way (a paused agent starts no other)."""
        while self.task is not None:
            future = asyncio.get_running_loop().create_future()
            self._idle.append(future)
            await future

    def _finish_batch(self, envs: list[Envelope], results: Any) -> None:
        if not isinstance(results, list) or len(results) != len(envs):
            self._crash(envs, TypeError(f"handle_call_batch must return a list of {len(envs)} replies"), supervision.CRASH)
            return
        self._finish(envs, results)

    def _finish(self, envs: list[Envelope], results: list) -> None:
        """Commit what the handler did and answer: `results[i]` is envs[i]'s reply, or a
        CallError to answer it with."""
        reading, self._reading = self._reading, False
        if reading and not CHECK_READS and self.last_state is not None and not self.effects \
                and not self._checkpointed:
            packed = self.last_state  # declared read-only: nothing to pack or compare
        else:
            try:
                packed = msgpack.packb(self.agent.state)
            except Exception as exc:
                self._crash(envs, TypeError(f"state is not serializable: {exc}"), supervision.CRASH)
                return
            if reading and CHECK_READS and self.last_state is not None and packed != self.last_state:
                ops = sorted({str(e.msg.body.get("op")) for e in envs if type(e.msg.body) is dict})
                self._crash(envs, RuntimeError(f"a call declared read-only ({', '.join(ops) or '?'} in "
                                               f"read_ops) changed the state"), supervision.CRASH)
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
                    response = wire.REPLY_TAG + msgpack.packb(result)
                except Exception as exc:
                    self._crash(envs, TypeError(f"reply is not serializable: {exc}"), supervision.CRASH)
                    return
                limit = self.node.limits.max_message_bytes - 1024  # room for the envelope
                if len(response) > limit:  # the caller could not take it: say so instead
                    response = error_response(BadRequest(
                        f"the reply of {self.name!r} is {len(response):,} bytes, over the limit of {limit:,} "
                        f"(limits.max_message_bytes)"))
                responses.append(response)
        effects, self.effects = self.effects, None
        checkpointed, self._checkpointed = self._checkpointed, False
        if packed != self.last_state or effects or checkpointed:
            self.seq += 1
            self.last_state = packed
            if self.tracer is not None:
                self.tracer.committing(self.seq, len(packed))
            if envs[0].span is not None:
                self.traced_change = envs[0].span  # its commit's span is a child of this handler's
            for env, response in zip(envs, responses):
                if response is not None:
                    self._record(env, response)
            self.node.commits.mark_dirty(self)
            if effects:
                self.node.commits.queue_effects(self, effects)
        for env, response in zip(envs, responses):
            if response is not None:
                self._answer(env, response)
            elif env.span is not None:
                self._span_ends(env)
        if self.stop_reason is not None:
            reason, self.stop_reason = self.stop_reason, None
            self.node.incarnations.stop_runner(self, reason, supervision.stop_exit(reason))

    # --- its life, as its node moves it on -------------------------------------------------------

    def begin(self, agent: Agent, packed: bytes) -> None:
        """`init` ran and left `packed`: STARTING until its claim is committed."""
        self.agent, self.last_state, self.status = agent, packed, AgentStatus.STARTING

    def started(self) -> None:
        """Its claim is committed: it serves, beginning with what waited for it."""
        self.status = AgentStatus.RUNNING
        self.run_mailbox()

    def hold(self) -> None:
        """Nothing more is handled (its terminate is about to run)."""
        self.status = AgentStatus.STOPPED

    def end(self) -> None:
        """It ended: stopped, replaced, or its node stops."""
        self.status = AgentStatus.STOPPED
        self.agent = None
        if self.tracer is not None:
            self.tracer.end("exit")

    def disown_memory(self) -> None:
        """What it holds in memory may not be what is durable (a commit of it failed, or a
        newer incarnation ran elsewhere): a successor reads the store, not this runner."""
        self.last_state = None

    def keep(self, packed: bytes) -> None:
        """A state to commit that no handler made (its `terminate` changed it)."""
        if packed != self.last_state:
            self.seq += 1
            self.last_state = packed

    def _answer(self, env: Envelope, response: bytes) -> None:
        rid = env.msg.id
        if self.node.metrics is not None:
            self.node.metrics.call(self.kind, response.startswith(wire.ERROR_TAG), self.clock.now() - env.arrived)
        if self.tracer is not None:
            self.tracer.answered(env, response)
        if env.span is not None:
            self._span_ends(env, "error" if response.startswith(wire.ERROR_TAG) else None)
        origins = self.inflight.pop(rid, None) or [env.origin]
        self.node.commits.send_response(self, origins, rid, response)
        if self.waiting:
            self._release_waiting(rid)

    def _crash(self, envs: list[Envelope], exc: BaseException, how: str) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("agent %s (incarnation %d) crashed: %s", self.name, self.incarnation, reason,
                    extra={"agent": self.name, "incarnation": self.incarnation})
        self.node.stats["crashes"] += 1
        if self.tracer is not None:
            self.tracer.crashed(reason)
        self.effects = None
        self.stop_reason = None
        err = AgentCrashed(f"{self.name}: {reason}", {"exception": type(exc).__name__})
        for env in envs:
            if env.span is not None:
                self._span_ends(env, exc)
            if env.msg.kind == Kind.CALL:
                self._answer(env, error_response(err))
        self.status = AgentStatus.CRASHED
        self.agent = None
        self.node.incarnations.report_exit(self, how, reason)

    # --- lifecycle -----------------------------------------------------------------------------

    def crash(self, exc: BaseException, how: str = supervision.CRASH) -> None:
        """Crash from outside a handler: its state could not be made durable (the store
        failed: CRASH; a replica host did not answer: LOST, which is no fault of its own)."""
        self.interrupt()
        self._crash([], exc, how)

    def rollback(self, err: CallError, lost_rids: list[str]) -> bool:
        """Return to the last committed state: a commit that held this agent's changes
        failed. Whatever was built on them (a handler under way, replies and effects
        waiting for the next commit) is dropped, and its callers get `err`; the agent serves
        on from its durable state. False when there is no durable state to return to."""
        if self.durable is None or self.agent is None:
            return False
        self.node.commits.discard_pending(self, err)
        if self.task is not None and not self.interrupted:
            self._rollback_error = err
            self.task.cancel()
        self.seq, self.last_state = self.durable
        self.agent.state = unpack_state(self.last_state)
        for rid in lost_rids:
            self.window.pop(rid, None)
        for rid, *_ in self.unsaved:
            self.window.pop(rid, None)
        self.unsaved, self.forgotten, self.effects = [], [], None
        log.warning("agent %s: back to its last committed state (seq %d): %s", self.name, self.seq, err)
        return True

    def discard_unfinished(self) -> None:
        """Undo what an interrupted handler changed: the state is the one its last finished
        message left (a cancelled handler's half-made changes are never committed, just
        as after a crash, and `terminate` sees the last good state)."""
        if self.agent is not None and self.last_state is not None:
            self.agent.state = unpack_state(self.last_state)

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

    def fail_queued(self, make_error, forward: bool = True) -> None:
        """Answer every waiting call with make_error(); casts are handed to `node.forward`
        (or, with forward=False, dropped: they were meant for an agent that is gone)."""
        mailbox, self.mailbox = self.mailbox, None
        for env in mailbox or ():
            if env.msg.kind != Kind.CALL:
                if forward:
                    self.node.forward(env)
                else:
                    self.node.stats["casts_dropped"] += 1
        for rid, origins in self.inflight.items():
            self.node.commits.send_response(self, origins, rid, error_response(make_error()))
        for rid, envs in self.waiting.items():
            self.node.commits.send_response(self, [env.origin for env in envs], rid, error_response(make_error()))
        self.inflight, self.waiting = {}, {}

    # --- services for Agent ----------------------------------------------------------------

    def _next_rid(self) -> str | None:
        if self._current_rid is None:
            return None
        self._nested += 1
        if self._nested == 1:
            # scoped by this agent's name and the request's body: two agents handling
            # requests that share an id, or two requests that took one id in turn (the
            # first left nothing), must not make calls that share one; a rerun of the same
            # request derives the same ids
            bodies = hashlib.blake2b(digest_size=6)
            for env in sorted(self._parent, key=lambda e: e.msg.id):
                bodies.update(wire.digest(env.msg.body))
            self._current_rid = f"{self.name}/{self._current_rid}/{bodies.hexdigest()}"
        return derived_id(self._current_rid, self._nested)

    async def call_out(self, name: str, msg: Any, timeout: float | None) -> Any:
        timeout = timeout if timeout is not None else self.node.timing.call_timeout_s
        call = self.node.caller.call(name, msg, timeout, self._next_rid())
        if self.tracer is not None:
            return await self.tracer.call_out(name, call)
        return await call

    def cast_out(self, name: str, msg: Any) -> None:
        if self.tracer is not None:
            self.tracer.cast_out(name, msg)
        if self.effects is not None:
            self.effects.append(("cast", name, msg))
        else:
            self.node.caller.cast(name, msg)

    def send_after(self, delay_s: float, msg: Any) -> TimerRef:
        ref = TimerRef()
        if self.effects is not None:
            self.effects.append(("timer", delay_s, msg, ref))
        else:
            self.node.commits.arm_timer(self, delay_s, msg, ref)
        return ref

    async def checkpoint(self) -> None:
        """Commit the agent's state as it is now, from inside an async handler, and return
        once it is durable (with its replicas). The handler's reply, casts and timers still
        leave at its end; the message counts as an effect, so its reply is recorded."""
        if self.agent is None or self.task is None:
            raise RuntimeError("checkpoint() is for async handlers, while they run")
        packed = msgpack.packb(self.agent.state)
        self._checkpointed = True
        if packed != self.last_state:
            self.seq += 1
            self.last_state = packed
            self.node.commits.mark_dirty(self)
        group = self.pending_group
        if group is None:
            return  # nothing changed since the last commit
        done = asyncio.get_running_loop().create_future()
        group.callbacks.append(lambda outcome: done.done() or done.set_result(outcome))
        outcome = await done
        # a commit that failed, was fenced or lost its replicas ends this handler: the
        # node rolls the agent back or drops it, and cancels the task in the same turn
        if outcome.error is not None or self.name in outcome.failed or self.name in outcome.unreplicated:
            raise AgentDown(f"{self.name!r}: its checkpoint was not kept")

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        if self.effects is not None:
            self.effects.append(("stop",))

    async def spawn_out(self, name: str, kind: str, args: dict, restart: str, supervisor: str | None = None) -> dict:
        return await self.node.spawn_via_supervisor(name, kind, args, restart, self._next_rid(), supervisor)
