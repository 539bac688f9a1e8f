"""The supervisor role's part for draining nodes: `mesh drain NODE` moves every agent off
a node, one after another, and places nothing there until `mesh undrain NODE`.

A drained node stays up and keeps its lease; it just takes no placement (no spawn, no
restart, no move lands there). Each of its agents is ended there in order (TERMINATE:
its `terminate` runs after the message in hand, and a handler under way is cut as a stop
cuts it, its callers told AgentDown, which they retry with their request ids), then
started on another node from its newest state, as a move off a full disk is. Calls in
flight meanwhile wait for the new place (WHEREIS) and are sent again: extra latency, no
error. The set of drained nodes lives in the supervisor's memory: a supervisor that
restarts has forgotten it (drain again).
"""

from __future__ import annotations

import logging

from . import wire
from .errors import BadRequest, CallError
from .node import Origin
from .tree import ChildStatus

log = logging.getLogger("mesh.supervisor")


class Drains:
    """Part of SupervisorRole (see supervisor.py); `draining` is made there."""

    def _on_drain(self, msg: wire.Msg, origin: Origin) -> None:
        node = msg.body["node"]
        if node not in self.config.nodes:
            self.node.respond_error(origin, msg.id, BadRequest(f"no node named {node!r}"))
            return
        if msg.body.get("undrain"):
            self.draining.discard(node)
            log.warning("supervisor: node %s takes placements again", node)
            self.node.respond(origin, msg.id, {"node": node, "draining": False})
            self._place_pending()
            return
        self._spawn(self._drain(node, origin, msg.id))

    async def _drain(self, node: str, origin: Origin, rid: str) -> None:
        if node not in self.draining:
            log.warning("supervisor: draining node %s: it takes no placements, its agents move", node)
        self.draining.add(node)
        moved, failed = [], []
        for child in list(self.on_node.get(node, {}).values()):
            err = await self._drain_child(child, node)
            if child.node == node and child.status in (ChildStatus.RUNNING, ChildStatus.STARTING):
                failed.append({"agent": child.spec.name, "error": str(err or "it is still there")})
            elif err is not None:
                failed.append({"agent": child.spec.name, "error": str(err)})
            else:
                moved.append(child.spec.name)
        self.node.respond(origin, rid, {"node": node, "draining": node in self.draining, "moved": moved,
                                        "failed": failed})

    async def _drain_child(self, child, node: str) -> CallError | str | None:
        name, inc = child.spec.name, child.incarnation
        if child.status != ChildStatus.RUNNING or child.busy or name in self._leaving:
            return None if child.node != node else f"it is {child.status}{' and busy' if child.busy else ''}"
        self._leaving.add(name)
        try:
            try:
                await self.command(node, wire.Kind.TERMINATE, name, {"incarnation": inc, "reason": "drain"},
                                   self.config.timing.call_timeout_s)
            except CallError as err:
                log.warning("supervisor: ending %s on %s to drain it: %s", name, node, err)
                return err
            if (child.node, child.incarnation, child.status) != (node, inc, ChildStatus.RUNNING):
                return None  # moved or stopped meanwhile
            await self._move(child, avoid=node)
            return None
        finally:
            self._leaving.discard(name)
