"""TRACE: a live stream of what happens to one agent, for `mesh trace NAME` (OTP's sys:trace).

While a trace runs, the agent's runner reports, in order, each as one CHUNK to the
tracer: a message in (call, cast or info: its id, sender and size, its body cut
short), the start of its handling (time it waited), an answer out (reply or error:
time since it arrived, size), a state change to commit (seq, size), a call or cast the
agent makes and the call's outcome, a crash, and its exit. The trace ends after
`for_ms`, when the incarnation ends (the last event says so), or when another trace of
the agent begins; its final answer counts the events sent and those dropped past
MAX_EVENTS_PER_S. A runner nobody traces pays one attribute test at each of those points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from . import wire
from .errors import CallError
from .introspect import preview, running

if TYPE_CHECKING:
    from .node import Node, Origin
    from .runner import Envelope, Runner

DEFAULT_FOR_MS = 10_000
MAX_FOR_MS = 3_600_000
DEFAULT_BODY_BYTES = 200
MAX_BODY_BYTES = 10_000
MAX_EVENTS_PER_S = 2_000  # past this, events are counted as dropped: a hot agent cannot flood its tracer


class Trace:
    """One trace of one runner: where its events go, and how many went."""

    __slots__ = ("node", "runner", "origin", "rid", "max_body", "sent", "dropped", "_window", "_count",
                 "_timer", "ended")

    def __init__(self, node: "Node", runner: "Runner", origin: "Origin", rid: str, for_s: float, max_body: int):
        self.node, self.runner, self.origin, self.rid, self.max_body = node, runner, origin, rid, max_body
        self.sent = self.dropped = self._count = 0
        self._window = node.clock.now()
        self.ended = False
        self._timer = node.clock.call_after(for_s, lambda: self.end("time"))

    def event(self, what: str, **fields: Any) -> None:
        now = self.node.clock.now()
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        if self._count >= MAX_EVENTS_PER_S:
            self.dropped += 1
            return
        self._count += 1
        self.sent += 1
        self.node.chunk(self.origin, self.rid, {"ev": what, "t": round(self.node.clock.wall(), 6),
                                                "inc": self.runner.incarnation, **fields})

    def _body(self, value: Any) -> dict:
        try:
            size = len(msgpack.packb(value))
        except Exception:
            size = None
        return {"bytes": size, "body": preview(value, self.max_body)}

    # --- what a runner reports ----------------------------------------------------------------

    def arrived(self, env: "Envelope") -> None:
        msg = env.msg
        self.event("in", kind=msg.kind.name.lower(), id=msg.id, sender=msg.sender, peer=env.peer, **self._body(msg.body))

    def handling(self, envs: list["Envelope"]) -> None:
        now = self.node.clock.now()
        for env in envs:
            self.event("handle", id=env.msg.id, kind=env.msg.kind.name.lower(),
                       waited_ms=round((now - env.arrived) * 1000, 3))

    def answered(self, env: "Envelope", response: bytes) -> None:
        error = response.startswith(wire.ERROR_TAG)
        fields = {"id": env.msg.id, "ms": round((self.node.clock.now() - env.arrived) * 1000, 3), "bytes": len(response)}
        if error:
            try:
                kind, message, _ = msgpack.unpackb(response[len(wire.ERROR_TAG):], raw=False)
                fields["error"] = f"{kind}: {message}"[:self.max_body]
            except Exception:
                fields["error"] = "unreadable"
        self.event("error" if error else "reply", **fields)

    def committing(self, seq: int, size: int) -> None:
        self.event("commit", seq=seq, bytes=size)

    async def call_out(self, name: str, call) -> Any:
        """A call the agent makes: its outcome and how long it took."""
        t0 = self.node.clock.now()
        self.event("call_out", to=name)
        try:
            result = await call
        except CallError as err:
            if not self.ended:
                self.event("call_back", to=name, ms=round((self.node.clock.now() - t0) * 1000, 3),
                           error=f"{type(err).__name__}: {err}"[:self.max_body])
            raise
        if not self.ended:
            self.event("call_back", to=name, ms=round((self.node.clock.now() - t0) * 1000, 3), **self._body(result))
        return result

    def cast_out(self, name: str, msg: Any) -> None:
        self.event("cast_out", to=name, **self._body(msg))

    def crashed(self, reason: str) -> None:
        self.event("crash", reason=reason[:self.max_body])

    def end(self, why: str) -> None:
        """The last word: an `exit` event if the agent ended, then the answer to TRACE."""
        if self.ended:
            return
        if why == "exit":
            self.event("exit")
        self.ended = True
        self._timer.cancel()
        if self.runner.tracer is self:
            self.runner.tracer = None
        self.node.respond(self.origin, self.rid, {"ended": why, "node": self.node.name,
                                                  "incarnation": self.runner.incarnation,
                                                  "events": self.sent, "dropped": self.dropped})


def on_trace(node: "Node", msg: "wire.Msg", origin: "Origin") -> None:
    runner = running(node, msg, origin)
    if runner is None:
        return
    body = msg.body or {}
    for_s = min(max(body.get("for_ms") or DEFAULT_FOR_MS, 1), MAX_FOR_MS) / 1000
    max_body = min(max(body.get("max_body") or DEFAULT_BODY_BYTES, 0), MAX_BODY_BYTES)
    if runner.tracer is not None:
        runner.tracer.end("another trace of it began")
    runner.tracer = Trace(node, runner, origin, msg.id, for_s, max_body)
    runner.tracer.event("trace", node=node.name, kind=runner.kind, status=runner.status,
                        mailbox=runner.depth(), for_ms=int(for_s * 1000))
