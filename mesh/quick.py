"""The `mesh` command's quick path: a call or a status as blocking requests over ZeroMQ
DEALERs, without asyncio (importing it costs a short command a third of its time).

Only the plain case is handled here: an answer, a final error, or a redirect to the
node and incarnation where the agent runs (Moved). Anything else (an agent down or
moving, a supervisor away, a node silent for QUICK_S, a busy mesh, a paged answer)
raises Handoff, and the command goes on with the full client (mesh.client), which
waits, follows and retries. A call keeps its request id across the handoff, so a
call the quick path may have delivered is answered from the agent's record rather
than run again (G2).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import zmq

from . import wire
from .config import Config
from .errors import Busy, CallTimeout, Moved, Retryable, error_from_wire
from .wire import Kind

QUICK_S = 1.0  # a node that does not answer within this is left to the full client
REDIRECTS = 3


class Handoff(Exception):
    """The full client must take over."""


class QuickClient:
    def __init__(self, config: Config, key: str | None = None):
        self.config = config
        self.sender = f"client:{socket.gethostname()}:{os.getpid()}"
        self._security = None
        if config.secure:
            from .security import Security, client_keypair
            self._security = Security(config, client_keypair(config, key))
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}

    def __enter__(self) -> "QuickClient":
        return self

    def __exit__(self, *exc) -> None:
        for s in self._socks.values():
            s.close(linger=0)
        self._ctx.term()

    def _sock(self, node: str) -> zmq.Socket:
        s = self._socks.get(node)
        if s is None:
            spec = self.config.nodes.get(node)
            if spec is None:
                raise Handoff(f"no node named {node!r}")
            s = self._socks[node] = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes * 2 + 1024)
            if self._security is not None:
                self._security.client(s, spec.endpoint)
            s.connect(spec.endpoint)
        return s

    def request(self, node: str, kind: Kind, target: str | None, body: Any, wait: float,
                rid: str | None = None, meta: dict | None = None, ttl: float | None = None) -> Any:
        """One request and its answer within `wait` (a reply's body; an error raised as its
        CallError). `ttl`: how long the request stays worth running (default `wait`)."""
        rid = rid or os.urandom(8).hex()
        try:
            frame = wire.encode(kind, rid, target, self.sender, int((ttl or wait) * 1000), body, meta)
        except (TypeError, ValueError, OverflowError):
            raise Handoff("not encodable here: the full client says why") from None
        s = self._sock(node)
        s.send(frame)
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if left <= 0 or not s.poll(left * 1000):
                raise Handoff(f"no answer from node {node} within {wait:.3g}s")
            for msg in self._messages(s.recv()):
                if msg.id != rid or msg.kind == Kind.CHUNK:
                    continue
                if msg.kind == Kind.REPLY:
                    return msg.body
                raise error_from_wire(msg.body)

    def _messages(self, frame: bytes) -> list[wire.Msg]:
        try:
            msg = wire.decode(frame, self.config.limits.max_message_bytes)
        except Exception:
            return []
        if msg.kind == Kind.BATCH:
            return [m for m in msg.body if isinstance(m, wire.Msg)]
        return [msg]

    def call(self, name: str, msg: Any, timeout: float, rid: str) -> Any:
        """Call `name`: to the supervisor's node first, which says where it runs."""
        end = time.monotonic() + timeout
        node, meta = self.config.supervisor_node, None
        for _ in range(REDIRECTS + 1):
            left = end - time.monotonic()
            if left <= 0:
                raise CallTimeout(f"call to {name!r} got no reply within {timeout:.3g}s")
            try:
                return self.request(node, Kind.CALL, name, msg, min(QUICK_S, left), rid, meta, ttl=left)
            except Moved as moved:
                where, inc = moved.data.get("node"), moved.data.get("incarnation")
                if not isinstance(where, str) or type(inc) is not int:
                    raise Handoff(f"a redirect without a place: {moved}") from None
                node, meta = where, {"inc": inc}
            except Retryable as err:
                raise Handoff(str(err)) from None
        raise Handoff(f"{name!r} moved more than {REDIRECTS} times")

    def status(self, view: dict, timeout: float) -> dict:
        """One STATUS view, from the supervisor (through its node)."""
        try:
            answer = self.request(self.config.supervisor_node, Kind.STATUS, None, view, min(QUICK_S, timeout))
        except (Retryable, Busy) as err:
            raise Handoff(str(err)) from None
        if not isinstance(answer, dict):
            raise Handoff("an answer this release does not read")
        return answer
