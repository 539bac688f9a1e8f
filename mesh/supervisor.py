"""The supervisor role: owns the tree, places agents on nodes, restarts what fails.

It runs inside one node (the config's `supervisor.node`) and talks to every node with
the same messages a client would use: START and TERMINATE agents, HEARTBEAT nodes, ask
their INVENTORY, and push REGISTRY updates. The decisions themselves (restart or not,
which siblings, too many restarts?) are the pure functions of `mesh.supervision`.

  * A child that exits (EXIT from its node) is restarted per its restart type, its
    supervisor's strategy and restart intensity; too many restarts fail the supervisor,
    whose parent then decides (escalation, up to the root).
  * A node that dies (its launcher restarts it and it says HELLO with a new boot, or it
    stays silent for heartbeat x liveness) loses its agents: they are moved, with their
    state, to live nodes; that counts against nobody's intensity.
  * On its own start it first learns what runs where (every node's INVENTORY, or its
    silence) and moves nothing before it has that view; then it adopts what runs,
    starts what is missing and stops what it does not know.

Incarnations are `epoch * 10**9 + n`: the epoch grows by one each time a supervisor
starts (kept in the store), so a restarted supervisor never reuses a number.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter

import msgpack

from . import supervision as sv
from . import wire
from .clock import Backoff
from .errors import (AlreadyExists, BadRequest, CallError, CallTimeout, NoSuchAgent,
                     NotAllowed, Retryable, SupervisorDown, Unavailable)
from . import placement
from .control import ControlReplies
from .node import Node, Origin
from .registry import Table
from .supervision import ChildSpec
from .tree import Child, ChildStatus, NodeView, Sup
from .wire import Kind

log = logging.getLogger("mesh.supervisor")

MAX_START_BACKOFF_S = 5.0
START_CONCURRENCY = 512
MIN_LIVENESS_WAIT_S = 0.001  # a deadline that float rounding left a hair in the future
_DYNAMIC_PREFIX = "sup/child/"
_PLACE_PREFIX = "sup/place/"
_EPOCH_KEY = "sup/epoch"


class SupervisorRole:
    def __init__(self, node: Node):
        self.node, self.config, self.clock = node, node.config, node.clock
        self.control = ControlReplies(node, node.clock)  # spawns and stops, by request id
        node.add_role(self, {Kind.SPAWN: self._on_spawn, Kind.STOP: self._on_stop, Kind.STATUS: self._on_status,
                             Kind.HELLO: self._on_hello, Kind.HEARTBEAT: self._on_renew, Kind.EXIT: self._on_exit,
                             Kind.GOODBYE: self._on_goodbye})
        self.epoch = 0
        self._next = 0
        self.table = Table(node.boot)
        self.started_at = self.clock.now()
        # silence is counted from now: leases granted by an earlier supervisor lapse first
        self.nodes = {n: NodeView(n, last_heard=self.started_at) for n in self.config.nodes}
        me = self.nodes[node.name]
        me.boot, me.pid, me.alive = node.boot, os.getpid(), True
        self.children: dict[str, Child] = {}
        self.sups: dict[str, Sup] = {}
        self.ready = False
        self.ready_event = asyncio.Event()
        self._inventories: dict[str, list] = {}  # what nodes said runs on them, before ready
        self._early_exits: list[wire.Msg] = []
        self._start_slots = asyncio.Semaphore(START_CONCURRENCY)
        self.placing: Counter = Counter()      # node -> starts under way there
        self.replica_use: Counter = Counter()  # host -> children it holds copies for
        self._registry_scheduled = False
        self.tree_failed = False
        self.booting = False   # the tree is being started in order (see _boot)
        self.stopping = False  # the whole mesh stops in order (see stop_tree)
        self.failure: str | None = None  # why the tree failed: names the supervisors that gave up
        self._forgetting: dict[str, asyncio.Future] = {}  # name -> done once its state is deleted
        self._unstopped: dict[str, "Child"] = {}  # stopped names whose node could not carry the stop out
        self._leaving: set[str] = set()  # names being moved off a host whose disk is full

    # --- boot ------------------------------------------------------------------------------------

    async def start(self) -> None:
        store = self.node.store
        raw = store.get_meta(_EPOCH_KEY)
        self.epoch = (msgpack.unpackb(raw) if raw else 0) + 1
        await self.node.commits.commit_meta({_EPOCH_KEY: msgpack.packb(self.epoch)})
        self._build_tree()
        for key, raw in store.meta_items(_DYNAMIC_PREFIX):
            try:
                d = msgpack.unpackb(raw, raw=False)
                spec = ChildSpec(d["name"], d["kind"], d.get("args") or {}, d.get("restart", "permanent"))
                parent = d.get("parent", self.config.dynamic_supervisor)
                born = int(d.get("born", 0))
                rid = d.get("rid")
            except Exception as exc:
                log.error("supervisor: skipping unreadable dynamic child %s: %s", key, exc)
                continue
            if parent not in self.sups or spec.name in self.children:
                log.error("supervisor: dynamic child %s names unknown supervisor %s", spec.name, parent)
                continue
            self.children[spec.name] = Child(spec, parent, dynamic=True, born=born, spawn_rid=rid)
            self.sups[parent].children.append(spec.name)
        for key, raw in store.meta_items(_PLACE_PREFIX):
            child = self.children.get(key[len(_PLACE_PREFIX):])
            try:
                place = msgpack.unpackb(raw, raw=False)
                if child is not None and place["home"] in self.config.hosts:
                    child.home = place["home"]
                    self._set_replicas(child, tuple(h for h in place["replicas"] if h in self.config.hosts))
                    sets = place.get("holders") or [[child.home, *child.replicas]]
                    child.holders = [tuple(h for h in hs if h in self.config.hosts) for hs in sets]
            except Exception as exc:
                log.error("supervisor: skipping unreadable placement %s: %s", key, exc)
        log.info("supervisor on %s: epoch %d, %d agents in the tree", self.node.name, self.epoch, len(self.children))
        await self._learn_view()
        self.node._every(self.config.timing.heartbeat_s, self._place_pending)
        self._arm_liveness()

    def _build_tree(self) -> None:
        tree, agents = self.config.tree, self.config.agents

        def add(name: str, parent: str | None) -> None:
            spec = tree[name]
            self.sups[name] = Sup(spec, parent, list(spec.children))
            for child in spec.children:
                if child in tree:
                    add(child, name)
                else:
                    self.children[child] = Child(agents[child], name)
        add("root", None)

    async def _learn_view(self) -> None:
        """Ask every node what runs on it; give up on those silent past the liveness window.

        A node is granted a lease only once its inventory is known (an INVENTORY answer or
        a HELLO, which carries one), so a node this supervisor has not heard from is a node
        without a lease: by the time the window ends, it serves nothing any more."""
        deadline = self.started_at + self.config.timing.dead_after_s
        inventories = self._inventories

        async def ask(name: str) -> None:
            backoff = Backoff(self.clock)
            while self.clock.now() < deadline and name not in inventories:
                try:
                    body = await self.node.caller.request(name, Kind.INVENTORY, None, None,
                                                          max(0.05, min(self.config.timing.heartbeat_s, deadline - self.clock.now())))
                except CallTimeout:
                    continue
                except CallError:  # its link is down: each try would fail at once
                    await backoff.wait(deadline, self.node.caller.link_up())
                    continue
                view = self.nodes[name]
                if name not in inventories:
                    view.boot, view.pid, view.alive, view.last_heard = body["boot"], body["pid"], True, self.clock.now()
                    inventories[name] = body["agents"]
                return
        await asyncio.gather(*(ask(n) for n in self.config.nodes))
        self._reconcile(dict(inventories))
        self._inventories = {}
        self.ready = True
        self.ready_event.set()
        for view in self.nodes.values():
            if view.alive:
                self._send_snapshot(view.name)
        early, self._early_exits = self._early_exits, []
        for msg in early:
            self._on_exit(msg, None)
        self.booting = True  # set now: the periodic placement (armed next) waits for the boot
        self._spawn(self._boot())

    async def _boot(self) -> None:
        """Start what does not run yet as OTP starts a tree: each supervisor's children one
        after another in declared order, depth first (a dynamic supervisor's persisted
        children together, at its place). A static child whose init fails fails the
        tree's start: what started is stopped again in reverse order, and the tree has
        failed. A start the environment refuses (no node may run it now) is tried again
        later and does not hold the others back."""
        try:
            why = await self._boot_sup(self.sups["root"])
        finally:
            self.booting = False
        if why is not None:
            root = self.sups["root"]
            async with root.lock:
                await self._fail(root)
            self._tree_failed(why)
        else:
            self.node.notify("supervisor-ready")
        self._place_pending()

    async def _boot_sup(self, sup: Sup) -> str | None:
        for name in list(sup.children):
            if name in self.sups:
                sub = self.sups[name]
                if sub.spec.dynamic:
                    await asyncio.gather(*(self._start_or_crash(self.children[n]) for n in list(sub.children)
                                           if self.children[n].status == ChildStatus.PENDING))
                    continue
                why = await self._boot_sup(sub)
                if why is not None:
                    return why
                continue
            child = self.children[name]
            if child.status != ChildStatus.PENDING:
                continue  # it runs already (adopted), or is on its way
            err = await self._start_child(child)
            if err is not None and self._crashed_on_start(child, err):
                child.status = ChildStatus.FAILED
                return f"{sup.spec.name!r} could not start {name!r} ({type(err).__name__}: {str(err)[:200]}): the tree did not start"
        return None

    def _reconcile(self, inventories: dict[str, list]) -> None:
        seen: dict[str, list[tuple[int, str, str]]] = {}
        replicas_seen: dict[tuple[str, str], tuple[str, ...]] = {}
        for node, agents in inventories.items():
            for item in agents:
                name, _kind, inc, status = item[0], item[1], item[2], item[3]
                seen.setdefault(name, []).append((inc, node, status))
                if len(item) > 6:
                    replicas_seen[(name, node)] = tuple(h for h in item[6] if h in self.config.hosts)
        for name, instances in seen.items():
            instances.sort(reverse=True)
            child = self.children.get(name)
            for inc, node, status in instances[1:] if child else instances:
                self._spawn(self._terminate_instance(node, name, inc, "unknown to the supervisor"))
            if child is None:
                continue
            inc, node, status = instances[0]
            child.node, child.incarnation = node, inc
            child.home = self.config.nodes[node].host
            self._set_replicas(child, replicas_seen.get((name, node), child.replicas))
            self._add_holders(child, (child.home, *child.replicas))
            if status in ("running", "starting"):
                child.status = ChildStatus.RUNNING
                self.table.set(name, node, inc)
            else:  # it exited while no supervisor listened: decide now
                child.status = ChildStatus.RUNNING
                how = sv.CRASH if status == "crashed" else sv.NORMAL
                self._early_exits.append(wire.Msg(Kind.EXIT, None, None, None, None, {
                    "name": name, "incarnation": inc, "how": how, "reason": "exited while the supervisor was down", "node": node}))
        for name, child in self.children.items():
            if name not in seen:
                child.status = ChildStatus.PENDING
                self.table.set(name, None, max(child.incarnation, 0))
        self._schedule_registry()

    # --- incarnations and placement ---------------------------------------------------------

    def _new_incarnation(self, at_least: int = 0) -> int:
        inc, self._next = placement.next_incarnation(self.epoch, self._next, at_least)
        return inc

    def _candidates(self, spec: ChildSpec) -> list[str]:
        live = [name for name, view in self.nodes.items() if view.alive]
        return placement.candidates(self.config, spec, live, self._full_hosts())

    def _choose_node(self, child: Child, prefer: str | None = None, avoid: str | None = None) -> str | None:
        return placement.choose_node(self.config, self._candidates(child.spec),
                                     lambda n: self.table.running[n] + self.placing[n], prefer, avoid)

    def _place_pending(self) -> None:
        """Start every child that should run and is not (after boot, when a node returns,
        and on every heartbeat tick for starts the environment refused earlier)."""
        if not self.ready or self.tree_failed or self.booting or self.stopping:
            return
        now = self.clock.now()
        for child in list(self.children.values()):
            if (child.status == ChildStatus.PENDING and not child.busy and child.next_try <= now
                    and not self.sups[child.parent].failed):
                self._spawn(self._start_or_crash(child))
        self._leave_full_hosts()

    def _leave_full_hosts(self) -> None:
        """Move what hosts whose disk is full hold, where that can be done now (when one
        says so, and on every heartbeat tick while one does): an agent whose replica host is
        full starts again on its node with a replica host that has room (its claim copies
        its current state there before it serves); one whose home is full moves to another
        host with room, from the newest copy of its state. An agent that has nowhere to go
        stays and serves what needs no commit; nothing is stopped for a move that cannot
        start."""
        full = self._full_hosts()
        if not full or not self.ready or self.tree_failed or self.booting or self.stopping:
            return
        if self.config.nodes[self.node.name].host in full:
            return  # this supervisor could not record where the agents go
        for child in list(self.children.values()):
            if (child.status != ChildStatus.RUNNING or child.busy or child.node is None or child.spec.name in self._leaving
                    or self.sups[child.parent].failed):
                continue
            here = self.config.nodes[child.node].host
            if here not in full and not full.intersection(child.replicas):
                continue
            node = self._way_out(child, here, full)
            if node is not None:
                self._spawn(self._leave(child, node, child.node, child.incarnation))

    def _way_out(self, child: Child, here: str, full: set[str]) -> str | None:
        """The node `child` can run on with no full host in its set: its own node if only a
        replica host is full, else another; None if there is none now, or if some set of
        hosts that may hold its newest state has only full hosts (reading it there, fenced,
        is a write: it would fail)."""
        node = child.node if here not in full else self._choose_node(child, avoid=child.node)
        if node is None or self.config.nodes[node].host in full:
            return None
        host = self.config.nodes[node].host
        sources, replicas = self._sources(child, host), self._choose_replicas(child, host)
        if replicas is None or sources is None or full.intersection(replicas):
            return None
        if any(all(self.config.nodes[n].host in full for n in group) for group in sources):
            return None
        return node

    async def _leave(self, child: Child, node: str, old: str, inc: int) -> None:
        """Start `child` again on `node` (its own node `old`: with new replica hosts). An
        incarnation on a full home ends first, so that one incarnation serves at a time;
        the new one reads its state fenced, so the old one acknowledges nothing after."""
        name = child.spec.name

        def unchanged() -> bool:
            return (child.node, child.incarnation, child.status, child.busy) == (old, inc, ChildStatus.RUNNING, False)
        if not unchanged():
            return
        self._leaving.add(name)
        try:
            log.warning("supervisor: %s (incarnation %d on %s) leaves a full disk: %s", name, inc, old,
                        "to node " + node if node != old else "with other replica hosts")
            if node != old:
                try:
                    await self.node.caller.request(old, Kind.TERMINATE, name, {
                        "incarnation": inc, "reason": "its host's disk is full"}, self.config.timing.call_timeout_s)
                except CallError as err:
                    if not err.data.get("disk_full"):  # not known to have ended: tried again next tick
                        log.warning("supervisor: ending %s on %s before its move: %s", name, old, err)
                        return
                if not unchanged():
                    return  # moved or stopped meanwhile
            await self._move(child, prefer=node, avoid=None if node == old else old)
        finally:
            self._leaving.discard(name)

    async def _start_or_crash(self, child: Child, prefer: str | None = None, avoid: str | None = None) -> None:
        """Start a child outside any strategy; a failed init counts as a crash."""
        err = await self._start_child(child, prefer, avoid)
        if err is not None and self._crashed_on_start(child, err):
            await self._child_exited(child, sv.CRASH, child.incarnation)

    def _crashed_on_start(self, child: Child, err: CallError) -> bool:
        """Whether a failed start is the child's fault (its init failed: a crash), or the
        environment's (no node, store full, timeouts), which is tried again later with
        backoff and counts against nobody's intensity."""
        log.warning("supervisor: starting %s failed: %s", child.spec.name, err)
        if isinstance(err, (Retryable, CallTimeout)):
            child.status = ChildStatus.PENDING
            child.backoff = min(max(child.backoff * 2, self.config.timing.heartbeat_s), MAX_START_BACKOFF_S)
            child.next_try = self.clock.now() + child.backoff
            return False
        return True

    async def _start_child(self, child: Child, prefer: str | None = None, avoid: str | None = None) -> CallError | None:
        """Start one incarnation of `child`; returns the error if it could not be started."""
        if child.busy or self.tree_failed:
            return None  # a start is under way already; or nothing starts in a failed tree
        child.busy = True
        try:
            async with self._start_slots:
                return await self._start_once(child, prefer, avoid)
        finally:
            child.busy = False

    async def _start_once(self, child: Child, prefer: str | None, avoid: str | None) -> CallError | None:
        name = child.spec.name
        at_least = child.incarnation
        for _attempt in range(5):
            if child.status in (ChildStatus.STOPPING, ChildStatus.STOPPED, ChildStatus.FAILED) or self.children.get(name) is not child:
                return None  # stopped meanwhile: a stop outranks every start under way
            node = self._choose_node(child, prefer, avoid)
            if node is None:
                child.status, child.node = ChildStatus.PENDING, None
                self.table.set(name, None, max(child.incarnation, 0))
                self._schedule_registry()
                log.warning("supervisor: no live node may run %s; it waits for one", name)
                return None
            host = self.config.nodes[node].host
            replicas = self._choose_replicas(child, host)
            sources = self._sources(child, host)
            if replicas is None or sources is None:
                child.status, child.node = ChildStatus.PENDING, None
                why = ("not enough live hosts for its replicas" if replicas is None
                       else "no host that holds its state is reachable")
                return Unavailable(f"{name!r} cannot start now: {why}")
            inc = self._new_incarnation(at_least)
            log.info("supervisor: starting %s on %s as %d (replicas %s, state from %s)", name, node, inc,
                     list(replicas), sources or f"{host}'s own store")
            seen = (child.status, child.incarnation)
            self.placing[node] += 1  # counted as load while the start is under way
            noted = await self._note_holders(child, (host, *replicas))
            if not noted or (child.status, child.incarnation) != seen:
                self.placing[node] -= 1
                if noted:
                    return None  # stopped or moved meanwhile
                child.status, child.node = ChildStatus.PENDING, None
                return Unavailable(f"{name!r} cannot start now: its placement could not be recorded")
            child.status, child.node, child.incarnation = ChildStatus.STARTING, node, inc
            child.started_at = self.clock.now()
            self.table.set(name, None, inc)
            body = {"kind": child.spec.kind, "args": child.spec.args, "incarnation": inc, "supervisor": child.parent,
                    "replicas": list(replicas), "sources": sources}
            if child.born:
                body["since"] = child.born
            try:
                await self.node.caller.request(node, Kind.START, name, body, self.config.timing.call_timeout_s)
            except AlreadyExists as err:
                log.info("supervisor: starting %s on %s as %d: %s", name, node, inc, err)
                at_least = int(err.data.get("incarnation", at_least))
                continue
            except (Retryable, CallTimeout) as err:  # that node cannot take it now
                log.warning("supervisor: starting %s on %s: %s", name, node, err)
                if isinstance(err, CallTimeout):  # it may have started there all the same
                    self._spawn(self._terminate_instance(node, name, inc, "its start timed out"))
                avoid, prefer = node, None
                continue
            except CallError as err:  # init failed, kind missing, snapshot unreadable
                child.status, child.node = ChildStatus.PENDING, None
                child.last_exit = str(err)
                self.table.set(name, None, inc)
                self._schedule_registry()
                return err
            finally:
                self.placing[node] -= 1
            if child.incarnation != inc or child.status != ChildStatus.STARTING:
                return None  # superseded meanwhile (stopped, or moved again)
            child.status, child.backoff = ChildStatus.RUNNING, 0.0
            self._placed(child, host, replicas)
            self.table.set(name, node, inc)
            self._schedule_registry()
            log.info("supervisor: %s runs on %s as incarnation %d (replicas %s)", name, node, inc, replicas)
            return None
        child.status = ChildStatus.PENDING
        return Unavailable(f"could not start {name!r} after several attempts")

    def _set_replicas(self, child: Child, replicas: tuple[str, ...]) -> None:
        """Change a child's replica hosts, keeping the per-host counts of replicas up to date."""
        self.replica_use.subtract(child.replicas)
        child.replicas = replicas
        self.replica_use.update(replicas)

    def _live_hosts(self) -> set[str]:
        return {self.config.nodes[v.name].host for v in self.nodes.values() if v.alive}

    def _full_hosts(self) -> set[str]:
        """Hosts whose store cannot commit (a live node of theirs said its disk is full):
        no home or replica is placed there while another host can take it, and what runs
        there is not killed (see _leave_full_hosts)."""
        return {self.config.nodes[v.name].host for v in self.nodes.values() if v.alive and v.store_full}

    def _choose_replicas(self, child: Child, host: str) -> tuple[str, ...] | None:
        return placement.choose_replicas(self.config.store.replicas, self._live_hosts(), host, self._full_hosts(),
                                         child.replicas, self.replica_use)

    def _sources(self, child: Child, host: str) -> list[list[str]] | None:
        return placement.sources(child.holders, host, self._live_node_on)

    def _live_node_on(self, host: str) -> str | None:
        return next((v.name for v in self.nodes.values() if v.alive and self.config.nodes[v.name].host == host), None)

    def _add_holders(self, child: Child, hosts: tuple[str, ...]) -> bool:
        if hosts in child.holders:
            return False
        child.holders.append(hosts)
        return True

    async def _note_holders(self, child: Child, hosts: tuple[str, ...]) -> bool:
        """Record, before a START leaves, that the incarnation about to start will keep its
        state on `hosts`: whether it acknowledges anything is known only later, perhaps
        never to this supervisor (a lost answer, a restart)."""
        if not self._add_holders(child, hosts):
            return True
        outcome = await self.node.commits.commit_meta({_PLACE_PREFIX + child.spec.name: self._placement(child)})
        if outcome.error is not None:
            log.error("supervisor: cannot record where %s keeps its state: %s", child.spec.name, outcome.error)
            return False
        return True

    def _placement(self, child: Child) -> bytes:
        return msgpack.packb({"home": child.home or child.holders[-1][0],
                              "replicas": list(child.replicas), "holders": [list(h) for h in child.holders]})

    def _placed(self, child: Child, host: str, replicas: tuple[str, ...]) -> None:
        """It started: its state lives on `host` and `replicas` now, and only there (it read
        the newest of every earlier set). Remembered in the store too (for a restart)."""
        current = [(host, *replicas)]
        if (child.home, child.replicas, child.holders) == (host, replicas, current):
            return
        child.home, child.holders = host, current
        self._set_replicas(child, replicas)
        self._spawn(self.node.commits.commit_meta({_PLACE_PREFIX + child.spec.name: self._placement(child)}))

    async def _terminate_instance(self, node: str, name: str, inc: int, reason: str, forget: bool = False,
                                  replicas: tuple[str, ...] = ()) -> None:
        body = {"incarnation": inc, "reason": reason, "forget": forget}
        if forget and replicas:
            body["replicas"] = list(replicas)  # the copies go too
        try:
            await self.node.caller.request(node, Kind.TERMINATE, name, body, self.config.timing.call_timeout_s)
        except CallError as err:
            log.warning("supervisor: terminating %s on %s: %s", name, node, err)

    # --- exits and strategies -----------------------------------------------------------------

    def _on_exit(self, msg: wire.Msg, origin: Origin) -> None:
        if self.stopping:
            return  # the mesh stops: nothing is restarted
        if not self.ready:
            self._early_exits.append(msg)
            return
        body = msg.body
        child = self.children.get(body["name"])
        if child is None or child.incarnation != body["incarnation"] or child.status not in (ChildStatus.RUNNING, ChildStatus.STARTING):
            return  # an exit of an incarnation that is no longer the current one
        how, reason = body["how"], body.get("reason", "")
        child.last_exit = f"{how}: {reason}"
        log.info("supervisor: %s exited (%s: %s)", child.spec.name, how, reason)
        if how == sv.LOST:  # its state could not be kept where it was: move it, no fault of its own
            self._spawn(self._move(child, prefer=child.node))
        else:
            self._spawn(self._child_exited(child, how, child.incarnation))

    async def _child_exited(self, child: Child, how: str, incarnation: int) -> None:
        """Apply restart type, intensity and strategy to the exit of one incarnation."""
        sup = self.sups[child.parent]
        name = child.spec.name
        if not sv.should_restart(child.spec.restart, how):
            child.status = ChildStatus.STOPPED
            if child.dynamic:
                self._forget_dynamic(child)
            self.table.remove(name)
            self._schedule_registry()
            if child.spec.restart != "permanent":  # gone for good: so is its state
                self._forget_state(child, incarnation, f"exited for good ({how})")
            return
        delay = 0.0
        async with sup.lock:
            if sup.failed or child.incarnation != incarnation or child.status in (ChildStatus.STOPPED, ChildStatus.STOPPING, ChildStatus.FAILED, ChildStatus.BACKOFF):
                return  # handled already (a sibling's restart, a stop, or a failed supervisor)
            now = self.clock.now()
            allowed, sup.history = sv.allow_restart(sup.history, now, sup.spec.intensity, sup.spec.period_s)
            if not allowed:
                log.error("supervisor: %s restarted more than %d times in %gs: it gives up",
                          sup.spec.name, sup.spec.intensity, sup.spec.period_s)
                await self._fail(sup)
            else:
                delay, child.streak = sv.restart_backoff(child.streak, now - child.started_at,
                                                         sup.spec.backoff_s, sup.spec.backoff_max_s)
                if delay <= 0:
                    await self._restart(sup, sv.to_restart(sup.spec.strategy, sup.children, name), exited=name)
                else:
                    log.warning("supervisor: %s crashed %d times in a row: restarting it in %.2fs",
                                name, child.streak, delay)
                    child.status, child.restart_at = ChildStatus.BACKOFF, now + delay
        if sup.failed:
            await self._escalate(sup)
        elif delay > 0:
            await self._sleep(delay)
            async with sup.lock:
                if sup.failed or child.incarnation != incarnation or child.status != ChildStatus.BACKOFF:
                    return  # stopped, restarted with a sibling, or its supervisor gave up meanwhile
                await self._restart(sup, sv.to_restart(sup.spec.strategy, sup.children, name), exited=name)

    async def _sleep(self, seconds: float) -> None:
        """Wait on the supervisor's clock (a fake one in tests)."""
        done = asyncio.get_running_loop().create_future()
        timer = self.clock.call_after(seconds, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            timer.cancel()

    async def _restart(self, sup: Sup, names: list[str], exited: str) -> None:
        """Terminate `names` (but the exited one) in reverse order, then start them in order."""
        for name in reversed(names):
            if name != exited:
                await self._stop_member(name, "restart of a sibling")
        for name in names:
            child = self.children.get(name)
            if child is not None:
                child.restarts += 1
                child.status = ChildStatus.PENDING
                err = await self._start_child(child, prefer=child.node)
                if err is not None and self._crashed_on_start(child, err):  # one more crash
                    self._spawn(self._child_exited(child, sv.CRASH, child.incarnation))
            elif name in self.sups:
                await self._start_sup(self.sups[name])

    async def _stop_member(self, name: str, reason: str, final: str = ChildStatus.STOPPED) -> None:
        """Terminate a child, or a whole sub-tree, without forgetting state; its status
        ends as `final` (ChildStatus.FAILED when its supervisor gave up)."""
        child = self.children.get(name)
        if child is not None:
            if child.status in (ChildStatus.RUNNING, ChildStatus.STARTING) and child.node is not None:
                child.status = ChildStatus.STOPPING
                self.table.set(name, None, child.incarnation)
                self._schedule_registry()
                await self._terminate_instance(child.node, name, child.incarnation, reason)
            child.status = final
            return
        sup = self.sups[name]
        for member in reversed(sup.children):
            await self._stop_member(member, reason, final)

    async def _start_sup(self, sup: Sup) -> None:
        sup.failed, sup.history = False, ()
        for name in sup.children:
            if name in self.sups:
                await self._start_sup(self.sups[name])
            else:
                child = self.children[name]
                child.restarts += 1
                child.status = ChildStatus.PENDING
                await self._start_child(child, prefer=child.node)

    async def _fail(self, sup: Sup) -> None:
        sup.failed = True
        for name in reversed(sup.children):
            await self._stop_member(name, f"supervisor {sup.spec.name} gave up", ChildStatus.FAILED)

    async def _escalate(self, sup: Sup, chain: tuple[str, ...] = ()) -> None:
        chain = chain + (sup.spec.name,)
        if sup.parent is None:
            self._tree_failed(" then ".join(repr(n) for n in chain) + " gave up (more restarts than their "
                              "intensity allows): nothing in the tree runs or is restarted until the "
                              "supervisor role restarts")
            return
        parent = self.sups[sup.parent]
        async with parent.lock:
            allowed, parent.history = sv.allow_restart(parent.history, self.clock.now(), parent.spec.intensity, parent.spec.period_s)
            if not allowed:
                await self._fail(parent)
            else:
                await self._restart(parent, sv.to_restart(parent.spec.strategy, parent.children, sup.spec.name),
                                    exited=sup.spec.name)
        if parent.failed:
            await self._escalate(parent, chain)

    def _tree_failed(self, why: str) -> None:
        """The root gave up (or the tree could not start): refuse spawns, restart nothing,
        and have every node answer callers of the stopped agents with SupervisorDown."""
        self.tree_failed, self.failure = True, f"supervisor {why}"
        log.critical("supervisor: the tree failed: %s", self.failure)
        for child in self.children.values():
            if child.status != ChildStatus.STOPPED:
                child.status = ChildStatus.FAILED
            if child.status == ChildStatus.FAILED and self.table.lookup(child.spec.name) is not None:
                self.table.set(child.spec.name, None, max(child.incarnation, 0))
        self.table.fail(self.failure)
        self._schedule_registry()
        self.node.notify(f"tree-failed {self.failure}")

    async def stop_tree(self, timeout_s: float) -> None:
        """The whole mesh stops in order: terminate every agent in reverse start order,
        supervisor by supervisor (a dynamic supervisor's children together), as OTP stops
        a tree; nothing is restarted meanwhile. Their state stays; the next boot starts
        them again."""
        self.stopping = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._stop_tree_sup(self.sups["root"])
        except TimeoutError:
            log.warning("supervisor: the tree did not stop in order within %gs", timeout_s)

    async def _stop_tree_sup(self, sup: Sup) -> None:
        for name in reversed(sup.children):
            if name in self.sups and self.sups[name].spec.dynamic:
                await asyncio.gather(*(self._stop_member(n, "shutdown") for n in list(self.sups[name].children)))
            elif name in self.sups:
                await self._stop_tree_sup(self.sups[name])
            else:
                await self._stop_member(name, "shutdown")

    # --- nodes --------------------------------------------------------------------------------------

    def _on_hello(self, msg: wire.Msg, origin: Origin) -> None:
        body = msg.body
        name = body["node"]
        view = self.nodes.get(name)
        if view is None:
            raise BadRequest(f"no node named {name!r} in the config")
        restarted = view.boot is not None and view.boot != body["boot"]
        drops = body.get("drops", 0)
        # a drop counts once: hellos retried while this supervisor was away repeat it
        dropped = view.boot == body["boot"] and drops > view.drops
        view.boot, view.pid, view.last_heard, view.drops = body["boot"], body["pid"], self.clock.now(), drops
        was_alive, view.alive = view.alive, True
        full_before, view.store_full = view.store_full, bool(body.get("store_full"))
        if not self.ready:
            self._inventories[name] = body["agents"]  # a lease only with an inventory (see _learn_view)
        self.node.respond(origin, msg.id, {"epoch": self.table.epoch})  # grants a lease, too
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
        self._send_snapshot(name)
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
            view.health = {"agents": body.get("agents", 0), "mailbox": body.get("mailbox", 0)}
            self._note_store_full(view, bool(body.get("store_full")))
            short = view.health["agents"] < self.table.running[view.name]
            view.short_renewals = view.short_renewals + 1 if short else 0
            if view.short_renewals >= 2 and self.ready:  # not a start that crossed the renewal
                self._audit_soon(view)
        self.node.respond(origin, msg.id, {"known": known})

    def _audit_soon(self, view: NodeView) -> None:
        """A node hosts fewer agents than this supervisor counts there: some exit never
        reached it (sent while it was down or restarting). Ask the node, at most once a
        liveness window."""
        now = self.clock.now()
        if now - view.audited_at < self.config.timing.dead_after_s:
            return
        view.audited_at = now
        self._spawn(self._audit(view.name))

    async def _audit(self, node: str) -> None:
        """Move every agent this supervisor believes runs on `node` but that is not there
        (and that did not change while the node was asked)."""
        before = {c.spec.name: c.incarnation for c in self.children.values() if c.node == node and c.status == ChildStatus.RUNNING}
        try:
            body = await self.node.caller.request(node, Kind.INVENTORY, None, None, self.config.timing.call_timeout_s)
        except CallError as err:
            log.debug("supervisor: audit of %s: %s", node, err)
            return
        there = {item[0]: item[2] for item in body.get("agents") or () if item[3] in ("running", "starting")}
        for name, inc in before.items():
            child = self.children.get(name)
            if (child is not None and child.node == node and child.status == ChildStatus.RUNNING and child.incarnation == inc
                    and there.get(name, -1) < inc):
                log.warning("supervisor: %s (incarnation %d) is not on %s any more: starting it again",
                            child.spec.name, child.incarnation, node)
                self._spawn(self._move(child, prefer=node))

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
                log.warning("supervisor: node %s silent for %.2fs: declared dead", view.name, now - view.last_heard)
                view.alive = False
                self._node_lost(view.name, avoid=view.name)
        self._arm_liveness()

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
        for child in self.children.values():
            if child.node == name and child.status in (ChildStatus.RUNNING, ChildStatus.STARTING):
                self._spawn(self._move(child, prefer=prefer, avoid=avoid))

    async def _move(self, child: Child, prefer: str | None = None, avoid: str | None = None) -> None:
        if child.busy:
            # A start is under way: its answer decides, and a failed one is tried again.
            # Marking it pending now would disown an incarnation that may be running.
            return
        log.info("supervisor: moving %s (incarnation %d, %s on %s)", child.spec.name, child.incarnation,
                 child.status, child.node)
        child.status = ChildStatus.PENDING
        child.restarts += 1
        self.table.set(child.spec.name, None, child.incarnation)
        self._schedule_registry()
        if not self.sups[child.parent].failed and not self.tree_failed:
            await self._start_or_crash(child, prefer=prefer, avoid=avoid)

    # --- registry ---------------------------------------------------------------------------------

    def _schedule_registry(self) -> None:
        if not self._registry_scheduled:
            self._registry_scheduled = True
            asyncio.get_running_loop().call_soon(self._push_registry)

    def _push_registry(self) -> None:
        self._registry_scheduled = False
        if not self.ready:
            return
        body = self.table.take_updates()
        if body is None:
            return
        frame = wire.encode(Kind.REGISTRY, None, None, "supervisor", None, body)
        for view in self.nodes.values():
            if view.alive:
                self._send(view.name, frame)

    def _send_snapshot(self, node: str) -> None:
        self._push_registry()
        for body in self.table.snapshot():
            self._send(node, wire.encode(Kind.REGISTRY, None, None, "supervisor", None, body))

    def _send(self, node: str, frame: bytes) -> None:
        try:
            self.node.send(node, frame)
        except CallError as err:
            log.warning("supervisor: cannot reach %s: %s", node, err)

    # --- requests from clients ---------------------------------------------------------------------

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
        spec = ChildSpec(name, kind, body.get("args") or {}, body.get("restart") or "permanent")
        child = Child(spec, parent, dynamic=True, born=self._new_incarnation(), spawn_rid=msg.id)
        self.children[name] = child
        sup.children.append(name)
        self._spawn(self._spawn_child(child, msg.id))

    def _spawn_again(self, child: Child, body: dict, parent: str, rid: str) -> None:
        """A repeat of the spawn that made `child` that the control replies no longer know
        (the supervisor restarted since): it gets where the child runs; a reused id is
        refused."""
        spec = child.spec
        if (body["kind"], body.get("args") or {}, body.get("restart") or "permanent", parent) != (
                spec.kind, spec.args, spec.restart, child.parent):
            raise BadRequest(f"request id {rid!r} was used before for a different request: "
                             f"a request id names one request (use a new id for a new one)")
        if child.status == ChildStatus.RUNNING and child.node is not None:
            self.control.answer(rid, _placed(child))
        else:
            raise Unavailable(f"{child.spec.name!r} was spawned and is (re)starting now")

    async def _spawn_child(self, child: Child, rid: str) -> None:
        spec = child.spec
        forgetting = self._forgetting.get(spec.name)
        if forgetting is not None:  # an earlier agent of this name exited for good: its state goes first
            await asyncio.shield(forgetting)
        key = _DYNAMIC_PREFIX + spec.name
        record = {"name": spec.name, "kind": spec.kind, "args": spec.args, "restart": spec.restart, "parent": child.parent,
                  "born": child.born, "rid": rid}
        # Its own start follows the commit: nothing else (a placement pass, a node's hello)
        # may start it meanwhile, or this start would find one under way, call itself
        # failed and forget a child whose incarnation runs on (issue 21).
        child.busy = True
        try:
            outcome = await self.node.commits.commit_meta({key: msgpack.packb(record)})
        finally:
            child.busy = False
        err: CallError | None = Unavailable(str(outcome.error)) if outcome.error else None
        if err is None:
            err = await self._start_child(child)
        if err is None and child.status != ChildStatus.RUNNING:
            err = Unavailable(f"no live node may run {spec.name!r} now")
        if err is not None:
            self._forget_dynamic(child)
            self.table.remove(spec.name)
            self._schedule_registry()
            self.control.fail(rid, err)
            return
        self.control.answer(rid, _placed(child))

    def _forget_dynamic(self, child: Child) -> None:
        if self.children.get(child.spec.name) is child:
            self._set_replicas(child, ())
            del self.children[child.spec.name]
            sup = self.sups[child.parent]
            if child.spec.name in sup.children:
                sup.children.remove(child.spec.name)
        self._spawn(self.node.commits.commit_meta({}, [_DYNAMIC_PREFIX + child.spec.name, _PLACE_PREFIX + child.spec.name]))

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
        child = self.children.get(name)
        if child is None:
            child = self._unstopped.get(name)  # a stop answered "not confirmed": this is its repeat
            if child is None:
                raise NoSuchAgent(f"no agent named {name!r}")
            if name in self._forgetting:
                raise Unavailable(f"the stop of {name!r} is under way")
        elif not child.dynamic:
            raise NotAllowed(f"{name!r} is a static agent of the config's tree; remove it from the config instead")
        else:
            self._forget_dynamic(child)
            self.table.remove(name)
            self._schedule_registry()
            child.status = ChildStatus.STOPPED
        done = asyncio.get_running_loop().create_future()
        self._forgetting[name] = done  # a spawn of the name waits until its state is gone

        async def stop() -> None:
            try:
                await self._stop_child(child, msg.id)
            finally:
                if self._forgetting.get(name) is done:
                    del self._forgetting[name]
                done.set_result(None)
        self._spawn(stop())

    async def _stop_child(self, child: Child, rid: str) -> None:
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
            answer = await self.node.caller.request(node, Kind.TERMINATE, name, body, self.config.timing.call_timeout_s)
        except CallError as err:
            log.warning("supervisor: stopping %s on %s: %s", name, node, err)
            # the name stays reserved for the stop's repeat: until a stop is confirmed, a
            # spawn of it is refused (its state may still be in the store)
            self._unstopped[name] = child
            self.control.fail(rid, Unavailable(
                f"the stop of {name!r} is not confirmed: node {node} did not carry it out ({err}); "
                f"stop it again when the node is back"))
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
        self._spawn(self._status(origin, msg.id))

    async def _status(self, origin: Origin, rid: str) -> None:
        async def inventory(name: str):
            try:
                return await self.node.caller.request(name, Kind.INVENTORY, None, None, self.config.timing.dead_after_s)
            except CallError:
                return None
        live = [v.name for v in self.nodes.values() if v.alive]
        answers = dict(zip(live, await asyncio.gather(*(inventory(n) for n in live))))
        mailbox: dict[str, int] = {}
        nodes = []
        for name, view in self.nodes.items():
            inv = answers.get(name)
            spec = self.config.nodes[name]
            for item in (inv or {}).get("agents", ()):
                mailbox[item[0]] = item[4]
            nodes.append({"name": name, "host": spec.host, "address": f"{spec.address}:{spec.port}",
                          "alive": view.alive and inv is not None, "pid": view.pid,
                          "agents": len(inv["agents"]) if inv else 0,
                          "supervisor": name == self.node.name, "store_full": view.store_full,
                          "stats": (inv or {}).get("stats", {})})
        now = self.clock.now()
        agents = [{"name": n, "kind": c.spec.kind, "node": c.node if c.status == ChildStatus.RUNNING else None,
                   "status": c.status, "incarnation": c.incarnation, "restarts": c.restarts,
                   "mailbox": mailbox.get(n, 0), "supervisor": c.parent,
                   **({"restart_in_s": round(max(0.0, c.restart_at - now), 3), "streak": c.streak}
                      if c.status == ChildStatus.BACKOFF else {})}
                  for n, c in sorted(self.children.items())]
        self.node.respond(origin, rid, {"nodes": nodes, "agents": agents, "ready": self.ready,
                                        "failed": self.tree_failed, "failure": self.failure, "epoch": self.epoch})

    # --- plumbing ---------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        self.node._spawn(coro)


def _placed(child: Child) -> dict:
    return {"name": child.spec.name, "node": child.node, "incarnation": child.incarnation}
