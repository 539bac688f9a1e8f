"""Requests from clients: spawns and stops of dynamic children (answered through
control.ControlReplies, so that a copy never acts twice), and the status of the mesh.
"""

from __future__ import annotations

import asyncio
import heapq
import logging

import msgpack

from . import wire
from .errors import AlreadyExists, BadRequest, CallError, NoSuchAgent, NotAllowed, SupervisorDown, Unavailable, reused_id
from .introspect import MAX_TOP
from .node import Origin
from .supervision import ChildSpec
from .tree import DYNAMIC_PREFIX, PLACE_PREFIX, Child, ChildStatus, placed
from .wire import Kind

log = logging.getLogger("mesh.supervisor")

MAX_STATUS_PAGE = 10_000  # agents one status answer may list, about 1 MB (a page; `after` for the next)


class Requests:
    """The part of SupervisorRole that answers spawns, stops and status (a mixin)."""

    def _on_spawn(self, msg: wire.Msg, origin: Origin) -> None:
        if self.control.repeat(msg.id, origin, msg.body):
            return
        try:
            self._spawn_request(msg)
        except CallError as err:
            self.control.fail(msg.id, err)

    def _spawn_request(self, msg: wire.Msg) -> None:
        body = msg.body
        name, kind = body["name"], body["kind"]
        parent = body.get("supervisor") or self.config.dynamic_supervisor
        if not self.ready:
            raise Unavailable("the supervisor is still learning what runs where")
        if self.tree_failed:
            raise SupervisorDown(f"cannot spawn {name!r}: {self.failure}")
        existing = self.children.get(name)
        if existing is not None and existing.spawn_rid == msg.id:
            self._spawn_again(existing, body, parent, msg.id)
            return
        if name in self._unstopped:
            raise Unavailable(f"the stop of {name!r} is not confirmed yet (its node could not carry it out): "
                              f"stop it again before spawning the name")
        if name in self.children or name in self.sups:
            existing = self.children.get(name)
            raise AlreadyExists(f"an agent named {name!r} exists already" +
                                (f" (on node {existing.node})" if existing and existing.node else ""))
        if self.config.resolve_kind(kind) is None:
            raise NotAllowed(f"kind {kind!r} is not in the config's allow-list")
        sup = self.sups.get(parent)
        if sup is None or not sup.spec.dynamic:
            raise BadRequest(f"{parent!r} is not a dynamic supervisor")
        ttl_s = msg.ttl_ms / 1000 if msg.ttl_ms else None
        refusal = self.spawns.refusal(ttl_s)
        if refusal is not None:
            raise refusal
        spec = ChildSpec(name, kind, body.get("args") or {}, body.get("restart") or "permanent",
                         group=body.get("group") or "")
        child = Child(spec, parent, dynamic=True, born=self._new_incarnation(), spawn_rid=msg.id, busy=True)
        record = {"name": name, "kind": spec.kind, "args": spec.args, "restart": spec.restart, "parent": parent,
                  "born": child.born, "rid": msg.id}
        if spec.group:  # only then: a record without one reads the same to the release before
            record["group"] = spec.group
        child.unrecorded[DYNAMIC_PREFIX + name] = msgpack.packb(record)
        self._add_child(child)
        sup.children[name] = None
        self.spawns.begin()
        self._spawn(self._spawn_child(child, msg.id, self.clock.now() + ttl_s if ttl_s else None))

    def _spawn_again(self, child: Child, body: dict, parent: str, rid: str) -> None:
        """A repeat of the spawn that made `child` that the control replies no longer know
        (the supervisor restarted since): it gets where the child runs; a reused id is
        refused."""
        spec = child.spec
        if (body["kind"], body.get("args") or {}, body.get("restart") or "permanent", parent,
                body.get("group") or "") != (spec.kind, spec.args, spec.restart, child.parent, spec.group):
            raise reused_id(rid)
        if child.status == ChildStatus.RUNNING and child.node is not None:
            self.control.answer(rid, placed(child))
        else:
            raise Unavailable(f"{child.spec.name!r} was spawned and is (re)starting now")

    async def _spawn_child(self, child: Child, rid: str, deadline: float | None) -> None:
        try:
            await self._spawn_child_once(child, rid, deadline)
        finally:
            self.spawns.end()

    async def _spawn_child_once(self, child: Child, rid: str, deadline: float | None) -> None:
        spec = child.spec
        forgetting = self._forgetting.get(spec.name)
        if forgetting is not None:  # an earlier agent of this name exited for good: its state goes first
            await asyncio.shield(forgetting)
        # Its own start is the first: the child was made busy when it was made, so nothing
        # else (a placement pass, a node's hello) started it meanwhile, or this start would
        # find one under way, call itself failed and forget a child whose incarnation runs
        # on (issue 21). Its record goes to the store in the same write as its placement.
        child.busy = False
        err = await self._start_child(child, deadline=deadline, fresh=True)
        if self.children.get(spec.name) is not child or child.status == ChildStatus.STOPPED:
            # A stop came while it started, and was answered: the stop forgot it (and a
            # spawn of the name since is another agent's). The answer is final, kept for
            # this id: a retryable one would have the client's retry spawn the name again,
            # after its stop was confirmed.
            self.control.fail(rid, NoSuchAgent(f"{spec.name!r} was stopped while its spawn was under way",
                                               {"stopped": True}))
            return
        if err is None and child.status != ChildStatus.RUNNING:
            err = Unavailable(f"no live node may run {spec.name!r} now")
        if err is not None:
            self._forget_dynamic(child)
            self.table.remove(spec.name)
            self._schedule_registry()
            self.control.fail(rid, err)
            return
        self.control.answer(rid, placed(child))

    def _forget_dynamic(self, child: Child) -> asyncio.Future:
        """Forget a dynamic child here and in the store; returns the store's outcome, to
        await before saying it is gone (a supervisor started after would find it)."""
        if self.children.get(child.spec.name) is child:
            self._set_replicas(child, ())
            del self.children[child.spec.name]
            self.on_node.get(child.node, {}).pop(child.spec.name, None)
            self.by_status[child.status] -= 1
            self.by_kind[child.spec.kind] -= 1
            child.node_index = child.status_counts = None  # a start still under way for it may set its node
            self.sups[child.parent].children.pop(child.spec.name, None)
            members = self.groups.get(child.spec.group)
            if members is not None:
                members.pop(child.spec.name, None)
                if not members:
                    del self.groups[child.spec.group]
        return asyncio.ensure_future(self.records.write(
            {}, [DYNAMIC_PREFIX + child.spec.name, PLACE_PREFIX + child.spec.name]))

    def _forget_state(self, child: Child, incarnation: int, reason: str) -> None:
        """Delete the state (and its copies) of an incarnation that exited for good, so a
        later spawn of the name, of any kind, starts from nothing. A spawn of the name
        waits for this (see _spawn_child); the delete is fenced by incarnation, so it never
        removes a newer incarnation's record."""
        name = child.spec.name
        node = child.node if child.node and self.nodes[child.node].alive else self._any_node_on_host(child.node)
        copies = tuple(sorted({h for hosts in child.holders for h in hosts} | set(child.replicas)))
        done = asyncio.get_running_loop().create_future()
        self._forgetting[name] = done

        async def forget() -> None:
            try:
                await self._terminate_instance(node, name, incarnation, reason, forget=True, replicas=copies)
            finally:
                if self._forgetting.get(name) is done:
                    del self._forgetting[name]
                done.set_result(None)
        self._spawn(forget())

    def _on_stop(self, msg: wire.Msg, origin: Origin) -> None:
        if self.control.repeat(msg.id, origin, msg.target):
            return  # a copy of a stop: it must not stop what was spawned since
        try:
            self._stop_request(msg)
        except CallError as err:
            self.control.fail(msg.id, err)

    def _stop_request(self, msg: wire.Msg) -> None:
        name = msg.target
        if not self.ready:  # its records or the nodes' inventories are still on their way
            raise Unavailable("the supervisor is still learning what runs where")
        child = self.children.get(name)
        named = msg.body.get("incarnation") if isinstance(msg.body, dict) else None
        if child is not None and child.born and type(named) is int and 0 < named < child.born:
            # meant for an earlier agent of the name (a late copy, held on a link): the
            # agent spawned since is not its to stop. (0 or less names none: a registry
            # that does not know the incarnation yet, after a supervisor restart.)
            raise NoSuchAgent(f"{name!r}: the agent this stop was sent for (incarnation {named}) was stopped "
                              f"already; another of the name runs now", {"earlier_life": True, "incarnation": child.born})
        if child is None:
            child = self._unstopped.get(name)  # a stop answered "not confirmed": this is its repeat
            if child is None:
                raise NoSuchAgent(f"no agent named {name!r}")
            if name in self._forgetting:
                raise Unavailable(f"the stop of {name!r} is under way")
            forgotten = self._forget_dynamic(child)  # again: the first stop's record may not have landed
        elif not child.dynamic:
            raise NotAllowed(f"{name!r} is a static agent of the config's tree; remove it from the config instead")
        else:
            forgotten = self._forget_dynamic(child)
            self.table.remove(name)
            self._schedule_registry()
            child.status = ChildStatus.STOPPED
        done = asyncio.get_running_loop().create_future()
        self._forgetting[name] = done  # a spawn of the name waits until its state is gone

        async def stop() -> None:
            try:
                await self._stop_child(child, msg.id, forgotten)
            finally:
                if self._forgetting.get(name) is done:
                    del self._forgetting[name]
                done.set_result(None)
        self._spawn(stop())

    async def _stop_child(self, child: Child, rid: str, forgotten: asyncio.Future | None = None) -> None:
        """End every incarnation of a dynamic child and delete its state. The stop takes an
        incarnation number of its own, newer than any START sent (one may be under way): the
        node ends whatever runs the name below it, deletes the record fenced at it, and refuses
        every older START from then on. It answers stopped only once that is done."""
        name = child.spec.name
        node = child.node if child.node and self.nodes[child.node].alive else self._any_node_on_host(child.node)
        copies = {h for hosts in child.holders for h in hosts} | set(child.replicas)
        stop_at = self._new_incarnation(child.incarnation)
        body = {"incarnation": stop_at, "reason": "stopped", "forget": True}
        if copies:
            body["replicas"] = sorted(copies)
        try:
            answer = await self.command(node, Kind.TERMINATE, name, body, self.config.timing.call_timeout_s)
        except CallError as err:
            log.warning("supervisor: stopping %s on %s: %s", name, node, err)
            # the name stays reserved for the stop's repeat: until a stop is confirmed, a
            # spawn of it is refused (its state may still be in the store)
            self._unstopped[name] = child
            self.control.fail(rid, Unavailable(
                f"the stop of {name!r} is not confirmed: node {node} did not carry it out ({err}); "
                f"stop it again when the node is back"))
            return
        if forgotten is not None:
            outcome = await forgotten
            if outcome.error is not None:  # a supervisor started after this would still know it
                self._unstopped[name] = child
                self.control.fail(rid, Unavailable(f"the stop of {name!r} could not be recorded: {outcome.error}; "
                                                   f"stop it again"))
                return
        self._unstopped.pop(name, None)
        self.control.answer(rid, {"name": name, "stopped": bool(answer.get("stopped"))})

    def _any_node_on_host(self, node: str | None) -> str:
        host = self.config.nodes[node].host if node else self.config.nodes[self.node.name].host
        for view in self.nodes.values():
            if view.alive and self.config.nodes[view.name].host == host:
                return view.name
        return self.node.name

    def _on_status(self, msg: wire.Msg, origin: Origin) -> None:
        view = msg.body or {"agents": True}  # nil: every agent, as before views existed
        limit = view.get("limit")
        if limit is not None and not 0 < limit <= MAX_STATUS_PAGE:
            self.node.respond_error(origin, msg.id, BadRequest(f"limit must be 1..{MAX_STATUS_PAGE}, not {limit}"))
            return
        if "group" in view:  # a group's members: from the records alone, nothing asked of the nodes
            self.node.respond(origin, msg.id, self._group_status(view["group"]))
            return
        self._spawn(self._status(origin, msg.id, view))

    def _group_status(self, group: str) -> dict:
        members = []
        for name in self.groups.get(group, ()):
            c = self.children[name]
            running = c.status == ChildStatus.RUNNING
            members.append({"name": name, "kind": c.spec.kind, "status": c.status, "restarts": c.restarts,
                            "node": c.node if running else None, "incarnation": c.incarnation})
        return {"group": group, "members": members, "ready": self.ready, "epoch": self.epoch}

    def _listed(self, view: dict) -> tuple[list[str], str | None]:
        """The names a status view lists, in order, and where the next page starts."""
        kind, node, status, after = view.get("kind"), view.get("node"), view.get("status"), view.get("after")
        if "name" in view:  # one agent (mesh inspect): no walk of the children
            return ([view["name"]] if view["name"] in self.children else []), None
        matching = (n for n, c in self.children.items()
                    if (kind is None or c.spec.kind == kind) and (status is None or c.status == status)
                    and (node is None or (c.node == node and c.status == ChildStatus.RUNNING))
                    and (after is None or n > after))
        limit = view.get("limit")
        if limit is None:
            return sorted(matching), None
        page = heapq.nsmallest(limit + 1, matching)  # a page: no sort of every agent for each one
        return (page[:limit], page[limit - 1]) if len(page) > limit else (page, None)

    async def _status(self, origin: Origin, rid: str, view: dict) -> None:
        listing = bool(view.get("agents"))
        names, next_after = self._listed(view) if listing else ([], None)
        ask = None if listing else {"summary": True}  # counts only: a node's reply does not grow with its agents
        top = view.get("top")
        if top and not listing:
            ask = {"summary": True, "top": min(top, MAX_TOP)}  # and each node's busiest agents (mesh top)

        async def inventory(name: str):
            try:
                return await self.command(name, Kind.INVENTORY, None, ask, self.config.timing.dead_after_s)
            except CallError:
                pass
            if ask and "top" in ask:  # a node of the release before knows no top: its counts, then
                try:
                    return await self.command(name, Kind.INVENTORY, None, {"summary": True},
                                              self.config.timing.dead_after_s)
                except CallError:
                    pass
            return None
        live = [v.name for v in self.nodes.values() if v.alive]
        answers = dict(zip(live, await asyncio.gather(*(inventory(n) for n in live))))
        mailbox: dict[str, int] = {}
        vsn: dict[str, int] = {}  # the version of its kind's code each agent runs
        nodes = []
        for name, node_view in self.nodes.items():
            inv = answers.get(name)
            spec = self.config.nodes[name]
            for item in (inv or {}).get("agents", ()):
                mailbox[item[0]] = item[4]
                if len(item) > 7 and item[3] in ("running", "starting"):
                    vsn[item[0]] = item[7]
            nodes.append({"name": name, "host": spec.host, "address": f"{spec.address}:{spec.port}",
                          "alive": node_view.alive and inv is not None, "pid": node_view.pid,
                          "agents": (len(inv["agents"]) if "agents" in inv else inv.get("count", 0)) if inv else 0,
                          "supervisor": name == self.node.name, "store_full": node_view.store_full,
                          "stats": (inv or {}).get("stats", {}), "kinds": (inv or {}).get("kinds", {}),
                          "draining": name in self.draining, "rss": (inv or {}).get("rss")})
        now = self.clock.now()
        answer = {"nodes": nodes, "ready": self.ready, "failed": self.tree_failed, "failure": self.failure,
                  "epoch": self.epoch, "total": len(self.children)}
        if listing:
            answer["agents"] = [self._agent_status(n, self.children[n], mailbox, vsn, now)
                                for n in names if n in self.children]
            if "name" in view and answer["agents"]:  # its latest exits: when, how, why
                answer["agents"][0]["exits"] = [list(e) for e in self.children[view["name"]].exits]
            if next_after is not None:
                answer["next"] = next_after  # ask again with after=next for the page that follows
        else:
            answer["kinds"] = {kind: n for kind, n in self.by_kind.items() if n}
            answer["statuses"] = {status: n for status, n in self.by_status.items() if n}
            if top:
                answer["top"] = self._busiest(answers, min(top, MAX_TOP))
        self.node.respond(origin, rid, answer)

    def _busiest(self, answers: dict, n: int) -> list[dict]:
        """The `n` busiest agents of the nodes' answers, with their restarts from here."""
        items = [(node, item) for node, inv in answers.items() for item in (inv or {}).get("top", ())]
        out = []
        for node, (name, kind, mailbox, handled, handling_ms) in heapq.nlargest(n, items, key=lambda x: (x[1][2], x[1][3])):
            child = self.children.get(name)
            out.append({"name": name, "kind": kind, "node": node, "mailbox": mailbox, "handled": handled,
                        "handling_ms": handling_ms, "restarts": child.restarts if child else 0,
                        "incarnation": child.incarnation if child else None})
        return out

    @staticmethod
    def _agent_status(name: str, c, mailbox: dict, vsn: dict, now: float) -> dict:
        return {"name": name, "kind": c.spec.kind, "node": c.node if c.status == ChildStatus.RUNNING else None,
                "status": c.status, "incarnation": c.incarnation, "restarts": c.restarts,
                "mailbox": mailbox.get(name, 0), "supervisor": c.parent, "vsn": vsn.get(name),
                **({"restart_in_s": round(max(0.0, c.restart_at - now), 3), "streak": c.streak}
                   if c.status == ChildStatus.BACKOFF else {})}
