"""The answers of the supervisor's control requests (spawn, stop), by request id.

A client sends a control request again with its id when an answer is lost, and a copy
of one can arrive late (held on a link while a node was away, or passed on by another
node). A copy must never act again: a late STOP of a name's earlier life would stop the
life spawned since, and a late SPAWN would bring a stopped name back. So a repeat joins
the request while it is under way, and gets its answer after, for KEEP_S seconds (far
longer than any copy can linger: links drop held frames past their ttl). A retryable
failure is not kept: its repeat is a retry and acts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import CallError, reused_id

if TYPE_CHECKING:
    from .clock import Clock
    from .node import Node, Origin

KEEP_S = 300.0
MAX_KEPT = 100_000


class ControlReplies:
    def __init__(self, node: "Node", clock: "Clock"):
        self.node, self.clock = node, clock
        self._open: dict[str, tuple[bytes, list]] = {}  # rid -> (request digest, origins waiting)
        # rid -> (when, request digest, ok, answer)
        self._done: OrderedDict[str, tuple[float, bytes, bool, Any]] = OrderedDict()

    def repeat(self, rid: str, origin: "Origin", request: Any) -> bool:
        """True when `rid` is a repeat: it is answered now, or when its first copy is (or
        refused, if it asks for something else). Else the request is taken as new: answer
        it with `answer` or `fail`."""
        digest = wire.digest(request)
        done = self._done.get(rid)
        known = done[1] if done is not None else self._open[rid][0] if rid in self._open else None
        if known is not None and known != digest:
            self.node.respond_error(origin, rid, reused_id(rid))
            return True
        if done is not None:
            self._send([origin], rid, done[2], done[3])
            return True
        if rid in self._open:
            self._open[rid][1].append(origin)
            return True
        self._open[rid] = (digest, [origin])
        return False

    def answer(self, rid: str, body: Any) -> None:
        self._finish(rid, True, body)

    def fail(self, rid: str, err: CallError) -> None:
        self._finish(rid, False, err)

    def _finish(self, rid: str, ok: bool, answer: Any) -> None:
        digest, origins = self._open.pop(rid, (b"", []))
        self._send(origins, rid, ok, answer)
        if not ok and answer.retryable:
            return  # nothing was done: a repeat is a retry
        now = self.clock.now()
        self._done[rid] = (now, digest, ok, answer)
        while self._done:
            at = next(iter(self._done.values()))[0]
            if at > now - KEEP_S and len(self._done) <= MAX_KEPT:
                break
            self._done.popitem(last=False)

    def _send(self, origins: list, rid: str, ok: bool, answer: Any) -> None:
        for origin in origins:
            if ok:
                self.node.respond(origin, rid, answer)
            else:
                self.node.respond_error(origin, rid, answer)
