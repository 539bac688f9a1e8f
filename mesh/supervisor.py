"""The supervisor role: owns the tree, places agents on nodes, restarts what fails.

It runs inside one node (the config's `supervisor.node`) and talks to every node with
the same messages a client would use: START and TERMINATE agents, HEARTBEAT nodes, ask
their INVENTORY, and push REGISTRY updates. The decisions themselves (restart or not,
which siblings, too many restarts?) are the pure functions of `mesh.supervision`, and
where to run is `mesh.placement`'s.

  * A child that exits (EXIT from its node) is restarted per its restart type, its
    supervisor's strategy and restart intensity; too many restarts fail the supervisor,
    whose parent then decides (escalation, up to the root).
  * A node that dies (its launcher restarts it and it says HELLO with a new boot, or it
    stays silent for heartbeat x liveness) loses its agents: they are moved, with their
    state, to live nodes; that counts against nobody's intensity.
  * On its own start it first learns what runs where (every node's INVENTORY, or its
    silence) and moves nothing before it has that view; then it adopts what runs,
    starts what is missing and stops what it does not know.

The role is one class made of parts, each in a module of its own and sharing the
records of tree.py: boot and the registry here, starts and placement
(supervisor_starts), exits and strategies (supervisor_exits), the view of the nodes
(supervisor_nodes), and clients' spawns, stops and status (supervisor_requests).

Incarnations are `epoch * 10**9 + n`: the epoch grows each time a supervisor starts (kept
with its records, `mesh.records`; with etcd it is the leader's term), so a restarted or
newly elected supervisor never reuses a number.
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
from .errors import CallError, CallTimeout
from .control import ControlReplies
from .node import Node
from .registry import Table
from .supervision import ChildSpec
from .supervisor_drains import Drains
from .supervisor_exits import Exits
from .supervisor_nodes import Membership
from .supervisor_requests import Requests
from .supervisor_starts import Starts
from .records import LocalRecords
from .admission import Slots, SpawnQueue
from .tree import DYNAMIC_PREFIX, PLACE_PREFIX, START_CONCURRENCY, Child, ChildStatus, NodeView, Sup
from .wire import Kind

log = logging.getLogger("mesh.supervisor")



class SupervisorRole(Starts, Exits, Membership, Requests, Drains):
    def __init__(self, node: Node, records=None, control=None):
        self.node, self.config, self.clock = node, node.config, node.clock
        self.records = records if records is not None else LocalRecords(node)  # or EtcdRecords (G8)
        self.plane = control  # the node's ControlPlane when leadership comes from etcd
        self.command_meta: dict | None = None  # carried by every command: the term, with [control]
        if control is not None:
            control.on_node_gone = self._on_node_gone
        self.control = ControlReplies(node, node.clock)  # spawns and stops, by request id
        self.epoch = 0
        self._next = 0
        # one epoch per supervisor, not per node process: a node elected again starts its
        # table's sequence over, and replicas must not take that for stale (registry.py)
        self.table = Table(f"{node.boot}.{os.urandom(4).hex()}")
        self.started_at = self.clock.now()
        # silence is counted from now: leases granted by an earlier supervisor lapse first
        self.nodes = {n: NodeView(n, last_heard=self.started_at) for n in self.config.nodes}
        me = self.nodes[node.name]
        me.boot, me.pid, me.alive = node.boot, os.getpid(), True
        self.children: dict[str, Child] = {}
        self.pending: dict[str, Child] = {}  # children that may wait for a start (see Child.pending_index)
        self.later: list[tuple[float, int, str, Child]] = []  # (next try, n, name, child): pending, in backoff
        self._later_seq = 0
        self.on_node: dict[str, dict[str, Child]] = {}  # node -> its children by name (see Child.node_index)
        self.by_status: Counter = Counter()  # children by status (see Child.status_counts) ...
        self.by_kind: Counter = Counter()    # ... and by kind
        self.groups: dict[str, dict[str, None]] = {}  # group -> its members' names, in spawn order
        self.sups: dict[str, Sup] = {}
        self.ready = False
        self.ready_event = asyncio.Event()
        self._inventories: dict[str, list] = {}  # what nodes said runs on them, before ready
        self._early_exits: list[wire.Msg] = []
        self._start_slots = Slots(START_CONCURRENCY)
        self.spawns = SpawnQueue(self.clock, START_CONCURRENCY)  # refuses a burst early (admission.py)
        self.placing: Counter = Counter()      # node -> starts under way there
        self.exit_counts: Counter = Counter()  # how -> agents' exits handled (metrics)
        self.replica_use: Counter = Counter()  # host -> children it holds copies for
        self._registry_scheduled = False
        self._snapshots_under_way: set[str] = set()  # nodes a snapshot is being sent to
        self.tree_failed = False
        self.booting = False   # the tree is being started in order (see _boot)
        self.stopping = False  # the whole mesh stops in order (see stop_tree)
        self.failure: str | None = None  # why the tree failed: names the supervisors that gave up
        self._forgetting: dict[str, asyncio.Future] = {}  # name -> done once its state is deleted
        self._unstopped: dict[str, "Child"] = {}  # stopped names whose node could not carry the stop out
        self._leaving: set[str] = set()  # names being moved off a host whose disk is full, or a drained node
        self.draining: set[str] = set()  # nodes that take no placements (mesh drain), in memory only
        node.add_role(self, {Kind.SPAWN: self._on_spawn, Kind.STOP: self._on_stop, Kind.STATUS: self._on_status,
                             Kind.HELLO: self._on_hello, Kind.HEARTBEAT: self._on_renew, Kind.EXIT: self._on_exit,
                             Kind.GOODBYE: self._on_goodbye, Kind.DRAIN: self._on_drain})

    # --- boot ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.records.load()
        self.epoch = await self.records.begin_epoch()
        if self.plane is not None:
            self.command_meta = {"term": self.epoch}
        self._build_tree()
        for key, raw in self.records.items(DYNAMIC_PREFIX):
            try:
                d = msgpack.unpackb(raw, raw=False)
                spec = ChildSpec(d["name"], d["kind"], d.get("args") or {}, d.get("restart", "permanent"),
                                 group=d.get("group") or "")
                parent = d.get("parent", self.config.dynamic_supervisor)
                born = int(d.get("born", 0))
                rid = d.get("rid")
            except Exception as exc:
                log.error("supervisor: skipping unreadable dynamic child %s: %s", key, exc)
                continue
            if parent not in self.sups or spec.name in self.children:
                log.error("supervisor: dynamic child %s names unknown supervisor %s", spec.name, parent)
                continue
            self._add_child(Child(spec, parent, dynamic=True, born=born, spawn_rid=rid))
            self.sups[parent].children[spec.name] = None
        for key, raw in self.records.items(PLACE_PREFIX):
            child = self.children.get(key[len(PLACE_PREFIX):])
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

    def command(self, node: str, kind: Kind, target: str | None, body, timeout: float):
        """A request to a node that only the supervisor sends: it carries the term."""
        return self.node.caller.request(node, kind, target, body, timeout, meta=self.command_meta)

    def _build_tree(self) -> None:
        tree, agents = self.config.tree, self.config.agents

        def add(name: str, parent: str | None) -> None:
            spec = tree[name]
            self.sups[name] = Sup(spec, parent, dict.fromkeys(spec.children))
            for child in spec.children:
                if child in tree:
                    add(child, name)
                else:
                    self._add_child(Child(agents[child], name))
        add("root", None)

    def _add_child(self, child: Child) -> None:
        """Take `child` into the records; a pending one is placed by the next pass."""
        child.pending_index = self.pending
        child.node_index = self.on_node
        if child.node is not None:
            self.on_node.setdefault(child.node, {})[child.spec.name] = child
        child.status_counts = self.by_status
        self.by_status[child.status] += 1
        self.by_kind[child.spec.kind] += 1
        self.children[child.spec.name] = child
        if child.spec.group:
            self.groups.setdefault(child.spec.group, {})[child.spec.name] = None
        if child.status == ChildStatus.PENDING:
            self.pending[child.spec.name] = child

    async def _learn_view(self) -> None:
        """Ask every node what runs on it; give up on those silent past the liveness window.

        A node is granted a lease only once its inventory is known (an INVENTORY answer or
        a HELLO, which carries one), so a node this supervisor has not heard from is a node
        without a lease: by the time the window ends, it serves nothing any more. With
        [control] a node holds its lease in etcd: one without a key there serves nothing
        now, and one silent past the window while its key lives is evicted (its lease
        revoked) and counted out once its own count of the lease has surely run out."""
        deadline = self.started_at + self.config.timing.dead_after_s
        inventories = self._inventories
        control = self.plane

        async def ask(name: str) -> None:
            backoff = Backoff(self.clock)
            while (self.clock.now() < deadline and name not in inventories
                   and (control is None or name in control.live)):
                try:
                    body = await self.command(name, Kind.INVENTORY, None, None,
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
        if control is not None:
            silent = [n for n in control.live if n not in inventories]
            if silent:
                log.warning("supervisor: nodes %s hold leases but do not answer: evicting them", ", ".join(silent))
                await asyncio.gather(*(control.evict(n) for n in silent))
                await asyncio.sleep(control.settings.lease_s)  # what they may still serve under
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
                name, inc, status = item[0], item[2], item[3]
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
        frame = wire.encode(Kind.REGISTRY, None, None, "supervisor", None, body, self.command_meta)
        for view in self.nodes.values():
            if view.alive:
                self._send(view.name, frame)

    def _send_snapshot(self, node: str) -> None:
        """The whole table to `node`: its first chunk now, the others one a loop turn (a
        million names built and encoded at once held the loop past the nodes' leases),
        and one snapshot at a time per node (one asked for while another is on its way
        is that one: the replica asks again, with what it then holds, if it needs to)."""
        self._push_registry()
        if node in self._snapshots_under_way:
            return
        chunks, epoch, seq = self.table.snapshot(), self.table.epoch, self.table.seq
        self._send(node, wire.encode(Kind.REGISTRY, None, None, "supervisor", None, next(chunks), self.command_meta))
        self._snapshots_under_way.add(node)
        self._spawn(self._send_chunks(node, chunks, epoch, seq))

    async def _send_chunks(self, node: str, chunks, epoch: str, seq: int) -> None:
        """The rest of a snapshot at `seq`, then the changes made while it was sent: the
        replica refused the updates that came between its chunks."""
        try:
            for body in chunks:
                await asyncio.sleep(0)
                self._send(node, wire.encode(Kind.REGISTRY, None, None, "supervisor", None, body, self.command_meta))
            await asyncio.sleep(0)
            self._push_registry()
            since = self.table.catch_up(epoch, seq)
            if since is not None and since["seq"] > seq:
                self._send(node, wire.encode(Kind.REGISTRY, None, None, "supervisor", None, since, self.command_meta))
        finally:
            self._snapshots_under_way.discard(node)

    def _send_registry(self, node: str, epoch: str, seq: int) -> None:
        """Bring a replica that holds the table at (epoch, seq) up to date: the changes
        since, when they are still kept, else the whole table."""
        self._push_registry()
        body = self.table.catch_up(epoch, seq)
        if body is None:
            self._send_snapshot(node)
        else:
            self._send(node, wire.encode(Kind.REGISTRY, None, None, "supervisor", None, body, self.command_meta))

    def _send(self, node: str, frame: bytes) -> None:
        try:
            self.node.send(node, frame)
        except CallError as err:
            log.warning("supervisor: cannot reach %s: %s", node, err)

    # --- plumbing ---------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        self.node._spawn(coro)
