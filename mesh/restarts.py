"""RESTART: a drained node stops in order so that its launcher starts it again as a new
interpreter running the code on disk (`mesh restart NODE`, the runtime's own upgrade).

Only a node with no agent left is restarted: the client drains it first, so the agents
moved with their state and calls meanwhile only waited. The answer is sent before the
node stops, and the launcher, seeing the exit code that asks for it, runs the new
process through exec rather than a fork of the code it imported at start.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import Unavailable
from .runner import AgentStatus

if TYPE_CHECKING:
    from . import wire
    from .node import Node, Origin


def on_restart(node: "Node", msg: "wire.Msg", origin: "Origin") -> None:
    if node.on_restart is None:
        node.respond_error(origin, msg.id, Unavailable(
            f"node {node.name} was not started by a launcher: nothing would start it again", {"retry": False}))
        return
    running = sorted(r.name for r in node.runners.values()
                     if r.status in (AgentStatus.RUNNING, AgentStatus.STARTING))
    if running:
        node.respond_error(origin, msg.id, Unavailable(
            f"node {node.name} still runs {len(running)} agent(s) ({', '.join(running[:5])}"
            f"{', ...' if len(running) > 5 else ''}): drain it first (mesh drain {node.name})"))
        return
    node.respond(origin, msg.id, {"node": node.name, "pid": os.getpid()})
    node.on_restart()
