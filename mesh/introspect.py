"""INSPECT: one agent as its node sees it, for `mesh inspect NAME` (OTP's sys:get_status).

What an operator needs when an agent is slow or stuck: its state (shown, cut past a
size the caller sets), its mailbox and the first messages waiting there, the message in
hand and for how long, its commits and recorded replies. Read-only: nothing here
touches the agent, so inspecting a busy agent never waits for it.
"""

from __future__ import annotations

import heapq
import json
import os
from typing import TYPE_CHECKING, Any

from .errors import NoSuchAgent
from .runner import AgentStatus

if TYPE_CHECKING:
    from . import wire
    from .node import Node, Origin
    from .runner import Envelope, Runner

DEFAULT_MAX_BYTES = 2000
MAX_BYTES = 1_000_000  # of the state shown: the answer stays far below a message's limit
WAITING_SHOWN = 5  # messages of the mailbox shown, from its head
MAX_TOP = 100      # busiest agents a node names for mesh top


def preview(value: Any, max_bytes: int) -> str:
    """`value` as JSON (bytes and other non-JSON values by repr), cut at `max_bytes`.
    Keys keep their order: a state may mix int and str keys, which cannot be sorted."""
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):  # keys JSON cannot take (a tuple, bytes): as Python shows it
        text = repr(value)
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode(errors="ignore") + f"... ({len(data) - max_bytes:,} bytes more)"


def _message(env: "Envelope", now: float, max_bytes: int) -> dict:
    msg = env.msg
    return {"kind": msg.kind.name.lower(), "id": msg.id, "from": env.peer,
            "waited_ms": round((now - env.arrived) * 1000, 1) if env.arrived else None,
            "body": preview(msg.body, max_bytes)}


def on_inventory(node: "Node", msg: "wire.Msg", origin: "Origin") -> None:
    """What runs on the node: every agent, or with {summary} counts only; with {top: n},
    also its n busiest agents (mesh top). Always its counters and its memory."""
    body = msg.body or {}
    listed = {"count": len(node.runners)} if body.get("summary") else {"agents": node._inventory()}
    if body.get("top"):
        listed["top"] = busiest(node, min(body["top"], MAX_TOP))
    node.respond(origin, msg.id, {"node": node.name, "boot": node.boot, "pid": os.getpid(), **listed,
                                  "stats": dict(node.stats), "kinds": node.upgrades.loaded(), "rss": rss_bytes()})


def busiest(node: "Node", n: int) -> list[list]:
    """The `n` agents with the most waiting, then the most handled in this incarnation:
    [name, kind, mailbox, handled, ms in the message in hand or None]."""
    now = node.clock.now()
    top = heapq.nlargest(n, node.runners.values(), key=lambda r: (r.depth(), r.handled))
    return [[r.name, r.kind, r.depth(), r.handled,
             round((now - r.started_at) * 1000, 1) if r.task is not None else None] for r in top]


def rss_bytes() -> int | None:
    """This process's resident memory, where /proc says it."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def running(node: "Node", msg: "wire.Msg", origin: "Origin") -> "Runner | None":
    """The runner of the agent a request names, if it runs here; else NoSuchAgent is
    answered (naming this node) and None returned."""
    runner = node.runners.get(msg.target)
    if runner is None or runner.status not in (AgentStatus.RUNNING, AgentStatus.STARTING):
        node.respond_error(origin, msg.id, NoSuchAgent(f"{msg.target} does not run on node {node.name}",
                                                       {"node": node.name}))
        return None
    return runner


def on_inspect(node: "Node", msg: "wire.Msg", origin: "Origin") -> None:
    runner = running(node, msg, origin)
    if runner is None:
        return
    max_bytes = min(max((msg.body or {}).get("max_bytes") or DEFAULT_MAX_BYTES, 100), MAX_BYTES)
    now = node.clock.now()
    agent = runner.agent
    mailbox = list(runner.mailbox or ())
    handling = runner.task is not None
    node.respond(origin, msg.id, {
        "name": runner.name, "node": node.name, "kind": runner.kind, "vsn": runner.vsn,
        "incarnation": runner.incarnation, "status": runner.status, "paused": runner.paused,
        "state": preview(agent.state, max_bytes) if agent is not None else None,
        "mailbox": len(mailbox),
        "waiting": [_message(env, now, max_bytes // 4) for env in mailbox[:WAITING_SHOWN]],
        "handling": [_message(env, now, max_bytes // 4) for env in runner.in_hand()],
        "handling_for_ms": round((now - runner.started_at) * 1000, 1) if handling else None,
        "handled": runner.handled, "seq": runner.seq,
        "committed_seq": runner.durable[0] if runner.durable else None,
        "replies_kept": len(runner.window), "replicas": list(runner.replicas),
    })
