"""Nodes as the supervisor sees them: hellos and lease renewals (a node serves only under
its lease), audits of what runs where, and a node declared dead moving its agents.
"""

from __future__ import annotations

import asyncio
import logging

from . import wire
from . import supervision as sv
from .errors import BadRequest, CallError
from .node import Origin
from .tree import MIN_LIVENESS_WAIT_S, Child, ChildStatus, NodeView
from .wire import Kind

log = logging.getLogger("mesh.supervisor")

MOVES_PER_TURN = 2000  # a lost node's agents put on their way per turn of the loop
AUDIT_PER_WINDOW = 10_000  # an audit of a node with more agents waits that many more liveness windows
AUDIT_PART = 10_000      # an audit's comparison, this many agents a loop turn


def _parts(items: list) -> list[list]:
    return [items[i:i + AUDIT_PART] for i in range(0, len(items), AUDIT_PART)]


class Membership:
    """The part of SupervisorRole that keeps its view of the nodes (a mixin)."""

    def _on_hello(self, msg: wire.Msg, origin: Origin) -> None:
        body = msg.body
        name = body["node"]
        view = self.nodes.get(name)
        if view is None:
            raise BadRequest(f"no node named {name!r} in the config")
        held = body.get("registry")
        if held is not None and not (len(held) == 2 and type(held[0]) is str and type(held[1]) is int):
            raise BadRequest(f"registry must be [epoch, seq], not {held!r:.80}")
        restarted = view.boot is not None and view.boot != body["boot"]
        drops = body.get("drops", 0)
        # a drop counts once: hellos retried while this supervisor was away repeat it
        dropped = view.boot == body["boot"] and drops > view.drops
        view.boot, view.pid, view.last_heard, view.drops = body["boot"], body["pid"], self.clock.now(), drops
        was_alive, view.alive = view.alive, True
        full_before, view.store_full = view.store_full, bool(body.get("store_full"))
        if not self.ready:
            self._inventories[name] = body["agents"]  # a lease only with an inventory (see _learn_view)
        # grants a lease, too; "catchup": this supervisor answers a hello's "registry" with the changes since
        self.node.respond(origin, msg.id, {"epoch": self.table.epoch, "catchup": True})
        if not self.ready:
            return
        if restarted or dropped:
            log.warning("supervisor: node %s %s", name, f"restarted ({body.get('previous') or 'new boot'})"
                        if restarted else "dropped its agents when its lease lapsed")
            if restarted and name != self.node.name:
                self.node.reconnect(name)  # no waiting out the old connection's backoff
            self._node_lost(name, prefer=name)
        # A hello from a node with the same boot only asks for the registry; the agents it
        # lists may predate STARTs still on their way, so they are not compared here.
        self._send_registry(name, *held) if held and not restarted else self._send_snapshot(name)
        if not was_alive or restarted or full_before != view.store_full:
            self._place_pending()

    def _note_store_full(self, view: NodeView, full: bool) -> None:
        """A node said its store cannot commit (disk full), or can again."""
        if full == view.store_full:
            return
        view.store_full = full
        host = self.config.nodes[view.name].host
        if full:
            log.warning("supervisor: host %s's disk is full (node %s): nothing is placed there, "
                        "and its agents and copies move where they can", host, view.name)
        else:
            log.info("supervisor: host %s has room again (node %s)", host, view.name)
        self._place_pending()

    def _on_renew(self, msg: wire.Msg, origin: Origin) -> None:
        """A node's lease renewal. Only a node this supervisor knows as alive, with the
        boot it knows, gets one; any other is told to say hello first."""
        body = msg.body
        view = self.nodes.get(body["node"])
        known = view is not None and view.alive and view.boot == body["boot"]
        if known:
            view.last_heard = self.clock.now()
            view.health = {"agents": body.get("agents", 0)}
            self._note_store_full(view, bool(body.get("store_full")))
            short = view.health["agents"] < self.table.running[view.name]
            view.short_renewals = view.short_renewals + 1 if short else 0
            if view.short_renewals >= 2 and self.ready:  # not a start that crossed the renewal
                self._audit_soon(view)
        self.node.respond(origin, msg.id, {"known": known})

    def _audit_soon(self, view: NodeView) -> None:
        """A node hosts fewer agents than this supervisor counts there: some exit never
        reached it (sent while it was down or restarting). Ask the node, at most once a
        liveness window, and once per AUDIT_PER_WINDOW agents it hosts as many windows:
        an audit's cost grows with the node's agents (at 333,333, after a kill -9 its
        renewals came up short for minutes, and an audit each second was most of the loop)."""
        now = self.clock.now()
        every = self.config.timing.dead_after_s * max(1.0, len(self.on_node.get(view.name, ())) / AUDIT_PER_WINDOW)
        if now - view.audited_at < every:
            return
        view.audited_at = now
        self._spawn(self._audit(view.name))

    async def _audit(self, node: str) -> None:
        """Move every agent this supervisor believes runs on `node` but that is not there
        (and that did not change while the node was asked)."""
        before: dict[str, int] = {}
        for part in _parts(list(self.on_node.get(node, {}).values())):  # a part a loop turn
            before.update((c.spec.name, c.incarnation) for c in part if c.status == ChildStatus.RUNNING)
            await asyncio.sleep(0)
        try:
            body = await self.command(node, Kind.INVENTORY, None, None, self.config.timing.call_timeout_s)
        except CallError as err:
            log.debug("supervisor: audit of %s: %s", node, err)
            return
        there: dict[str, int] = {}
        for part in _parts(body.get("agents") or ()):
            there.update((item[0], item[2]) for item in part if item[3] in ("running", "starting"))
            await asyncio.sleep(0)
        gone = []
        for part in _parts(list(before.items())):
            for name, inc in part:
                child = self.children.get(name)
                if (child is not None and child.node == node and child.status == ChildStatus.RUNNING
                        and child.incarnation == inc and there.get(name, -1) < inc):
                    gone.append((child, inc))
            await asyncio.sleep(0)
        if gone:  # one line, not one per agent: a node that lost 100,000 made 100,000 lines
            log.warning("supervisor: %d agent(s) are not on %s any more: starting them again (%s%s)", len(gone), node,
                        ", ".join(f"{c.spec.name} as {inc}" for c, inc in gone[:5]), ", ..." if len(gone) > 5 else "")
            self._move_away(node, gone, prefer=node, avoid=None)

    def _on_goodbye(self, msg: wire.Msg, origin: Origin) -> None:
        name = msg.body["node"]
        view = self.nodes.get(name)
        self.node.respond(origin, msg.id, {"ok": True})
        if view is not None and view.boot == msg.body["boot"] and view.alive:
            log.info("supervisor: node %s left", name)
            view.alive = False
            self._node_lost(name, avoid=name)

    def _check_liveness(self) -> None:
        """Declare silent nodes dead, then wait for the next one that could be."""
        now = self.clock.now()
        timing = self.config.timing
        self.nodes[self.node.name].last_heard = now
        for view in self.nodes.values():
            if view.alive and sv.liveness_expired(view.last_heard, now, timing.heartbeat_s, timing.liveness):
                if self.plane is not None:  # its lease is in etcd, not granted here: revoke it first
                    if view.evicted_until < now:
                        log.warning("supervisor: node %s silent for %.2fs: evicting it", view.name, now - view.last_heard)
                        view.evicted_until = now + self.plane.settings.lease_s
                        self._spawn(self.plane.evict(view.name))
                    continue
                log.warning("supervisor: node %s silent for %.2fs: declared dead", view.name, now - view.last_heard)
                view.alive = False
                self._node_lost(view.name, avoid=view.name)
        self._arm_liveness()

    def _on_node_gone(self, name: str, last: dict) -> None:
        """[control]: a node's key left etcd: its lease ran out (so it serves nothing: it
        counts its lease out first), it stopped, or this supervisor evicted it (then it
        may serve until its own count runs out, `evicted_until`)."""
        view = self.nodes.get(name)
        if view is None or not view.alive or last.get("boot") not in (None, view.boot):
            return  # not known alive here, or an earlier boot's lease (its successor holds its own)
        wait = view.evicted_until - self.clock.now()
        if wait > 0:
            self.clock.call_after(wait, lambda: self._on_node_gone(name, last))
            return
        log.warning("supervisor: node %s holds no lease any more: its agents move", name)
        view.alive = False
        self._node_lost(name, avoid=name)

    def _arm_liveness(self) -> None:
        """Wake at the end of the earliest silence window of a live node, so that a node
        is declared dead when its window ends, not up to a polling interval later. A
        renewal only moves a window's end later, and a node that comes alive ends its
        window no sooner than this one, so re-arming when the timer fires is enough."""
        now, window = self.clock.now(), self.config.timing.dead_after_s
        ends = [v.last_heard + window for v in self.nodes.values() if v.alive and v.name != self.node.name]
        wake = min(ends, default=now + window)
        self.node._once(max(wake - now, MIN_LIVENESS_WAIT_S), self._check_liveness)

    def on_link_state(self, node: str, up: bool | None) -> None:
        pass  # liveness comes from heartbeats and hellos, not from TCP

    def _node_lost(self, name: str, prefer: str | None = None, avoid: str | None = None) -> None:
        """Move the agents of a node that died (prefer: it came back at once; avoid: it
        went silent, so its host is suspect too)."""
        if self.stopping:
            return
        self._move_away(name, [(c, None) for c in self.on_node.get(name, {}).values()], prefer, avoid)

    def _move_away(self, name: str, children: list[tuple[Child, int | None]], prefer: str | None,
                   avoid: str | None) -> None:
        """Move each (child, incarnation) still on `name` (as that incarnation, if given),
        `MOVES_PER_TURN` a loop turn: a third of a million moves at once held the loop for
        seconds, and their registry update was one message of them all."""
        if len(children) <= MOVES_PER_TURN:
            self._move_all(name, children, prefer, avoid)
        else:
            self._spawn(self._move_in_turns(name, children, prefer, avoid))

    async def _move_in_turns(self, name: str, children: list, prefer: str | None, avoid: str | None) -> None:
        for i in range(0, len(children), MOVES_PER_TURN):
            if i:
                await asyncio.sleep(0)
            if self.stopping:
                return
            self._move_all(name, children[i:i + MOVES_PER_TURN], prefer, avoid)

    def _move_all(self, name: str, children: list, prefer: str | None, avoid: str | None) -> None:
        """Mark them to be started elsewhere; the placement pass starts them a bounded
        number at a time (a task for each of 333,333 moves held gigabytes and made the
        collector's walks long)."""
        for child, inc in children:  # each still there: one moved, stopped or restarted meanwhile is not
            if (child.node == name and child.status in (ChildStatus.RUNNING, ChildStatus.STARTING)
                    and inc in (None, child.incarnation)):
                self._mark_moved(child, prefer, avoid)
        self._place_pending()

    def _mark_moved(self, child: Child, prefer: str | None, avoid: str | None) -> bool:
        """Make `child` pending, to start with this preference; False if a start is under
        way: its answer decides, and a failed one is tried again (marking it pending now
        would disown an incarnation that may be running)."""
        if child.busy:
            return False
        log.info("supervisor: moving %s (incarnation %d, %s on %s)", child.spec.name, child.incarnation,
                 child.status, child.node)
        child.status = ChildStatus.PENDING
        child.hint = (prefer, avoid)
        child.restarts += 1
        self.table.set(child.spec.name, None, child.incarnation)
        self._schedule_registry()
        return True

    async def _move(self, child: Child, prefer: str | None = None, avoid: str | None = None) -> None:
        if self._mark_moved(child, prefer, avoid) and not self.sups[child.parent].failed and not self.tree_failed:
            child.hint = None
            await self._start_or_crash(child, prefer=prefer, avoid=avoid)
