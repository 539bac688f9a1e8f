"""A node's intake: each frame a peer sends is decoded within that peer's budget, queued
per peer, and served round-robin at the end of the listener's turn (each peer's messages
in their order); each request is then checked against the peer's limits and role and
handed to its handler. Bad input is answered with an error and counted, and never
reaches an agent or stops the node (G5); refusals are logged in summary.

Whose limits a request spends: the authenticated key's in a secure cluster (however many
connections it opens), else the connection's; authenticated nodes are not limited.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from . import wire
from .errors import BadRequest, Busy, CallError, NotAllowed, ProtocolError, error_to_wire
from .limits import FairQueue, PeerLimits
from .security import allowed, role_of
from .wire import Kind

if TYPE_CHECKING:
    from .node import Node, Origin

log = logging.getLogger("mesh.node")


class Intake:
    """Reading, fair serving and admission of one node's requests."""

    def __init__(self, node: "Node"):
        self.node = node
        limits = node.config.limits
        self.peer_limits = PeerLimits(limits.peer_rate, limits.peer_burst, limits.peer_open_requests,
                                      decode_share=limits.peer_decode_share, decode_burst=limits.peer_decode_burst_s)
        self._fair = FairQueue()  # read and not yet handled: (msg, origin, limits key, who), per peer
        self._refusals: OrderedDict = OrderedDict()  # (peer, reason) -> [last logged, count since]

    def answered(self, origin: bytes) -> None:
        """An admitted request of this peer got its answer: one open request fewer."""
        self.peer_limits.answered(self._limit_key(origin))

    def on_request(self, origin: bytes, frame: bytes | None) -> int:
        """Read one frame of a peer into its queue; returns how many messages it held."""
        # who sent it, as authenticated now (its route may pass to another key's connection
        # before it is served), and whose limits it spends (None: not limited), worked out
        # once per frame; its share of a turn is that key's, or its connection's for a node
        who = self.node.listener.identity(origin) if self.node.secure else None
        key = None if not self._limited(origin) else self._limit_key(origin)
        fair = self._fair
        if frame is None:
            fair.put(key or origin, (ProtocolError("a request must be exactly one frame"), origin, key, who))
            return 1
        if key is None:
            try:
                msg = wire.decode(frame, self.node.limits.max_message_bytes)
            except ProtocolError as exc:
                fair.put(origin, (exc, origin, key, who))
                return 1
        else:
            msg = self._decode_from_peer(origin, frame, key, who)
            if msg is None:
                return 1
        if msg.kind == Kind.BATCH and self._permitted(msg, origin):
            body = msg.body
            fair.extend(key or origin, [(item, origin, key, who) for item in body])
            return len(body)
        fair.put(key or origin, (msg, origin, key, who))
        return 1

    def serve(self, until: float) -> int:
        """End of the listener's turn: handle what was read, round-robin across peers (up
        to a turn's worth); returns how many messages are still queued."""
        fair = self._fair
        if fair.items:
            fair.serve(self.dispatch, self.node.limits.batch, until, self._served_all)
            self.node.commits.schedule_flush()
        return fair.items

    def _served_all(self, item: tuple) -> None:
        """A peer's queue ran empty: its answers leave now, not at the end of the turn."""
        self.node.listener.send_now(item[1])

    def _decode_from_peer(self, origin: bytes, frame, key, who: str | None) -> "wire.Msg | None":
        """Decode a frame of a peer that is no authenticated node, within its budget of
        decoding time and with its arrays and maps bounded (a million-key map within the
        size limit takes a second). A peer in debt has its frames dropped unread."""
        now = self.node.clock.now()
        limits = self.peer_limits
        if not limits.may_decode(key, now):
            self.node.stats["over_decode_budget"] += 1
            self.log_refusal(key, "over its decoding budget: frames dropped unread")
            return None
        # only an authenticated node may send large inventories; without CURVE every
        # peer is a local one (loopback only) and gets the node's bound
        elements = self.node.limits.max_elements if self.node.secure else None
        started = time.perf_counter()
        try:
            msg = wire.decode(frame, self.node.limits.max_message_bytes, elements)
        except ProtocolError as exc:
            limits.charge_decode(key, time.perf_counter() - started)
            self._fair.put(key, (exc, origin, key, who))
            return None
        limits.charge_decode(key, time.perf_counter() - started)
        return msg

    def log_refusal(self, who, what: str) -> None:
        """Log a refusal at most once a second per peer and reason, with the count since."""
        now = self.node.clock.now()
        entry = self._refusals.get((who, what))
        if entry is None:
            if len(self._refusals) >= 1000:
                self._refusals.pop(next(iter(self._refusals)))
            entry = self._refusals[(who, what)] = [now - 2.0, 0]
        entry[1] += 1
        if now - entry[0] >= 1.0:
            log.warning("node %s: peer %s %s (%d times since the last report)", self.node.name,
                        who if isinstance(who, str) else who.hex(), what, entry[1])
            entry[0], entry[1] = now, 0

    def dispatch(self, msg: "wire.Msg | ProtocolError", origin: Origin, key, who: str | None = None) -> None:
        """One request: the peer's limits (`key`: whose, None if it has none), then its
        validity and role, then its handler. Every request with an id that is admitted
        gets exactly one answer, except one whose route passed to another identity (`who`:
        the sender's when it was read) before its turn: that one is dropped and counted,
        as its answer would reach the route's new holder."""
        if who is not None and self.node.listener.identity(origin) != who:
            self.node.stats["route_changed"] += 1
            self.log_refusal(who, "lost its route before its request was served: dropped")
            return
        self.node.stats["in"] += 1
        bad = type(msg) is ProtocolError
        rid = msg.request_id if bad else msg.id
        if key is not None:
            problem = self.peer_limits.admit(key, rid is not None, self.node.clock.now())
            if problem is not None:
                self.node.stats["over_limit"] += 1
                self.log_refusal(key, "is over its limits: answered Busy")
                if rid is not None:
                    self.node._respond(origin, wire.error(rid, error_to_wire(Busy(problem))), counted=False)
                return
        if bad:
            self._bad(origin, msg)
            return
        if not self._permitted(msg, origin):
            return
        handler = self.node.handlers.get(msg.kind)
        if handler is None:
            self._bad(origin, ProtocolError(f"{msg.kind.name} is not a request", msg.id))
            return
        try:
            handler(msg, origin)
        except CallError as err:
            if msg.id is not None:
                self.node.respond_error(origin, msg.id, err)

    def _limit_key(self, origin: bytes) -> bytes | str:
        """Whose share a request spends: the authenticated key's (however many connections
        it opens), or, in a cluster without CURVE, the connection's."""
        if self.node.secure:
            return self.node.listener.identity(origin) or origin
        return origin

    def _limited(self, origin: bytes) -> bool:
        """Rate and open-request limits hold for every peer but authenticated nodes."""
        return not (self.node.secure and role_of(self.node.listener.identity(origin)) == "node")

    def _permitted(self, msg: wire.Msg, origin: Origin) -> bool:
        if not self.node.secure or origin is None or allowed(self.node.listener.identity(origin), msg.kind):
            return True
        self.node.stats["not_allowed"] += 1
        who = self.node.listener.identity(origin) or "an unidentified peer"
        self.log_refusal(who, f"may not send {msg.kind.name}")
        if msg.id is not None:
            self.node.respond_error(origin, msg.id, NotAllowed(f"{who} may not send {msg.kind.name}"))
        return False

    def _bad(self, origin: Origin, exc: ProtocolError) -> None:
        self.node.stats["bad_messages"] += 1
        self.log_refusal(self._limit_key(origin) if origin is not None else "this node",
                          f"sent a bad message: {str(exc)[:120]}")
        if exc.request_id is not None:
            self.node.respond_error(origin, exc.request_id, BadRequest(str(exc)))
