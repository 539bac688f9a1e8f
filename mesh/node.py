"""A node: one OS process, one asyncio loop, one bound ROUTER, many agents.

Inbound messages arrive in batches from the listener (see transport); each is decoded
and queued per peer, and at the end of the listener's turn the queues are served
round-robin (limits.FairQueue): each message is validated (wire) and handed to its
agent's Runner, or to the control handler of its kind. A peer's messages keep their
order; one peer's flood delays another's request by at most one message per round. Everything the runners change in one loop turn goes into one commit group;
the group is committed in one LMDB transaction on the store's thread while the next
group fills, and only then do its replies and outbound casts leave (G1). One group is in
flight at a time, so commits stay in order and grow with the load (group commit).

The node also keeps a replica of the registry and answers WHEREIS (names.py), starts and
terminates agents on the supervisor's word, reports exits,
answers heartbeats, and cancels handlers that run past their deadline. Bad input is
answered with an error and counted; it never reaches an agent or stops the node (G5).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

import msgpack

from . import supervision, wire
from .agent import Agent, TimerRef
from .caller import Caller
from .clock import Clock
from .config import Config, NodeSpec
from .errors import (AgentCrashed, AgentDown, AlreadyExists, BadRequest, Busy, CallError, Moved, NoSuchAgent,
                     NotAllowed, ProtocolError, SnapshotCorrupt, StoreError, Unavailable, error_to_wire)
from .lease import Lease
from .served import ServedLog
from .limits import FairQueue, PeerLimits
from .names import Names, NodeResolver
from .security import allowed, role_of
from .runner import RUNNING, STARTING, STOPPED, Envelope, Runner, error_response
from .store import Batch, Committer, Outcome, Record, Store, decode_record, replies_from_wire, unpack_state
from .wire import Kind

log = logging.getLogger("mesh.node")

UNSAFE_COMMIT_DELAY_S = 0.05  # with unsafe_reply_before_commit: so that a crash surely loses acknowledged writes
MAX_RENEWALS = 3  # lease renewals in flight at once

Origin = bytes | None  # a ROUTER routing id, or None for a request from this very node


class Group:
    """Everything that becomes durable in one transaction, and what waits for it."""

    __slots__ = ("batch", "dirty", "replies", "effects", "callbacks", "replicas", "void")

    def __init__(self):
        self.batch = Batch()
        self.dirty: set[Runner] = set()
        self.replies: list[tuple[Runner, list, bytes]] = []
        self.effects: list[tuple[Runner, list]] = []
        self.callbacks: list[Callable[[Outcome], None]] = []
        self.replicas: dict[str, tuple[str, ...]] = {}  # name -> its replica hosts, for this batch
        self.void: set[str] = set()  # agents that crashed before this group: nothing of theirs is kept

    def __bool__(self) -> bool:
        return bool(self.batch or self.dirty or self.replies or self.effects or self.callbacks)


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
        self.stats: Counter = Counter()
        self.links: dict[str, Any] = {}
        self.link_up: dict[str, bool] = {}
        self.caller = Caller(self.clock, f"node:{name}", self.send, NodeResolver(self.names), config.limits.max_message_bytes,
                             link_down=lambda n: self.link_up.get(n) is False, reconnect=self.reconnect)
        self.handlers: dict[Kind, Callable[[wire.Msg, Origin], None]] = {
            Kind.CALL: self._to_agent, Kind.CAST: self._to_agent, Kind.INFO: self._to_agent,
            Kind.START: self._on_start, Kind.TERMINATE: self._on_terminate,
            Kind.WHEREIS: self.names.on_whereis, Kind.REGISTRY: self.names.on_registry,
            Kind.INVENTORY: self._on_inventory, Kind.FETCH: self._on_fetch,
            Kind.REPLICATE: self._on_replicate,
            Kind.SPAWN: self._forward_to_supervisor, Kind.STOP: self._forward_to_supervisor,
            Kind.STATUS: self._forward_to_supervisor,
        }
        self.secure = config.secure
        self._unsafe = config.timing.unsafe_reply_before_commit
        self.peer_limits = PeerLimits(config.limits.peer_rate, config.limits.peer_burst,
                                      config.limits.peer_open_requests,
                                      decode_share=config.limits.peer_decode_share,
                                      decode_burst=config.limits.peer_decode_burst_s)
        self._fair = FairQueue()  # read and not yet handled: (msg, origin, limits key), per peer
        self._kinds: dict[str, type[Agent]] = {}
        self._refusals: OrderedDict = OrderedDict()  # (peer, reason) -> [last logged, count since]
        self._stops: OrderedDict[str, int] = OrderedDict()  # name -> the incarnation its latest stop took
        self._open = Group()
        self._in_flight: Group | None = None
        self._flush_scheduled = False
        self._copies: tuple[Batch, list] | None = None  # replicated records of this loop turn
        self._tasks: set[asyncio.Task] = set()
        self._timers: dict[Callable, Any] = {}  # each periodic function -> its next firing
        self._hello_acked = False
        self._hellos_in_flight = 0
        self._parked_starts: list[tuple[wire.Msg, Origin]] = []  # STARTs waiting for this node's lease
        self._last_hello = -1e9
        self.lease = Lease(self.clock, config.timing.lease_s)
        self._renewing = 0
        self._renewals = 0
        self._drops = 0  # times this boot dropped its agents when its lease lapsed (said in hellos)
        self.stopping = False
        self.stopped = asyncio.Event()
        self.listener = None
        self.supervisor = None  # set by mesh.supervisor when this node hosts the role
        self._llm = None
        self._served = ServedLog(config.host_dir(self.spec.host), name, self.clock.wall) if config.timing.served_log else None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint

    async def start(self) -> None:
        bind = self.endpoint
        self.listener = self.network.listen(bind, self._on_request, self._serve)
        self._every(self.timing.heartbeat_s, self._tick)
        self.say_hello()
        self.notify(f"ready {self.name} {os.getpid()} {self.boot}")
        log.info("node %s listening on %s (boot %s)", self.name, bind, self.boot)

    def _every(self, interval: float, fn: Callable[[], None]) -> None:
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

    def _tick(self) -> None:
        now = self.clock.now()
        self.serving()
        if self.listener is not None:
            self.listener.check_partial()
        for runner in list(self.busy_runners):
            runner.check_deadline(now)
        if not self._hello_acked or not self.names.synced:
            self.say_hello()
        elif self._renewing < MAX_RENEWALS:
            self._spawn(self._renew())

    # --- the lease ---------------------------------------------------------------------------

    def serving(self) -> bool:
        """Whether this node may serve its agents now. A lapsed lease drops them all first.

        The supervisor's own node holds no lease: only the supervisor moves agents, so
        nothing can have replaced its agents while its loop stood still."""
        if self.supervisor is not None or self.lease.valid():
            return True
        if self.runners:
            self._lease_lapsed()
        return False

    def _lease_lapsed(self) -> None:
        log.warning("node %s: lease lapsed (no word from the supervisor): dropping %d agents",
                    self.name, len(self.runners))
        self.stats["lease_lapses"] += 1
        for runner in list(self.runners.values()):
            self.drop(runner, lambda: AgentDown("its node lost its lease"))
        self._drops += 1
        self._hello_acked = False

    async def _renew(self) -> None:
        """Ask the supervisor to extend the lease; it runs from this send time. Renewals
        overlap, so one slow answer does not hold the next back."""
        self._renewing += 1
        sent_at = self.clock.now()
        self._renewals += 1
        body = {"node": self.name, "boot": self.boot, "seq": self._renewals, "agents": len(self.runners),
                "mailbox": max((r.depth() for r in self.runners.values() if r.mailbox), default=0)}
        try:
            answer = await self.caller.request(self.config.supervisor_node, Kind.HEARTBEAT, None, body,
                                               self.timing.lease_s)
        except CallError as err:
            log.debug("node %s: lease renewal: %s", self.name, err)
            return
        finally:
            self._renewing -= 1
        if answer.get("known"):
            self.lease.granted(sent_at)
        else:  # the supervisor does not know this boot (it restarted, or declared us dead)
            self._hello_acked = False
            self.say_hello()

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Stop in order: finish or cancel handlers, terminate agents, commit, say goodbye."""
        if self.stopping:
            return
        self.stopping = True
        for t in self._timers.values():
            t.cancel()
        for runner in list(self.runners.values()):
            runner.interrupt()
        await asyncio.sleep(0)
        for runner in list(self.runners.values()):
            if runner.status == RUNNING and runner.agent is not None:
                await self._terminate_agent(runner, reason)
                self.mark_dirty(runner)
            runner.status = STOPPED
            runner.fail_queued(lambda: AgentDown("its node is shutting down"))
        await self.drain_commits()
        if self._llm is not None:
            await self._llm.aclose()
        if self.name != self.config.supervisor_node:
            try:
                await self.caller.request(self.config.supervisor_node, Kind.GOODBYE, None,
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

    async def drain_commits(self, timeout: float = 10.0) -> None:
        """Wait until everything handed to the store so far is committed."""
        done = asyncio.Event()
        self._open.callbacks.append(lambda outcome: done.set())
        self._schedule_flush()
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            log.error("node %s: commits did not finish within %ss", self.name, timeout)

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
            self._dispatch(exc, None, None)
            return
        self._schedule_flush()
        if msg.kind == Kind.BATCH:
            for item in msg.body:
                self._dispatch(item, None, None)
        else:
            self._dispatch(msg, None, None)

    def _respond(self, origin: Origin, frame: bytes, counted: bool = True) -> None:
        """Send a response; `counted` ones answer a request the peer's limits admitted."""
        if origin is None:
            asyncio.get_running_loop().call_soon(self.caller.on_response, frame)
        else:
            if counted:
                self.peer_limits.answered(self._limit_key(origin))
            self.listener.send(origin, frame)

    def respond(self, origin: Origin, rid: str, body: Any) -> None:
        self._respond(origin, wire.reply(rid, body))

    def respond_error(self, origin: Origin, rid: str | None, err: CallError) -> None:
        self._respond(origin, wire.error(rid, error_to_wire(err)))

    def _on_request(self, origin: bytes, frame: bytes | None) -> int:
        """Read one frame of a peer into its queue; returns how many messages it held."""
        # who sent it, as authenticated now (its route may pass to another key's connection
        # before it is served), and whose limits it spends (None: not limited), worked out
        # once per frame; its share of a turn is that key's, or its connection's for a node
        who = self.listener.identity(origin) if self.secure else None
        key = None if not self._limited(origin) else self._limit_key(origin)
        fair = self._fair
        if frame is None:
            fair.put(key or origin, (ProtocolError("a request must be exactly one frame"), origin, key, who))
            return 1
        if key is None:
            try:
                msg = wire.decode(frame, self.limits.max_message_bytes)
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

    def _serve(self, until: float) -> int:
        """End of the listener's turn: handle what was read, round-robin across peers (up
        to a turn's worth); returns how many messages are still queued."""
        fair = self._fair
        if fair.items:
            fair.serve(self._dispatch, self.limits.batch, until, self._served_all)
            self._schedule_flush()
        return fair.items

    def _served_all(self, item: tuple) -> None:
        """A peer's queue ran empty: its answers leave now, not at the end of the turn."""
        self.listener.send_now(item[1])

    def _decode_from_peer(self, origin: bytes, frame, key, who: str | None) -> "wire.Msg | None":
        """Decode a frame of a peer that is no authenticated node, within its budget of
        decoding time and with its arrays and maps bounded (a million-key map within the
        size limit takes a second). A peer in debt has its frames dropped unread."""
        now = self.clock.now()
        limits = self.peer_limits
        if not limits.may_decode(key, now):
            self.stats["over_decode_budget"] += 1
            self._log_refusal(key, "over its decoding budget: frames dropped unread")
            return None
        # only an authenticated node may send large inventories; without CURVE every
        # peer is a local one (loopback only) and gets the node's bound
        elements = self.limits.max_elements if self.secure else None
        started = time.perf_counter()
        try:
            msg = wire.decode(frame, self.limits.max_message_bytes, elements)
        except ProtocolError as exc:
            limits.charge_decode(key, time.perf_counter() - started)
            self._fair.put(key, (exc, origin, key, who))
            return None
        limits.charge_decode(key, time.perf_counter() - started)
        return msg

    def _log_refusal(self, who, what: str) -> None:
        """Log a refusal at most once a second per peer and reason, with the count since."""
        now = self.clock.now()
        entry = self._refusals.get((who, what))
        if entry is None:
            if len(self._refusals) >= 1000:
                self._refusals.pop(next(iter(self._refusals)))
            entry = self._refusals[(who, what)] = [now - 2.0, 0]
        entry[1] += 1
        if now - entry[0] >= 1.0:
            log.warning("node %s: peer %s %s (%d times since the last report)", self.name,
                        who if isinstance(who, str) else who.hex(), what, entry[1])
            entry[0], entry[1] = now, 0

    def _dispatch(self, msg: "wire.Msg | ProtocolError", origin: Origin, key, who: str | None = None) -> None:
        """One request: the peer's limits (`key`: whose, None if it has none), then its
        validity and role, then its handler. Every request with an id that is admitted
        gets exactly one answer, except one whose route passed to another identity (`who`:
        the sender's when it was read) before its turn: that one is dropped and counted,
        as its answer would reach the route's new holder."""
        if who is not None and self.listener.identity(origin) != who:
            self.stats["route_changed"] += 1
            self._log_refusal(who, "lost its route before its request was served: dropped")
            return
        self.stats["in"] += 1
        bad = type(msg) is ProtocolError
        rid = msg.request_id if bad else msg.id
        if key is not None:
            problem = self.peer_limits.admit(key, rid is not None, self.clock.now())
            if problem is not None:
                self.stats["over_limit"] += 1
                self._log_refusal(key, "is over its limits: answered Busy")
                if rid is not None:
                    self._respond(origin, wire.error(rid, error_to_wire(Busy(problem))), counted=False)
                return
        if bad:
            self._bad(origin, msg)
            return
        if not self._permitted(msg, origin):
            return
        handler = self.handlers.get(msg.kind)
        if handler is None:
            self._bad(origin, ProtocolError(f"{msg.kind.name} is not a request", msg.id))
            return
        try:
            handler(msg, origin)
        except CallError as err:
            if msg.id is not None:
                self.respond_error(origin, msg.id, err)

    def _limit_key(self, origin: bytes) -> bytes | str:
        """Whose share a request spends: the authenticated key's (however many connections
        it opens), or, in a cluster without CURVE, the connection's."""
        if self.secure:
            return self.listener.identity(origin) or origin
        return origin

    def peer(self, origin: Origin) -> str | None:
        """The authenticated identity behind `origin`, as agents see it in ctx.sender:
        "role:name" in a secure cluster, this node for its own agents, else None (without
        CURVE nothing is authenticated)."""
        if origin is None:
            return f"node:{self.name}"
        return self.listener.identity(origin) if self.secure else None

    def _limited(self, origin: bytes) -> bool:
        """Rate and open-request limits hold for every peer but authenticated nodes."""
        return not (self.secure and role_of(self.listener.identity(origin)) == "node")

    def _permitted(self, msg: wire.Msg, origin: Origin) -> bool:
        if not self.secure or origin is None or allowed(self.listener.identity(origin), msg.kind):
            return True
        self.stats["not_allowed"] += 1
        who = self.listener.identity(origin) or "an unidentified peer"
        self._log_refusal(who, f"may not send {msg.kind.name}")
        if msg.id is not None:
            self.respond_error(origin, msg.id, NotAllowed(f"{who} may not send {msg.kind.name}"))
        return False

    def _bad(self, origin: Origin, exc: ProtocolError) -> None:
        self.stats["bad_messages"] += 1
        self._log_refusal(self._limit_key(origin) if origin is not None else "this node",
                          f"sent a bad message: {str(exc)[:120]}")
        if exc.request_id is not None:
            self.respond_error(origin, exc.request_id, BadRequest(str(exc)))

    # --- messages to agents -----------------------------------------------------------------

    def _deadline(self, msg: wire.Msg) -> float:
        if msg.kind != Kind.CALL:
            return 0.0  # only calls have a caller waiting
        ttl = msg.ttl_ms / 1000 if msg.ttl_ms is not None else self.timing.call_timeout_s
        return self.clock.now() + ttl

    def _to_agent(self, msg: wire.Msg, origin: Origin) -> None:
        runner = self.runners.get(msg.target) if self.serving() else None
        if runner is not None:
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
        rid, origin = env.msg.id, env.origin

        def send_chunk(part: Any) -> None:
            self._respond(origin, wire.encode(Kind.CHUNK, rid, None, None, None, part), counted=False)
        return send_chunk

    # --- replies, effects and commit groups ---------------------------------------------------

    def send_response(self, runner: Runner, origins: list, rid: str, response: bytes) -> None:
        """Answer with a tagged response, once the runner's pending changes are committed."""
        group = runner.pending_group
        if group is not None and not self._unsafe:
            group.replies.append((runner, origins, rid, response))
            return
        if not self.serving():
            response = error_response(AgentDown(f"{runner.name!r}: its node lost its lease"))
        elif runner.superseded:
            response = error_response(AgentDown(f"{runner.name!r} was restarted"))
        elif self._served is not None and response[:1] == wire.REPLY_TAG:
            self._served.record(runner.name, runner.incarnation)
        frame = wire.response_frame(rid, response)
        for origin in origins:
            self._respond(origin, frame)

    async def commit_meta(self, puts: dict[str, bytes], deletes=()) -> Outcome:
        """Make supervisor records durable in the next group; returns the commit's outcome."""
        batch = self._open.batch
        for key, value in puts.items():
            batch.meta_deletes.discard(key)
            batch.meta_puts[key] = value
        for key in deletes:
            batch.meta_puts.pop(key, None)
            batch.meta_deletes.add(key)
        future = asyncio.get_running_loop().create_future()
        self._open.callbacks.append(lambda outcome: future.done() or future.set_result(outcome))
        self._schedule_flush()
        return await future

    def mark_dirty(self, runner: Runner) -> None:
        group = self._open
        group.dirty.add(runner)
        runner.pending_group = group
        self._schedule_flush()

    def queue_effects(self, runner: Runner, effects: list) -> None:
        group = runner.pending_group or self._open
        group.effects.append((runner, effects))
        runner.pending_group = group
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._unsafe:  # the planted bug: acknowledged, and not on disk for a while
                asyncio.get_running_loop().call_later(UNSAFE_COMMIT_DELAY_S, self._flush)
            else:
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._in_flight is not None or not self._open:
            return
        group, self._open = self._open, Group()
        batch = group.batch
        for runner in group.dirty:
            if self.runners.get(runner.name) is not runner or runner.name in batch.deletes:
                continue
            if runner.last_state is None:  # crashed since: what it did after its last commit is void
                group.void.add(runner.name)
                continue
            batch.add_put(runner.name, Record(runner.incarnation, runner.seq, runner.last_state))
            batch.add_replies(runner.name, *runner.take_replies())
            if runner.replicas:
                group.replicas[runner.name] = runner.replicas
        self._in_flight = group
        self.stats["commits"] += 1
        self.committer.submit(batch, lambda outcome: self._committed_here(group, outcome))

    def _committed_here(self, group: Group, outcome: Outcome) -> None:
        """The local commit is done; with replicas, the copies must land before anything
        that depends on them leaves (G6)."""
        if outcome.error is None and any(group.replicas.values()):
            self._spawn(self._replicate(group, outcome))
        else:
            self._committed(group, outcome)

    async def _replicate(self, group: Group, outcome: Outcome) -> None:
        batch, per_host = group.batch, {}
        for name, hosts in group.replicas.items():
            for host in hosts:
                body = per_host.setdefault(host, {"puts": [], "claims": [], "deletes": [], "replies": [], "forgotten": []})
                if name in batch.claims:
                    body["claims"].append(batch.claims[name].to_wire(name))
                elif name in batch.puts:
                    body["puts"].append(batch.puts[name].to_wire(name))
                elif name in batch.deletes:
                    body["deletes"].append([name, batch.deletes[name]])
                body["replies"] += [[name, *reply] for reply in batch.replies.get(name, ())]
                body["forgotten"] += [[name, rid] for rid in batch.forgotten.get(name, ())]
        hosts = list(per_host)
        results = await asyncio.gather(*(self._replicate_to(h, per_host[h]) for h in hosts), return_exceptions=True)
        for host, result in zip(hosts, results):
            if isinstance(result, BaseException):
                self.stats["replication_failures"] += 1
                for name, their_hosts in group.replicas.items():
                    if host in their_hosts:
                        outcome.unreplicated[name] = f"its replica host {host} did not take the commit ({result})"
            else:
                for name, stored in (result.get("fenced") or {}).items():
                    outcome.fenced[name] = max(stored, outcome.fenced.get(name, -1))
        self._committed(group, outcome)

    async def _replicate_to(self, host: str, body: dict) -> dict:
        """Hand one batch of copies to a live node of `host` (they share its store)."""
        last: Exception = Unavailable(f"host {host} has no nodes")
        for spec in self.config.nodes_on(host):
            try:
                return await self.caller.request(spec.name, Kind.REPLICATE, None, body, self.timing.dead_after_s)
            except CallError as err:
                last = err
        raise last

    def _on_replicate(self, msg: wire.Msg, origin: Origin) -> None:
        body = msg.body
        try:
            puts = dict(Record.from_wire(item) for item in body.get("puts") or ())
            claims = dict(Record.from_wire(item) for item in body.get("claims") or ())
            deletes = {name: inc for name, inc in body.get("deletes") or ()}
            replies: dict[str, list] = {}
            for name, *reply in body.get("replies") or ():
                replies.setdefault(name, []).extend(replies_from_wire([reply]))
            forgotten: dict[str, list] = {}
            for name, rid in body.get("forgotten") or ():
                forgotten.setdefault(name, []).append(str(rid))
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"bad replicated records: {exc}") from None
        names = set(puts) | set(claims) | set(deletes)
        stale: dict[str, int] = {}

        def done(outcome: Outcome) -> None:
            if outcome.error is not None:
                self.respond_error(origin, msg.id, Unavailable(f"replica commit failed: {outcome.error}"))
            else:
                fenced = {n: i for n, i in outcome.fenced.items() if n in names}
                for n, i in stale.items():  # beaten in this very batch by a newer incarnation's copy
                    fenced[n] = max(i, fenced.get(n, -1))
                self.respond(origin, msg.id, {"fenced": fenced})
        # Copies do not queue behind this node's own groups: those may be waiting for
        # copies to land elsewhere, which could be waiting for this one (a deadlock).
        batch, callbacks = self._copies_of_this_turn()
        if batch.holds_another_incarnation({**puts, **claims}):
            # Two incarnations' copies of one name never share a transaction: merged, the
            # older one's record would be dropped and its replies kept, beside a record
            # without its effects. Committed one after the other, the store fences it.
            self._flush_copies()
            batch, callbacks = self._copies_of_this_turn()
        stale.update(batch.merge(puts, claims, deletes, replies, forgotten))
        callbacks.append(done)
        self.stats["replicated"] += len(names)

    def _copies_of_this_turn(self) -> tuple[Batch, list]:
        """The batch (and its callbacks) that copies and fenced reads of this loop turn
        share: one commit at the end of the turn, outside this node's own groups."""
        if self._copies is None:
            self._copies = (Batch(), [])
            asyncio.get_running_loop().call_soon(self._flush_copies)
        return self._copies

    def _flush_copies(self) -> None:
        if self._copies is None:
            return  # flushed early already (see _on_replicate)
        batch, callbacks = self._copies
        self._copies = None
        self.committer.submit(batch, lambda outcome: [cb(outcome) for cb in callbacks])

    def _on_fetch(self, msg: wire.Msg, origin: Origin) -> None:
        self._spawn(self._fetch(msg, origin))

    async def _fetch(self, msg: wire.Msg, origin: Origin) -> None:
        try:
            record, replies = await self._fenced_read(msg.target, msg.body["incarnation"])
        except CallError as err:
            self.respond_error(origin, msg.id, err)
            return
        self.respond(origin, msg.id, {"record": record.to_wire(msg.target) if record else None,
                                      "replies": [list(r) for r in replies]})

    async def _fenced_read(self, name: str, incarnation: int) -> tuple[Record | None, list]:
        """`name`'s record and replies in this host's store, read by the incarnation about
        to start, which fences the store against older ones in the same transaction: an
        older incarnation still running somewhere cannot commit (and so acknowledge)
        anything after this read that the new one would not have."""
        future = asyncio.get_running_loop().create_future()
        batch, callbacks = self._copies_of_this_turn()
        batch.add_fence(name, incarnation)
        callbacks.append(lambda outcome: future.done() or future.set_result(outcome))
        outcome = await future
        if outcome.error is not None:
            raise Unavailable(f"cannot read {name!r}'s state: {outcome.error}")
        raw, replies = outcome.read[name]
        if raw is None:
            return None, []
        try:
            return decode_record(name, raw), replies
        except SnapshotCorrupt as exc:
            raise AgentCrashed(str(exc), {"exception": type(exc).__name__}) from None

    def _committed(self, group: Group, outcome: Outcome) -> None:
        self._in_flight = None
        failed = outcome.error
        if failed is not None:
            self.stats["commit_errors"] += 1
        fenced = outcome.fenced
        leased = self.serving()  # no reply leaves once the lease has lapsed, committed or not
        for runner in group.dirty:
            if runner.pending_group is group:
                runner.pending_group = None
        for runner, effects in group.effects:
            if runner.pending_group is group:
                runner.pending_group = None
        for runner, origins, rid, response in group.replies:
            if runner.pending_group is group:
                runner.pending_group = None
            if failed is not None:
                response = error_response(_store_error(failed))
            elif runner.name in outcome.failed:
                response = error_response(_refused(runner.name, outcome.failed[runner.name]))
            elif runner.name in outcome.unreplicated:
                response = error_response(Unavailable(f"{runner.name!r}: {outcome.unreplicated[runner.name]}"))
            elif runner.name in group.void or runner.superseded:
                response = error_response(AgentDown(f"{runner.name!r} was restarted before this was kept"))
            elif not leased:
                response = error_response(AgentDown(f"{runner.name!r}: its node lost its lease"))
            elif runner.name in fenced and fenced[runner.name] > runner.incarnation:
                response = error_response(AgentDown(f"{runner.name!r} was restarted elsewhere"))
            elif self._served is not None and response[:1] == wire.REPLY_TAG:
                self._served.record(runner.name, runner.incarnation)
            frame = wire.response_frame(rid, response)
            for origin in origins:
                self._respond(origin, frame)
        if failed is None:
            self._note_durable(group.batch, outcome)
        if failed is None and leased:
            for runner, effects in group.effects:
                if runner.name not in fenced and runner.name not in outcome.unreplicated \
                        and runner.name not in outcome.failed \
                        and runner.name not in group.void and not runner.superseded:
                    self._release(runner, effects)
        for callback in group.callbacks:
            callback(outcome)
        for name, stored in fenced.items():
            runner = self.runners.get(name)
            if runner is not None and runner.incarnation < stored and runner.status != STARTING:
                self.stats["fenced"] += 1
                log.warning("agent %s incarnation %d is fenced by %d: dropped here", name, runner.incarnation, stored)
                was_running = runner.status == RUNNING
                self.drop(runner, lambda: AgentDown(f"{name!r} was restarted elsewhere"))
                if was_running:
                    # The supervisor may still count on it here (the newer incarnation's
                    # START failed, say): tell it, so that the name runs somewhere.
                    self.report_exit(runner, supervision.LOST, f"fenced by incarnation {stored}")
        for runner in group.dirty:
            # Not kept: the agent goes back to its last committed state and serves on. The
            # store's trouble is no fault of the agent's, so it is no crash (G5).
            if failed is None and runner.name not in outcome.failed:
                continue
            if self.runners.get(runner.name) is runner and runner.status == RUNNING:
                self.stats["rollbacks"] += 1
                err = _store_error(failed) if failed is not None else _refused(runner.name, outcome.failed[runner.name])
                if not runner.rollback(err, [r[0] for r in group.batch.replies.get(runner.name, ())]):
                    runner.last_state = None  # nothing durable to go back to: a restart reads the store
                    runner.crash(failed or StoreError(outcome.failed[runner.name]), supervision.LOST)
        for name, why in outcome.unreplicated.items():
            runner = self.runners.get(name)
            if runner is not None and runner.status == RUNNING:
                # committed here but not on its replica hosts: the supervisor places it again
                # with live replicas (no fault of the agent's: it is moved, not counted)
                runner.last_state = None
                runner.crash(Unavailable(why), supervision.LOST)
        if self._open:
            self._flush()

    def _note_durable(self, batch: Batch, outcome: Outcome) -> None:
        """Remember, per runner, the state this commit made durable (what a rollback returns to)."""
        for part in (batch.claims, batch.puts):
            for name, record in part.items():
                runner = self.runners.get(name)
                if runner is not None and runner.incarnation == record.incarnation \
                        and name not in outcome.fenced and name not in outcome.failed:
                    runner.durable = (record.seq, record.state)

    def discard_pending(self, runner: Runner, err: CallError) -> None:
        """Take a runner's uncommitted work out of the open group: its replies are answered
        with `err`, its put and its effects are dropped."""
        group = self._open
        group.dirty.discard(runner)
        mine = [item for item in group.replies if item[0] is runner]
        if mine:
            group.replies = [item for item in group.replies if item[0] is not runner]
        group.effects = [item for item in group.effects if item[0] is not runner]
        runner.pending_group = None
        response = error_response(err)
        for _, origins, rid, _ in mine:
            frame = wire.response_frame(rid, response)
            for origin in origins:
                self._respond(origin, frame)

    def _release(self, runner: Runner, effects: list) -> None:
        for effect in effects:
            if effect[0] == "cast":
                try:
                    self.caller.cast(effect[1], effect[2])
                except CallError as err:
                    log.warning("agent %s: cast to %s failed: %s", runner.name, effect[1], err)
            elif effect[0] == "timer":
                _, delay, msg, ref = effect
                self.arm_timer(runner, delay, msg, ref)

    def arm_timer(self, runner: Runner, delay: float, msg: Any, ref: TimerRef) -> None:
        if ref.cancelled:
            return
        name, inc = runner.name, runner.incarnation

        def fire():
            r = self.runners.get(name) if self.serving() else None
            if ref.cancelled or r is None or r.incarnation != inc:
                return
            r.deliver(Envelope(wire.Msg(Kind.INFO, None, name, f"agent:{name}", None, msg), None, self.clock.now(),
                               f"node:{self.name}"))
            self._schedule_flush()
        ref._timer = self.clock.call_after(delay, fire)

    # --- agent lifecycle ----------------------------------------------------------------------

    def kind_class(self, kind: str) -> type[Agent]:
        cls = self._kinds.get(kind)
        if cls is not None:
            return cls
        path = self.config.resolve_kind(kind)
        if path is None:
            raise NotAllowed(f"kind {kind!r} is not in the config's allow-list")
        module_name, _, class_name = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:
            raise BadRequest(f"kind {kind!r} ({path}) cannot be loaded: {type(exc).__name__}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise NotAllowed(f"{path} is not an Agent")
        self._kinds[kind] = cls
        return cls

    def _on_start(self, msg: wire.Msg, origin: Origin) -> None:
        name, body = msg.target, msg.body
        inc = body["incarnation"]
        if self.stopping:
            raise Unavailable(f"node {self.name} is shutting down")
        if not self.serving():
            # The supervisor answers a HELLO (granting the lease) before it sends STARTs,
            # but on another connection: a START may overtake that answer. It waits for it.
            if not self._hellos_in_flight:
                raise Unavailable(f"node {self.name} holds no lease")
            self._parked_starts.append((msg, origin))
            return
        old = self.runners.get(name)
        if old is not None and old.incarnation >= inc:
            raise AlreadyExists(f"{name!r} already runs incarnation {old.incarnation} here",
                                {"incarnation": old.incarnation})
        self.kind_class(body["kind"])  # refuse unknown kinds before anything else
        if old is not None and old.status in (RUNNING, STARTING):
            self._stop_quietly(old)
        self._spawn(self._start_from_copies(msg, origin))

    async def _start_from_copies(self, msg: wire.Msg, origin: Origin) -> None:
        try:
            copy = await self._newest_copy(msg.target, msg.body.get("sources") or [], msg.body["incarnation"])
            if copy[0] is not None and copy[0].incarnation < msg.body.get("since", 0):
                # older than the spawn of this agent: an earlier agent's of the same name,
                # left on a host its stop could not reach, never this one's state
                log.warning("node %s: %s starts from nothing: the record found (incarnation %d) is older than "
                            "its spawn (%d)", self.name, msg.target, copy[0].incarnation, msg.body["since"])
                copy = (None, [])
            old = self.runners.get(msg.target)
            if old is not None and old.incarnation < msg.body.get("since", 0):
                # the same: an earlier agent of the name ran here. Neither its state nor
                # the messages that waited for it (a burst of its calls) are this one's.
                old.last_state = None
                old.fail_queued(lambda: NoSuchAgent(f"{msg.target!r} was stopped; another agent of "
                                                    f"the name runs now"), forward=False)
            self._begin(msg, origin, copy, old, copied=bool(msg.body.get("sources")))
        except CallError as err:
            self.respond_error(origin, msg.id, err)
        self._schedule_flush()

    async def _newest_copy(self, name: str, sources: list, incarnation: int) -> tuple[Record | None, list]:
        """The newest snapshot of `name` (and its recorded replies) among this host's store
        and the source nodes', each read fenced for `incarnation`. `sources` holds groups of
        nodes, one group per set of hosts that may hold the newest acknowledged state: every
        acknowledged commit is on each host of its set, so one answer per group is enough
        (and, being fenced, no older incarnation acknowledges anything more); none is not."""
        mine = self.spec.host
        groups = [[n for n in group if isinstance(n, str) and n in self.config.nodes]
                  for group in sources if isinstance(group, list)]
        if len(groups) != len(sources):
            raise BadRequest("sources must be lists of node names")
        remote = sorted({n for group in groups for n in group if self.config.nodes[n].host != mine})
        answered = {self.name}  # this host's store counts for a group that names a node of it

        async def fetch(node: str):
            return await self.caller.request(node, Kind.FETCH, name, {"incarnation": incarnation},
                                             min(self.timing.call_timeout_s, 2.0))
        mine_read, *results = await asyncio.gather(self._fenced_read(name, incarnation), *(fetch(n) for n in remote),
                                                   return_exceptions=True)
        if isinstance(mine_read, BaseException):
            raise mine_read
        best, best_replies = mine_read
        for node, result in zip(remote, results):
            if isinstance(result, BaseException):
                log.warning("node %s: no copy of %s from %s: %s", self.name, name, node, result)
                continue
            if isinstance(result, dict) and result.get("record") is not None:
                try:
                    _, record = Record.from_wire(result["record"])
                    replies = replies_from_wire(result.get("replies"))
                except ValueError as exc:
                    log.warning("node %s: bad copy of %s from %s: %s", self.name, name, node, exc)
                    continue
                if record.newer_than(best):
                    best, best_replies = record, replies
            answered.add(node)
        missing = [group for group in groups
                   if not any(n in answered or self.config.nodes[n].host == mine for n in group)]
        if missing:
            raise Unavailable(f"no host of {', '.join('/'.join(g) for g in missing)} answered with {name!r}'s state")
        return best, best_replies

    def _begin(self, msg: wire.Msg, origin: Origin, copy: tuple[Record | None, list] | None, old: Runner | None,
               copied: bool = False) -> None:
        """Start an incarnation from `old`'s last good state, or from a copy (a record and
        its recorded replies), read here or (`copied`) fetched from another host."""
        name, body = msg.target, msg.body
        record, replies = copy if copy is not None else (None, [])
        if old is not None and old.last_state is not None and record is not None \
                and record.newer_than(Record(old.incarnation, old.seq, b"")):
            old.last_state = None  # a later incarnation ran elsewhere: its record wins over this one's memory
        inc = body["incarnation"]
        if self.stopping:
            raise Unavailable(f"node {self.name} is shutting down")
        if self._stopped_after(name, inc):
            raise AlreadyExists(f"{name!r} was stopped after incarnation {inc} was sent",
                                {"incarnation": self._stops[name]})
        current = self.runners.get(name)
        if current is not None and current.incarnation >= inc:
            raise AlreadyExists(f"{name!r} already runs incarnation {current.incarnation} here",
                                {"incarnation": current.incarnation})
        cls = self.kind_class(body["kind"])
        if old is not None and old.last_state is not None:
            seq, state, window, mailbox, inflight = old.seq, old.last_state, old.window, old.mailbox, old.inflight
            waiting = old.waiting
            restarts = old.restarts + 1
            log.info("node %s: %s incarnation %d starts from incarnation %d's last state (seq %d)",
                     self.name, name, inc, old.incarnation, seq)
        else:
            if old is not None:
                old.superseded = True  # the new incarnation starts from the store, not from it
            log.info("node %s: %s incarnation %d starts from %s", self.name, name, inc,
                     f"incarnation {record.incarnation}'s record (seq {record.seq}){' fetched' if copied else ''}"
                     if record else "nothing")
            if record is not None and record.incarnation >= inc:
                raise AlreadyExists(f"{name!r}: the store holds incarnation {record.incarnation}",
                                    {"incarnation": record.incarnation})
            seq, state = (record.seq, record.state) if record else (0, msgpack.packb(None))
            window = OrderedDict((reply[0], reply[1:]) for reply in replies)
            mailbox, inflight, waiting = (old.mailbox, old.inflight, old.waiting) if old is not None else (None, {}, {})
            restarts = old.restarts + 1 if old is not None else 0
        runner = Runner(self, name, body["kind"], body.get("args") or {}, inc)
        runner.seq, runner.mailbox, runner.inflight, runner.restarts = seq, mailbox, inflight, restarts
        runner.waiting = waiting
        runner.supervisor = body.get("supervisor")
        runner.replicas = tuple(h for h in body.get("replicas") or () if h in self.config.hosts and h != self.spec.host)
        if window is not None:
            runner.window = window
        # agent time goes on from the newest reply it recorded (or from the old runner's)
        runner.resume_time(old.agent_now() if old is not None and old.window is window
                           else max((entry[1] for entry in runner.window.values()), default=0.0))
        agent = cls()
        agent.name, agent._runner = name, runner
        try:
            restored = unpack_state(state) if state else None
        except Exception as exc:
            raise AgentCrashed(str(SnapshotCorrupt(name, str(exc)))) from None
        try:
            agent.state = agent.init(runner.args, restored)
            if asyncio.iscoroutine(agent.state):
                agent.state.close()
                raise TypeError("init must not be async")
            packed = msgpack.packb(agent.state)
        except Exception as exc:
            self.stats["init_failures"] += 1
            raise AgentCrashed(f"{name}: init failed: {type(exc).__name__}: {exc}"[:500],
                               {"exception": type(exc).__name__}) from None
        runner.agent, runner.last_state, runner.status = agent, packed, STARTING
        self.runners[name] = runner
        group = self._open
        group.batch.add_claim(name, Record(inc, seq, packed))
        # the replies that go with this state, and only those, to this host and its replicas
        group.batch.add_replies(name, [(rid, *entry) for rid, entry in runner.window.items()], [])
        group.replicas[name] = runner.replicas
        runner.pending_group = group
        group.callbacks.append(lambda outcome: self._started(runner, origin, msg.id, outcome))
        self._schedule_flush()

    def _started(self, runner: Runner, origin: Origin, rid: str, outcome: Outcome) -> None:
        if runner.pending_group is not None and runner.pending_group is not self._open:
            runner.pending_group = None
        name = runner.name
        if outcome.error is not None or name in outcome.fenced or name in outcome.unreplicated:
            if outcome.error is not None:
                err: CallError = Unavailable(str(outcome.error))
            elif name in outcome.fenced:
                err = AlreadyExists(f"{name!r}: the store holds incarnation {outcome.fenced[name]}",
                                    {"incarnation": outcome.fenced[name]})
            else:
                err = Unavailable(f"{name!r}: {outcome.unreplicated[name]}")
            log.info("node %s: %s incarnation %d not started: %s", self.name, name, runner.incarnation, err)
            if self.runners.get(name) is runner:
                del self.runners[name]
            runner.fail_queued(lambda: AgentDown(f"{name!r} failed to start"))
            self.respond_error(origin, rid, err)
            return
        if self.runners.get(name) is not runner:
            self.respond_error(origin, rid, AgentDown(f"{name!r} was stopped while starting"))
            return
        if self._stopped_after(name, runner.incarnation):  # a stop came while it started: it ends here
            self.drop(runner, lambda: NoSuchAgent(f"{name!r} was stopped"))
            self.respond_error(origin, rid, AlreadyExists(f"{name!r} was stopped while starting",
                                                          {"incarnation": self._stops[name]}))
            return
        runner.status = RUNNING
        self.respond(origin, rid, {"node": self.name, "incarnation": runner.incarnation})
        runner.run_mailbox()
        self._schedule_flush()

    def _stop_quietly(self, runner: Runner) -> None:
        """End an incarnation without its terminate callback (it is being replaced)."""
        runner.interrupt()
        runner.status = STOPPED
        runner.agent = None

    def _on_terminate(self, msg: wire.Msg, origin: Origin) -> None:
        """End the incarnation named, and any older one of the name here. With `forget`
        (a stop) the record is deleted too, fenced at the stop's incarnation, and every
        START older than it is refused from then on, also one already under way."""
        name, body = msg.target, msg.body
        runner = self.runners.get(name)
        forget = bool(body.get("forget"))
        hosts = tuple(h for h in body.get("replicas") or () if h in self.config.hosts and h != self.spec.host)
        if forget:
            self._note_stop(name, body["incarnation"])
        if runner is None or runner.incarnation > body["incarnation"]:
            if forget:
                self._open.batch.deletes[name] = body["incarnation"]
                self._open.replicas[name] = hosts
                self._open.callbacks.append(lambda outcome: self._answer_stop(origin, msg.id, outcome, name))
                self._schedule_flush()
            else:
                self.respond(origin, msg.id, {"stopped": False})
            return
        self._spawn(self._terminate(runner, body.get("reason") or "shutdown", forget, origin, msg.id, hosts,
                                    body["incarnation"]))

    def _note_stop(self, name: str, incarnation: int) -> None:
        """Remember a stop, so that a START older than it that is still under way fails."""
        self._stops[name] = max(incarnation, self._stops.get(name, -1))
        self._stops.move_to_end(name)
        while len(self._stops) > 100_000:
            self._stops.popitem(last=False)  # the store's fence refuses those STARTs all the same

    def _stopped_after(self, name: str, incarnation: int) -> bool:
        return self._stops.get(name, -1) > incarnation

    def _answer_stop(self, origin: Origin, rid: str, outcome: Outcome, name: str) -> None:
        if outcome.error is not None:
            self.respond_error(origin, rid, Unavailable(f"the stop of {name!r} could not be committed: {outcome.error}"))
        elif name in outcome.unreplicated:
            self.respond_error(origin, rid, Unavailable(f"the stop of {name!r}: {outcome.unreplicated[name]}"))
        elif name in outcome.fenced:
            self.respond(origin, rid, {"stopped": False})  # a newer incarnation (a new spawn) owns it
        else:
            self.respond(origin, rid, {"stopped": True})

    async def _terminate(self, runner: Runner, reason: str, forget: bool, origin: Origin, rid: str,
                         hosts: tuple[str, ...] = (), stop_at: int | None = None) -> None:
        if runner.task is not None:
            runner.interrupt()
            await asyncio.sleep(0)
        if runner.status == RUNNING and runner.agent is not None:
            await self._terminate_agent(runner, reason)
            self.mark_dirty(runner)
        runner.status = STOPPED
        runner.agent = None
        if forget:
            self.drop(runner, lambda: NoSuchAgent(f"{runner.name!r} was stopped"))
            self._open.batch.deletes[runner.name] = max(runner.incarnation, stop_at or -1)
            self._open.replicas[runner.name] = tuple(set(hosts) | set(runner.replicas))
        done = asyncio.get_running_loop().create_future()
        self._open.callbacks.append(lambda outcome: done.done() or done.set_result(outcome))
        self._schedule_flush()
        outcome = await done
        if forget:
            self._answer_stop(origin, rid, outcome, runner.name)
        elif outcome.error is not None:
            self.respond_error(origin, rid, Unavailable(str(outcome.error)))
        else:
            self.respond(origin, rid, {"stopped": True})

    async def _terminate_agent(self, runner: Runner, reason: str) -> None:
        agent = runner.agent
        if runner.interrupted:  # its handler was cancelled: it may not have unwound yet
            runner.discard_unfinished()
        try:
            result = agent.terminate(reason)
            if asyncio.iscoroutine(result):
                await asyncio.wait_for(result, 5.0)
            packed = msgpack.packb(agent.state)
        except Exception as exc:
            log.warning("agent %s: terminate raised %s: %s", runner.name, type(exc).__name__, exc)
            return
        if packed != runner.last_state:
            runner.seq += 1
            runner.last_state = packed

    def stop_runner(self, runner: Runner, reason: str, how: str) -> None:
        """The agent asked to stop: terminate it in order, then tell the supervisor."""
        async def stop():
            if runner.agent is not None:
                await self._terminate_agent(runner, reason)
                self.mark_dirty(runner)
            runner.status = STOPPED
            runner.agent = None
            self.report_exit(runner, how, reason)
        runner.status = STOPPED  # nothing more is handled meanwhile
        self._spawn(stop())

    def drop(self, runner: Runner, make_error: Callable[[], CallError]) -> None:
        runner.superseded = True
        if self.runners.get(runner.name) is runner:
            del self.runners[runner.name]
        runner.interrupt()
        runner.status = STOPPED
        runner.fail_queued(make_error)
        self.busy_runners.discard(runner)

    def report_exit(self, runner: Runner, how: str, reason: str) -> None:
        body = {"name": runner.name, "incarnation": runner.incarnation, "how": how,
                "reason": reason if isinstance(reason, str) else repr(reason)[:500], "node": self.name}
        try:
            self.send(self.config.supervisor_node, wire.encode(Kind.EXIT, None, None, f"node:{self.name}", None, body))
        except CallError as err:
            log.warning("could not report the exit of %s: %s", runner.name, err)

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
        body = {"node": self.name, "boot": self.boot, "pid": os.getpid(), "agents": self._inventory()}
        if self.previous:
            body["previous"] = self.previous
        if self._drops:
            body["drops"] = self._drops
        self._spawn(self._hello(body))

    async def _hello(self, body: dict) -> None:
        sent_at = self.clock.now()
        self._hellos_in_flight += 1
        try:
            await self.caller.request(self.config.supervisor_node, Kind.HELLO, None, body, self.timing.dead_after_s)
        except CallError as err:
            log.debug("hello to the supervisor: %s", err)
            return
        else:
            self._hello_acked = True
            self.previous = None
            self.lease.granted(sent_at)
        finally:
            self._hellos_in_flight -= 1
            self._run_parked_starts()

    def _run_parked_starts(self) -> None:
        """Handle the STARTs that came before the lease (now granted, or refused)."""
        if self._hellos_in_flight and not self.lease.valid():
            return
        parked, self._parked_starts = self._parked_starts, []
        for msg, origin in parked:
            try:
                self._on_start(msg, origin)
            except CallError as err:
                self.respond_error(origin, msg.id, err)

    # --- supervisor's questions -------------------------------------------------------------

    def _inventory(self) -> list:
        """What runs here, as HELLO and INVENTORY report it."""
        return [[r.name, r.kind, r.incarnation, r.status, r.depth(), r.handled, list(r.replicas)]
                for r in self.runners.values()]

    def _on_inventory(self, msg: wire.Msg, origin: Origin) -> None:
        self.respond(origin, msg.id, {
            "node": self.name, "boot": self.boot, "pid": os.getpid(), "agents": self._inventory(),
            "stats": dict(self.stats),
        })

    def _forward_to_supervisor(self, msg: wire.Msg, origin: Origin) -> None:
        async def forward():
            ttl = msg.ttl_ms / 1000 if msg.ttl_ms else self.timing.call_timeout_s
            try:
                result = await self.caller.request(self.config.supervisor_node, msg.kind, msg.target, msg.body, ttl)
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
        return await self.caller.request(self.config.supervisor_node, Kind.SPAWN, None, body,
                                         self.timing.call_timeout_s, rid=rid)


def _store_error(failed: StoreError) -> CallError:
    """What a caller hears when the commit its reply waited for failed: Unavailable naming
    the cause. Safe to repeat with the same request id, but not at once: the caller's
    library hands it over instead of retrying (a full disk is mended by freeing space)."""
    return Unavailable(f"the store could not commit: {failed}", {"disk_full": failed.disk_full, "retry": False})


def _refused(name: str, why: str) -> CallError:
    """What a caller hears when the store refused the record of its agent (never retried:
    the same record would be refused again)."""
    return BadRequest(f"{name!r}: the store refused its record: {why}")
