"""A node: one OS process, one asyncio loop, one bound ROUTER, many agents.

The node is the shell that owns the sockets, the store, the runners and the lease, and
hands each concern to the part made for it:

    intake.py        frames read, decoded and served per peer, fairly; limits and roles
    runner.py        one incarnation of an agent: its mailbox, handlers, reply window
    commits.py       one commit group per loop turn; replies leave after it (G1)
    replication.py   copies on the replica hosts before replies leave (G6); FETCH
    incarnations.py  START and TERMINATE: an incarnation's first and last moments
    upgrade.py       the code each kind runs here, and UPGRADE: new code for running agents
    names.py         the registry replica, WHEREIS, waiting for a name to be placed

What stays here: the lease (a node serves only while the supervisor renews it, G3), the
hellos, sending and answering, messages to agents, timers, and an orderly shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any, Callable

from . import wire
from .caller import Caller
from .clock import Clock
from .commits import Commits
from .config import Config, NodeSpec
from .errors import AgentDown, CallError, Moved, NoSuchAgent, ProtocolError, Unavailable, error_to_wire
from .incarnations import Incarnations
from .intake import Intake
from .introspect import on_inspect, on_inventory
from .tracing import on_trace
from .controlplane import ControlPlane
from .lease import Lease
from .names import Names, NodeResolver
from .replication import Replication
from .restarts import on_restart
from .runner import AgentStatus, Envelope, Runner
from .served import ServedLog
from .store import Committer, Store
from .upgrade import Upgrades
from .wire import Kind

log = logging.getLogger("mesh.node")

MAX_RENEWALS = 3  # lease renewals in flight at once

Origin = bytes | None  # a ROUTER routing id, or None for a request from this very node


class Node:
    def __init__(self, config: Config, name: str, network, clock: Clock | None = None,
                 store: Store | None = None, inline_commit: bool = False, boot: str | None = None,
                 previous: dict | None = None, notify: Callable[[str], None] | None = None):
        self.config, self.name = config, name
        self.spec: NodeSpec = config.nodes[name]
        self.timing, self.limits = config.timing, config.limits
        self.network = network
        self.clock = clock or Clock()
        self.boot = boot or os.urandom(6).hex()
        self.previous = previous
        self.notify = notify or (lambda line: None)
        self._own_store = store is None
        self.store = store or Store(os.path.join(config.host_dir(self.spec.host), "store"),
                                    config.store.map_size_mb, config.store.sync)
        self.committer = Committer(self.store, inline=inline_commit)
        self.runners: dict[str, Runner] = {}
        self.busy_runners: set[Runner] = set()
        self.names = Names(self)
        self.intake = Intake(self)
        self.commits = Commits(self)
        self.replication = Replication(self)
        self.incarnations = Incarnations(self)
        self.upgrades = Upgrades(self)
        self.stats: Counter = Counter()
        self.links: dict[str, Any] = {}
        self.link_up: dict[str, bool] = {}
        self.caller = Caller(self.clock, f"node:{name}", self.send, NodeResolver(self.names), config.limits.max_message_bytes,
                             link_down=lambda n: self.link_up.get(n) is False, reconnect=self.reconnect)
        self.handlers: dict[Kind, Callable[[wire.Msg, Origin], None]] = {
            Kind.CALL: self._to_agent, Kind.CAST: self._to_agent, Kind.INFO: self._to_agent,
            Kind.START: self.incarnations.on_start, Kind.TERMINATE: self.incarnations.on_terminate,
            Kind.WHEREIS: self.names.on_whereis, Kind.REGISTRY: self.names.on_registry,
            Kind.INVENTORY: lambda m, o: on_inventory(self, m, o), Kind.FETCH: self.replication.on_fetch,
            Kind.REPLICATE: self.replication.on_replicate,
            Kind.SPAWN: self._forward_to_supervisor, Kind.STOP: self._forward_to_supervisor,
            Kind.STATUS: self._forward_to_supervisor, Kind.UPGRADE: self.upgrades.on_upgrade,
            Kind.DRAIN: self._forward_to_supervisor, Kind.RESTART: lambda m, o: on_restart(self, m, o),
            Kind.INSPECT: lambda m, o: on_inspect(self, m, o), Kind.TRACE: lambda m, o: on_trace(self, m, o),
        }
        self.secure = config.secure
        self._unsafe = config.timing.unsafe_reply_before_commit
        self._tasks: set[asyncio.Task] = set()
        self._timers: dict[Callable, Any] = {}  # each timed function -> its next firing
        self._periodic: dict[Callable, float] = {}  # the periodic ones -> their interval
        self._paused: list[Callable] = []  # what was due while paused (see pause)
        self._hello_acked = False
        self._hellos_in_flight = 0
        self._parked_starts: list[tuple[wire.Msg, Origin]] = []  # STARTs waiting for this node's lease
        self._last_hello = -1e9
        # with [control] the lease is this node's own, in etcd (controlplane.py); else the supervisor's
        self.control = ControlPlane(self, config.control) if config.control is not None else None
        self.lease = self.control.lease if self.control is not None else Lease(self.clock, config.timing.lease_s)
        self.on_elected: Callable[[Any], None] | None = None  # hosts the supervisor role once elected (serve.py)
        self.on_restart: Callable[[], None] | None = None  # stops to start again as a new process (serve.py)
        if self.control is not None:
            for kind in (Kind.START, Kind.TERMINATE, Kind.INVENTORY, Kind.REGISTRY):
                self.handlers[kind] = self._fenced(self.handlers[kind])
            for kind in (Kind.HELLO, Kind.HEARTBEAT, Kind.EXIT, Kind.GOODBYE):  # until elected (add_role)
                self.handlers[kind] = self._to_the_leader
        self._renewing = 0
        self._renewals = 0
        self._drops = 0  # times this boot dropped its agents when its lease lapsed (said in hellos)
        self.stopping = False
        self.stopped = asyncio.Event()
        self.listener = None
        self.supervisor = None  # the supervisor role, when this node hosts it (see add_role)
        self._llm, self.metrics = None, None  # the model client; what metrics add (metrics.Recorder)
        self._served = ServedLog(config.host_dir(self.spec.host), name, self.clock.wall) if config.timing.served_log else None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint

    async def start(self) -> None:
        bind = self.endpoint
        self.listener = self.network.listen(bind, self.intake.on_request, self.intake.serve)
        self._every(self.timing.heartbeat_s, self._tick)
        if self.control is not None:
            self.control.start()  # a hello follows the lease
        else:
            self.say_hello()
        self.notify(f"ready {self.name} {os.getpid()} {self.boot}")
        log.info("node %s listening on %s (boot %s)", self.name, bind, self.boot)

    def _every(self, interval: float, fn: Callable[[], None]) -> None:
        self._periodic[fn] = interval

        def fire():
            if self.stopping:
                return
            try:
                fn()
            finally:
                self._timers[fn] = self.clock.call_after(interval, fire)
        self._timers[fn] = self.clock.call_after(interval, fire)

    def _once(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` once after `delay`, replacing a pending run of it; it stops with the
        node's periodic work."""
        old = self._timers.pop(fn, None)
        if old is not None:
            old.cancel()

        def fire():
            self._timers.pop(fn, None)
            if not self.stopping:
                fn()
        self._timers[fn] = self.clock.call_after(delay, fire)

    def add_role(self, role, handlers: dict[Kind, Callable[[wire.Msg, Origin], None]]) -> None:
        """Host the supervisor role and start it: the messages of `handlers`' kinds go to
        it (the node passes SPAWN, STOP and STATUS on to the supervisor's node otherwise),
        and it hears of links going up and down."""
        self.supervisor = role
        self.handlers.update(handlers)
        self._spawn(role.start())

    @property
    def supervisor_node(self) -> str:
        """Where the supervisor runs now: the elected leader with [control], else the
        config's supervisor node (also while no leader is known: a node passes requests on)."""
        if self.control is not None and self.control.leader is not None:
            return self.control.leader
        return self.config.supervisor_node

    def lead(self, records) -> None:
        """This node was elected (control plane): host the supervisor role, keeping its
        records in etcd."""
        if self.on_elected is None:
            log.error("node %s: elected, but this process cannot host the supervisor role", self.name)
            return
        self.on_elected(records)

    def leader_changed(self) -> None:
        """Another node leads now: say hello to it (it learns this node's agents, and this
        node its registry)."""
        self._hello_acked = False
        self._last_hello = -1e9
        if self.lease.valid():
            self.say_hello()

    def lease_taken(self) -> None:
        """A new lease from etcd: tell the leader (a node that dropped its agents says so)."""
        self.leader_changed()
        self._run_parked_starts()

    def _to_the_leader(self, msg: wire.Msg, origin: Origin) -> None:
        """A message for the supervisor reached a node that does not lead (the sender's view
        of the leader is behind): an EXIT goes on to the leader; a request is refused."""
        leader = self.supervisor_node
        if msg.kind == Kind.EXIT:  # passed on once (two stale views must not bounce it); audits find the rest
            if leader != self.name and not (msg.meta or {}).get("passed"):
                self.send(leader, wire.encode(msg.kind, msg.id, msg.target, msg.sender, msg.ttl_ms, msg.body,
                                              {**(msg.meta or {}), "passed": True}))
            return
        raise Unavailable(f"node {self.name} does not lead; {leader if leader != self.name else 'no node'} does "
                          "as far as it knows")

    def _fenced(self, handler: Callable[[wire.Msg, Origin], None]) -> Callable[[wire.Msg, Origin], None]:
        def fenced(msg: wire.Msg, origin: Origin) -> None:
            self.control.check_term(msg)
            handler(msg, origin)
        return fenced

    def pause(self) -> None:
        """Stop the node's timed work, as SIGSTOP does (tests freeze a node so)."""
        self._paused = list(self._timers)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def resume(self) -> None:
        """SIGCONT: what fell due while paused runs at once, in the order it was armed, and
        the periodic work goes on."""
        paused, self._paused = self._paused, []
        for fn in paused:
            if self.stopping:
                return
            fn()
            if fn in self._periodic and fn not in self._timers:
                self._every(self._periodic[fn], fn)

    def abandon(self) -> None:
        """Vanish as under kill -9 (tests): no terminate, no goodbye, no commit pending
        leaves; its connections close, and nothing it began goes on."""
        self.stopping = True
        self.pause()
        for task in list(self._tasks):
            task.cancel()
        for runner in self.runners.values():
            if runner.task is not None:
                runner.task.cancel()
        if self.listener is not None:
            self.listener.close()
        for link in self.links.values():
            link.close()

    def _tick(self) -> None:
        now = self.clock.now()
        self.serving()
        if self.listener is not None:
            self.listener.check_partial()
        for runner in list(self.busy_runners):
            runner.check_deadline(now)
        if self.commits.store_full and not self.commits.probing:
            self.commits.probe_store()
        if not self._hello_acked:
            self.say_hello()
        else:
            if not self.names.synced:
                self.names.ask()  # not each tick: each hello would cost the whole table again
            if self._renewing < MAX_RENEWALS:
                self._spawn(self._renew())

    # --- the lease ---------------------------------------------------------------------------

    def serving(self) -> bool:
        """Whether this node may serve its agents now. A lapsed lease drops them all first.

        Without [control] the supervisor's own node holds no lease: only the supervisor
        moves agents, so nothing can have replaced its agents while its loop stood still."""
        if (self.supervisor is not None and self.control is None) or self.lease.valid():
            return True
        if self.runners:
            self._lease_lapsed()
        return False

    def _lease_lapsed(self) -> None:
        log.warning("node %s: lease lapsed (no word from %s): dropping %d agents",
                    self.name, "etcd" if self.control is not None else "the supervisor", len(self.runners))
        self.stats["lease_lapses"] += 1
        for runner in list(self.runners.values()):
            self.incarnations.drop(runner, lambda: AgentDown("its node lost its lease"))
        self._drops += 1
        self._hello_acked = False

    def renew_soon(self) -> None:
        """A renewal now, if one may go (the supervisor should hear a change at once)."""
        if self._hello_acked and self._renewing < MAX_RENEWALS and not self.stopping:
            self._spawn(self._renew())

    async def _renew(self) -> None:
        """Ask the supervisor to extend the lease; it runs from this send time. Renewals
        overlap, so one slow answer does not hold the next back."""
        self._renewing += 1
        sent_at = self.clock.now()
        self._renewals += 1
        # O(1) in the agents hosted: a renewal goes every heartbeat (the deepest mailbox,
        # which it once carried, took a walk over every runner and was read by nobody)
        body = {"node": self.name, "boot": self.boot, "seq": self._renewals, "agents": len(self.runners)}
        if self.commits.store_full:
            body["store_full"] = True
        try:
            answer = await self.caller.request(self.supervisor_node, Kind.HEARTBEAT, None, body,
                                               self.timing.lease_s)
        except CallError as err:
            log.debug("node %s: lease renewal: %s", self.name, err)
            return
        finally:
            self._renewing -= 1
        if answer.get("known"):
            if self.control is None:
                self.lease.granted(sent_at)
        else:  # the supervisor does not know this boot (it restarted, or declared us dead)
            self._hello_acked = False
            self.say_hello()

    async def shutdown(self, reason: str = "shutdown", whole_mesh: bool = False) -> None:
        """Stop in order: finish or cancel handlers, terminate agents, commit, say goodbye.
        `whole_mesh`: every node stops (a leader keeps its term to the end)."""
        if self.stopping:
            return
        self.stopping = True
        for t in self._timers.values():
            t.cancel()
        for runner in list(self.runners.values()):
            runner.interrupt()
        await asyncio.sleep(0)
        for runner in list(self.runners.values()):
            if runner.status == AgentStatus.RUNNING and runner.agent is not None:
                await self.incarnations.terminate_agent(runner, reason)
                self.commits.mark_dirty(runner)
            runner.hold()
            runner.fail_queued(lambda: AgentDown("its node is shutting down"))
        await self.commits.drain()
        if self._llm is not None:
            await self._llm.aclose()
        if self.control is not None:
            await self.control.stop(resign=not whole_mesh)
        if self.name != self.supervisor_node:
            try:
                await self.caller.request(self.supervisor_node, Kind.GOODBYE, None,
                                          {"node": self.name, "boot": self.boot}, 1.0)
            except CallError:
                pass
        for task in list(self._tasks):
            task.cancel()
        self.committer.close()
        if self.listener is not None:
            self.listener.close()
        for link in self.links.values():
            link.close()
        if self._own_store:
            self.store.close()
        self.stopped.set()

    def llm_client(self):
        """One model client per node process and loop, made on first use."""
        if self._llm is None:
            from .llm import LLMClient  # httpx is imported only by nodes that use a model
            self._llm = LLMClient(self.config.llm, self.clock)
        return self._llm

    # --- the wire ----------------------------------------------------------------------------

    def send(self, node: str, frame: bytes, ttl: float | None = None) -> None:
        """Send a request to a node (this one included) over its link; with `ttl`, it is
        dropped unsent if the link is still down when that runs out."""
        if node == self.name:
            asyncio.get_running_loop().call_soon(self._on_local, frame)
            return
        self._link(node).send(frame, ttl)

    def _link(self, node: str):
        link = self.links.get(node)
        if link is None:
            spec = self.config.nodes.get(node)
            if spec is None:
                raise Unavailable(f"no node named {node!r}")
            link = self.network.link(spec.endpoint, self.caller.on_response,
                                     lambda up, n=node: self._on_link_state(n, up), owner=self.endpoint)
            self.links[node] = link
        return link

    def reconnect(self, node: str) -> None:
        """Start the connection to `node` afresh (it came back: no reconnect backoff). What
        waited on the old connection goes on the new one: calls that queued there meanwhile
        (another call may have reconnected just before) must not be lost."""
        link = self.links.pop(node, None)
        self.link_up.pop(node, None)
        if link is not None:
            held = link.take_held()
            link.close()
            self.caller.link_replaced(node)
            if held:
                self._link(node).hold(held)

    def _on_link_state(self, node: str, up: bool | None) -> None:
        self.link_up[node] = bool(up)
        self.caller.on_link_state(node, up)
        if self.supervisor is not None:
            self.supervisor.on_link_state(node, up)

    def _on_local(self, frame: bytes) -> None:
        """A request from this very node: handled at once (it waited its turn in the loop)."""
        try:
            msg = wire.decode(frame, self.limits.max_message_bytes)
        except ProtocolError as exc:
            self.intake.dispatch(exc, None, None)
            return
        self.commits.schedule_flush()
        if msg.kind == Kind.BATCH:
            for item in msg.body:
                self.intake.dispatch(item, None, None)
        else:
            self.intake.dispatch(msg, None, None)

    def _respond(self, origin: Origin, frame: bytes, counted: bool = True) -> None:
        """Send a response; `counted` ones answer a request the peer's limits admitted."""
        if origin is None:
            asyncio.get_running_loop().call_soon(self.caller.on_response, frame)
        else:
            if counted:
                self.intake.answered(origin)
            self.listener.send(origin, frame)

    def respond(self, origin: Origin, rid: str, body: Any) -> None:
        self._respond(origin, wire.reply(rid, body))

    def respond_error(self, origin: Origin, rid: str | None, err: CallError) -> None:
        self._respond(origin, wire.error(rid, error_to_wire(err)))

    def peer(self, origin: Origin) -> str | None:
        """The authenticated identity behind `origin`, as agents see it in ctx.sender:
        "role:name" in a secure cluster, this node for its own agents, else None (without
        CURVE nothing is authenticated)."""
        if origin is None:
            return f"node:{self.name}"
        return self.listener.identity(origin) if self.secure else None

    # --- messages to agents -----------------------------------------------------------------

    def _deadline(self, msg: wire.Msg) -> float:
        if msg.kind != Kind.CALL:
            return 0.0  # only calls have a caller waiting
        ttl = msg.ttl_ms / 1000 if msg.ttl_ms is not None else self.timing.call_timeout_s
        return self.clock.now() + ttl

    def _to_agent(self, msg: wire.Msg, origin: Origin) -> None:
        runner = self.runners.get(msg.target) if self.serving() else None
        if runner is not None:
            inc = msg.meta.get("inc") if msg.meta else None
            if type(inc) is not int and msg.kind == Kind.CALL:
                # a call must name the incarnation it is for: one that names none may be a
                # late copy from an earlier life of the name. It is told which runs here,
                # and sent again naming it (a round trip, once per caller and name).
                self.stats["calls_unnamed"] += 1
                raise Moved(f"{msg.target!r} runs here as incarnation {runner.incarnation}: name it",
                            {"node": self.name, "incarnation": runner.incarnation})
            if type(inc) is int and inc < runner.since:
                # sent to an earlier agent of the name (a late copy: held on a link, or sent
                # again to a restart), which was stopped: never run by the agent spawned since
                self.stats["earlier_life"] += 1
                raise NoSuchAgent(f"{msg.target!r}: the agent this call was sent to (incarnation "
                                  f"{inc}) was stopped; another of the name runs now",
                                  {"earlier_life": True, "node": self.name, "incarnation": runner.incarnation})
            runner.deliver(Envelope(msg, origin, self._deadline(msg), self.peer(origin)))
            return
        err = self.names.where_else(msg.target)
        if msg.kind == Kind.CALL:
            raise err
        if isinstance(err, Moved):
            self.forward(Envelope(msg, origin, 0.0, None))
        else:
            self.stats["casts_dropped"] += 1

    def forward(self, env: Envelope) -> None:
        """Pass a cast or info on to the node that now hosts its target, if known."""
        host = self.names.host_of(env.msg.target)
        if host is None:
            self.stats["casts_dropped"] += 1
            return
        try:
            self.send(host, wire.encode_msg(env.msg))
            self.stats["forwarded"] += 1
        except CallError:
            self.stats["casts_dropped"] += 1

    def streamer(self, env: Envelope) -> Callable[[Any], None]:
        return lambda part, rid=env.msg.id, origin=env.origin: self.chunk(origin, rid, part)

    def chunk(self, origin: Origin, rid: str, part: Any) -> None:
        """One piece of a streamed answer (a call's stream, a trace's events)."""
        self._respond(origin, wire.encode(Kind.CHUNK, rid, None, None, None, part), counted=False)

    # --- replies, effects and commit groups ---------------------------------------------------

    # --- tasks ----------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("node %s: internal task failed", self.name, exc_info=task.exception())

    # --- hellos ---------------------------------------------------------------------------------

    def say_hello(self) -> None:
        now = self.clock.now()
        if now - self._last_hello < self.timing.heartbeat_s:
            return
        self._last_hello = now
        self.names.asked_at = now  # every hello asks for the registry
        body = {"node": self.name, "boot": self.boot, "pid": os.getpid(), "agents": self._inventory()}
        if self.previous:
            body["previous"] = self.previous
        if self._drops:
            body["drops"] = self._drops
        if self.commits.store_full:
            body["store_full"] = True
        held = self.names.held()
        if held is not None:
            body["registry"] = held
        self._spawn(self._hello(body))

    async def _hello(self, body: dict) -> None:
        sent_at = self.clock.now()
        self.hello_sent()
        try:
            answer = await self.caller.request(self.supervisor_node, Kind.HELLO, None, body, self.timing.dead_after_s)
        except CallError as err:
            log.debug("hello to the supervisor: %s", err)
            return
        else:
            self._hello_acked = True
            self.names.supervisor_answered(answer)
            self.previous = None
            if self.control is None:
                self.lease.granted(sent_at)
        finally:
            self.hello_answered()

    def hello_sent(self) -> None:
        """A HELLO is on its way: until its answer comes, a START that finds no lease is
        parked (the lease may come with that answer) instead of refused."""
        self._hellos_in_flight += 1

    def hello_answered(self) -> None:
        """A HELLO's answer came (or it failed): the STARTs parked for it are handled now
        (refused if no lease came), unless another HELLO is still under way."""
        self._hellos_in_flight -= 1
        self._run_parked_starts()

    def _run_parked_starts(self) -> None:
        """Handle the STARTs that came before the lease (now granted, or refused)."""
        if self._hellos_in_flight and not self.lease.valid():
            return
        parked, self._parked_starts = self._parked_starts, []
        for msg, origin in parked:
            try:
                self.incarnations.on_start(msg, origin)
            except CallError as err:
                self.respond_error(origin, msg.id, err)

    # --- supervisor's questions -------------------------------------------------------------

    def _inventory(self) -> list:
        """What runs here, as HELLO and INVENTORY report it."""
        return [[r.name, r.kind, r.incarnation, r.status, r.depth(), r.handled, list(r.replicas), r.vsn]
                for r in self.runners.values()]

    def _forward_to_supervisor(self, msg: wire.Msg, origin: Origin) -> None:
        """Pass a client's SPAWN, STOP or STATUS on to the supervisor's node, under the
        client's own request id: a copy sent there directly, or through another node, is
        then known to be the same request and never acts twice (see control.py)."""
        async def forward():
            ttl = msg.ttl_ms / 1000 if msg.ttl_ms else self.timing.call_timeout_s
            try:
                result = await self.caller.request(self.supervisor_node, msg.kind, msg.target, msg.body, ttl,
                                                   rid=msg.id)
            except CallError as err:
                self.respond_error(origin, msg.id, err)
            else:
                self.respond(origin, msg.id, result)
        self._spawn(forward())

    async def spawn_via_supervisor(self, name: str, kind: str, args: dict, restart: str, rid: str | None,
                                   supervisor: str | None = None) -> dict:
        body = {"name": name, "kind": kind, "args": args, "restart": restart}
        if supervisor:
            body["supervisor"] = supervisor
        return await self.caller.request(self.supervisor_node, Kind.SPAWN, None, body,
                                         self.timing.call_timeout_s, rid=rid)

