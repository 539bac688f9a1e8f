"""Exactly once (G2): the replies an agent recorded, and the requests that share an id.

A call's reply is recorded under its request id in the runner's window, with the
agent's own time and a digest of the request: a repeat of the id is answered from the
record (or refused, if it asks for something else), and the records go to the store
with each commit (`take_replies`). Windows age by agent time, which moves with the
agent from host to host. A request that arrives while an earlier one under its id is
still queued or in hand waits for that one's outcome.

This is Runner's base class, apart so that runner.py is about handling messages; it
works on the runner's own fields (node, name, clock, mailbox, inflight, _running).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import msgpack

from . import wire
from .errors import Busy, CallError, error_to_wire, reused_id

if TYPE_CHECKING:
    from .clock import Clock
    from .runner import Envelope


class Replies:
    """The exactly-once half of a Runner: its window of recorded replies, what changed in
    it since the last commit, agent time, and the requests waiting on an id in hand."""

    __slots__ = ("window", "unsaved", "forgotten", "waiting", "time_base", "time_started")

    def __init__(self, clock: "Clock"):
        # rid -> other requests under an id whose first request is in hand: they wait for
        # it, since only a recorded reply can show the id is taken (see _release_waiting)
        self.waiting: dict[str, list[Envelope]] = {}
        # rid -> (response, agent time recorded, kept at least until, request digest)
        self.window: OrderedDict[str, tuple[bytes, float, float, bytes | None]] = OrderedDict()
        self.unsaved: list[tuple] = []  # replies recorded since the last commit (store.Reply)
        self.time_base = 0.0            # agent time when this incarnation started ...
        self.time_started = clock.now()  # ... and the node's clock then
        self.forgotten: list[str] = []  # aged out since the last commit

    def agent_now(self) -> float:
        """The agent's own time: how long its incarnations have run, carried over from the
        replies it recorded. Windows age by it, never by a host's wall clock, so a move to
        a host whose clock is ahead expires nothing (and downtime only keeps replies longer)."""
        return self.time_base + (self.clock.now() - self.time_started)

    def resume_time(self, base: float) -> None:
        self.time_base, self.time_started = base, self.clock.now()

    def _record(self, env: Envelope, response: bytes) -> None:
        """Keep the response for a repeat of the call's request id.

        A reply is kept for `dedup_s` seconds of agent time. `dedup_window` bounds memory
        only: past it the oldest replies go, but never one kept less than `dedup_min_s`
        nor one whose caller may still be waiting for it (its deadline has not passed, or
        it is not committed yet), so a retry within those bounds is always answered from
        the record."""
        window, limits = self.window, self.node.limits
        if limits.dedup_window <= 0:
            return
        now = self.agent_now()
        until = max(now + limits.dedup_min_s, now + (env.deadline - self.clock.now()))
        rid = env.msg.id
        entry = (response, now, until, wire.digest(env.msg.body))
        window[rid] = entry
        window.move_to_end(rid)
        self.unsaved.append((rid, *entry))
        oldest = now - limits.dedup_s
        unsaved = None
        while window:
            first, (_, t, kept_until, _) = next(iter(window.items()))
            if t >= oldest and (len(window) <= limits.dedup_window or kept_until > now):
                break
            if unsaved is None:
                unsaved = {r[0] for r in self.unsaved}
            if first in unsaved:
                break  # not even committed: its caller has not seen it
            window.popitem(last=False)
            self.forgotten.append(first)

    def take_replies(self) -> tuple[list, list]:
        """The replies recorded and forgotten since the last commit (for the next one)."""
        unsaved, forgotten = self.unsaved, self.forgotten
        self.unsaved, self.forgotten = [], []
        return unsaved, forgotten

    def _replay(self, env: Envelope, recorded: tuple) -> bytes:
        """The answer to a repeat of a recorded request id: the recorded response, or a
        refusal when the repeat asks for something else (an id names one request)."""
        digest = recorded[3]
        if digest is None or rerun(env) or digest == wire.digest(env.msg.body):
            self.node.stats["replayed"] += 1
            return recorded[0]
        return error_response(reused_id(env.msg.id))

    def _same_request(self, rid: str, body: Any) -> bool:
        """Whether a repeat of `rid` that arrives while the first is queued or in hand asks
        for the same thing (compared only in this rare case)."""
        for env in (*self._running, *(self.mailbox or ())):
            if env.msg.id == rid:
                return env.msg.body == body
        return True

    def _wait_for_first(self, env: Envelope) -> None:
        """Another request under the id of one in hand: it may be refused only once the
        first has recorded a reply (a refusal resting on a request that then crashes would
        stand while a later copy of the refused request runs), so it waits for that."""
        if sum(map(len, self.waiting.values())) >= self.node.limits.mailbox:
            self.node.stats["mailbox_full"] += 1
            err = Busy(f"mailbox of {self.name!r} is full ({self.node.limits.mailbox})")
            self.node.commits.send_response(self, [env.origin], env.msg.id, error_response(err))
            return
        self.waiting.setdefault(env.msg.id, []).append(env)

    def _release_waiting(self, rid: str) -> None:
        """The first request under `rid` was answered. If it recorded a reply, each waiting
        request is a repeat or a refusal, sent once that reply is committed; if not, the
        id is free and the next in line goes first in the mailbox as if it came now."""
        waiting = self.waiting.pop(rid, None)
        if not waiting:
            return
        recorded = self.window.get(rid)
        if recorded is not None:
            for env in waiting:
                self.node.commits.send_response(self, [env.origin], rid, self._replay(env, recorded))
            return
        first = waiting[0]
        self.inflight[rid] = [first.origin]
        if self.mailbox is None:
            self.mailbox = deque()
        self.mailbox.appendleft(first)
        for env in waiting[1:]:
            if env.msg.body == first.msg.body:
                self.inflight[rid].append(env.origin)
            else:
                self.waiting.setdefault(rid, []).append(env)


def rerun(env: Envelope) -> bool:
    """A call an agent makes again because the handler that made it runs again (after a
    crash or a move): its id is derived (see caller.derived_id) and it comes from a mesh node.
    Its body may differ (a handler need not be deterministic); the recorded reply is its
    answer all the same, which is what makes the nested effect happen once."""
    return ">" in env.msg.id and (env.peer is None or env.peer.startswith("node:"))


def error_response(err: CallError) -> bytes:
    return wire.ERROR_TAG + msgpack.packb(error_to_wire(err))
