"""The Agent behaviour: the contract between an agent kind and the node that hosts it.

An agent is a GenServer: a name, a state, and one message handled at a time. Write a
kind by subclassing `Agent` and overriding the callbacks you need; do not override
`__init__` (the node builds the object, then calls `init`).

`self.state` is the agent's durable state: anything msgpack can carry (dicts, lists,
strings, numbers, bytes, booleans, None). After each message the node packs it; if it
changed, the new state is committed to LMDB before any reply that depended on it leaves
(G1). Mutate it in place or assign a new value, both work.

Handlers may be plain functions or `async def` (to await language models or other
agents). While one message is being handled, later ones wait in the mailbox.

Raising from a handler:
  - a `CallError` (e.g. `BadRequest("no such op")`) answers the caller with that error;
    it is not a crash, and the state the handler left is kept.
  - anything else is a crash: the caller gets `AgentCrashed` naming the exception, the
    state is rolled back to the last good one, and the agent's supervisor restarts it
    (or not) per its restart type and strategy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import BadRequest, NotAllowed

if TYPE_CHECKING:  # the node implements the services; the behaviour does not import it
    from .runner import Runner


class CallContext:
    """What a handle_call knows about the call it is answering.

    `sender` is who delivered the call as the mesh authenticated it: "client:NAME",
    "admin:NAME" or "node:NAME" (a key named in the config) in a secure cluster, and None
    in a cluster without CURVE, where nothing is authenticated. `claimed_sender` is what
    the caller wrote about itself ("agent:NAME", "client:HOST:PID"): a claim, for logs,
    never for decisions."""

    __slots__ = ("request_id", "sender", "claimed_sender", "deadline", "received", "_runner", "_stream_to")

    def __init__(self, request_id: str | None, sender: str | None, deadline: float, runner: "Runner", stream_to=None,
                 claimed_sender: str | None = None, received: float = 0.0):
        self.request_id, self.sender, self.deadline = request_id, sender, deadline
        self.claimed_sender = claimed_sender
        self.received = received  # when the agent's node took the call (the node's clock)
        self._runner, self._stream_to = runner, stream_to

    def remaining(self) -> float:
        """Seconds left before the caller gives up."""
        return max(0.0, self.deadline - self._runner.clock.now())

    @property
    def streaming(self) -> bool:
        """True when the caller asked for a streamed reply."""
        return self._stream_to is not None

    def stream(self, part: Any) -> None:
        """Send one piece of the reply ahead of the final one (if the caller asked to stream).

        Pieces are previews: they leave at once, before any commit, and are not durable.
        The final return value is the reply, recorded and committed as usual."""
        if self._stream_to is not None:
            self._stream_to(part)


class TimerRef:
    __slots__ = ("_timer", "cancelled")

    def __init__(self):
        self._timer = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self._timer is not None:
            self._timer.cancel()


class Agent:
    """Subclass this. Every callback is optional except handle_call for agents that are called."""

    name: str
    state: Any = None
    _runner: "Runner"

    read_ops: frozenset = frozenset()
    """The ops (a call's `"op"` key) whose handlers only read the state, e.g.
    `frozenset({"get"})`. After such a call the node does not pack the state to see whether
    it changed, so a read of a large state costs what the reply costs. A handler declared
    here that changes the state anyway is a bug: the change is not committed with it (the
    next change commits it; a crash first loses it). Set `MESH_CHECK_READS=1` in tests to
    have every such call checked: a change then crashes the handler, naming its op."""

    max_batch: int = 0
    """Set above 1 to have calls handled in batches by handle_call_batch (see there)."""

    vsn: int = 1
    """The version of this kind's code, a positive int. Every commit records the version
    that wrote the state; raise it whenever the state's shape changes, and say in
    `code_change` how an older state becomes this version's."""

    batch_wait_s: float = 0.0
    """With max_batch > 1: how long a call that finds the agent idle waits for others to
    join its batch (fewer than max_batch calls queued), as Nx.Serving's batch_timeout."""

    mailbox_limit: int = 0
    """Calls that may wait for this agent; beyond, callers get Busy at once. 0: the
    node's limits.mailbox (never more than that)."""

    # --- callbacks ------------------------------------------------------------------------

    def reads_only(self, msg: Any) -> bool:
        """True when handling call `msg` leaves the state as it is (see `read_ops`);
        override for messages that are not `{"op": ...}` dicts."""
        if not self.read_ops or type(msg) is not dict:
            return False
        op = msg.get("op")
        return type(op) is str and op in self.read_ops

    def init(self, args: dict, state: Any) -> Any:
        """Runs when an incarnation starts, before any message. Returns the state to run with.

        `args` come from the spawn or the config; `state` is the last committed state, or
        None on the very first start. Raising fails the start (counted as a crash).
        The default resumes the stored state, or starts from `args.get("state")`."""
        return state if state is not None else args.get("state")

    def handle_call(self, msg: Any, ctx: CallContext) -> Any:
        """Handles a call; the return value is the reply. May be async."""
        raise BadRequest(f"{type(self).__name__} does not take calls")

    def handle_call_batch(self, msgs: list, ctxs: list[CallContext]) -> list:
        """Handles several calls at once, if the kind sets `max_batch` > 1. May be async.

        When calls queue up behind one that is running, the next up to `max_batch` of
        them come here together: one upstream request for many callers. Returns one
        reply per message, in order; an item may be a CallError instance, which answers
        that caller with the error."""
        raise BadRequest(f"{type(self).__name__} sets max_batch but has no handle_call_batch")

    def handle_cast(self, msg: Any) -> None:
        """Handles a cast (no reply). May be async. The default ignores it."""

    def handle_info(self, msg: Any) -> None:
        """Handles anything else: timers from send_after, and INFO messages. May be async."""

    def code_change(self, old_vsn: int, state: Any, extra: Any) -> Any:
        """Returns `state`, written by version `old_vsn` of this kind, as this version's.

        Runs on an instance of the new code, between two messages (never during a
        handler): in a live upgrade (`mesh upgrade`, with its `extra`), and when an
        incarnation starts from a snapshot an older version wrote (`extra` None, before
        `init`). `old_vsn` greater than `self.vsn` is a downgrade (`mesh upgrade
        --rollback`, the previous code asked to read the newer state). Must not be async;
        raising leaves the agent on its old code with its old state. The default keeps
        the state as it is and refuses downgrades."""
        if old_vsn > self.vsn:
            raise NotAllowed(f"{type(self).__name__} (version {self.vsn}) cannot read the state of "
                             f"version {old_vsn}: it defines no downgrade in code_change")
        return state

    def terminate(self, reason: str) -> None:
        """Runs when the incarnation ends in order (stop, node shutdown, supervisor
        restart of a sibling), not after a crash. State it changes is committed."""

    # --- services, from inside a handler ----------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._runner.incarnation

    @property
    def llm(self):
        """The node's shared language-model client (mesh.llm.LLMClient), set by [llm]."""
        return self._runner.node.llm_client()

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"mesh.agent.{self.name}")

    async def call(self, name: str, msg: Any, timeout: float | None = None) -> Any:
        """Call another agent by name and await its reply.

        Inside a call handler, the request id is derived from the caller's, so a handler
        that runs again after a crash does not repeat the effect on `name` (G2)."""
        return await self._runner.call_out(name, msg, timeout)

    def cast(self, name: str, msg: Any) -> None:
        """Send a message to another agent. It leaves after this handler's state is committed."""
        self._runner.cast_out(name, msg)

    def send_after(self, delay_s: float, msg: Any) -> TimerRef:
        """Deliver `msg` to this agent's handle_info after `delay_s` seconds.

        Timers live in memory like OTP's: they do not survive a restart (re-arm them in init)."""
        return self._runner.send_after(delay_s, msg)

    async def checkpoint(self) -> None:
        """Make the state as it is now durable, in the middle of an async handler, and
        wait until it is. For handlers whose steps must not run twice (a tool call with
        an effect): a crash or a move after the checkpoint starts the next incarnation
        from it, and the caller's retry (same request id) finds the step done. Casts and
        timers the handler asked for still leave only when it ends; so does its reply."""
        await self._runner.checkpoint()

    def stop(self, reason: str | tuple = "normal") -> None:
        """End this incarnation after the current message; `terminate` gets `reason`.
        Whether it is restarted depends on its restart type. As in OTP, "normal",
        "shutdown" and ("shutdown", detail) are normal exits (a transient agent stays
        stopped, a permanent one is restarted); anything else is abnormal (a crash)."""
        self._runner.request_stop(reason)

    async def spawn(self, name: str, kind: str, args: dict | None = None, restart: str = "permanent",
                    supervisor: str | None = None) -> dict:
        """Start another agent under a dynamic supervisor (`supervisor`, default the
        config's [supervisor] dynamic one); returns {name, node, incarnation}."""
        return await self._runner.spawn_out(name, kind, args or {}, restart, supervisor)
