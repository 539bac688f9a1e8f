"""connect(): call, cast, spawn, stop and status from outside the mesh.

    async with mesh.connect("configs/local.toml") as m:
        await m.spawn("c1", "counter")
        await m.call("c1", {"op": "add", "n": 2})

    with mesh.connect_sync() as m:          # for scripts: the same calls, blocking
        m.call("c1", {"op": "get"})

A client keeps one DEALER per node it talks to, learns where names live from the nodes'
answers, and follows agents when they move (see mesh.caller). spawn, stop and status
go to the supervisor's node; any node passes them on if that one cannot be reached.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from typing import Any, Callable

from . import otel
from .caller import Caller, ClientResolver
from .clock import Backoff, Clock
from .config import Config, load
from .errors import Busy, CallError, CallTimeout, NoSuchAgent, Retryable, Unavailable
from .groups import Groups
from .network import ZmqNetwork
from .security import Security, client_keypair
from .wire import Kind

STATUS_PAGE = 10_000  # agents per STATUS answer when the client gathers them all


class Client:
    """`key`: the secret key file to connect with when the cluster is secure (default:
    $MESH_KEY, then [security] client_key)."""

    def __init__(self, config: Config, network=None, clock: Clock | None = None, name: str | None = None,
                 key: str | None = None):
        self.config = config
        self._security = Security(config, client_keypair(config, key)) if config.secure and network is None else None
        self.clock = clock or Clock()
        self._network = network
        self._own_network = network is None
        self.links: dict[str, Any] = {}
        self.up: dict[str, bool] = {}
        sender = name or f"client:{socket.gethostname()}:{os.getpid()}"
        self.resolver = ClientResolver(list(config.nodes), lambda n: self.up.get(n, False), self.clock)
        self.caller = Caller(self.clock, sender, self._send, self.resolver, config.limits.max_message_bytes,
                             link_down=lambda n: self.up.get(n) is False,
                             link_refused=lambda n: n in self.links and self.links[n].refused,
                             reconnect=self._reconnect)
        self.timeout = config.timing.call_timeout_s
        self.groups = Groups(self)
        if otel.tracer is None and "opentelemetry.sdk.trace" in sys.modules:
            otel.use()  # this process traces (it set up the SDK): its calls start their traces

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _send(self, node: str, frame: bytes, ttl: float | None = None) -> None:
        self._link(node).send(frame, ttl)

    def _link(self, node: str):
        link = self.links.get(node)
        if link is None:
            if self._network is None:
                self._network = ZmqNetwork(self.config.limits.max_message_bytes, self.config.limits.batch,
                                           self._security)
            spec = self.config.nodes.get(node)
            if spec is None:
                raise Unavailable(f"no node named {node!r}")
            link = self._network.link(spec.endpoint, self.caller.on_response,
                                      lambda up, n=node: self._on_state(n, up))
            self.links[node] = link
        return link

    def _reconnect(self, node: str) -> None:
        """A new connection to a node that came back; what waited on the old one (calls of
        this client that queued there) goes on the new one."""
        link = self.links.pop(node, None)
        self.up.pop(node, None)
        if link is not None:
            held = link.take_held()
            link.close()
            self.caller.link_replaced(node)
            if held:
                self._link(node).hold(held)

    async def connected(self, node: str, wait: float) -> bool:
        """Whether this client's connection to `node` is up, or comes up within `wait`
        seconds (it is made now if there is none); False at once if it is known down."""
        self._link(node)
        end = self.clock.now() + wait
        while self.up.get(node) is None:
            left = end - self.clock.now()
            if left <= 0:
                return False
            woken = asyncio.get_running_loop().create_future()
            wake = (lambda _=None: woken.done() or woken.set_result(None))
            timer = self.clock.call_after(left, wake)
            came = self.caller.link_up()
            came.add_done_callback(wake)
            try:
                await woken
            finally:
                timer.cancel()
                came.remove_done_callback(wake)
        return bool(self.up.get(node))

    def _on_state(self, node: str, up: bool | None) -> None:
        self.up[node] = bool(up)
        self.caller.on_link_state(node, up)

    async def close(self, drain_s: float = 1.0) -> None:
        """Close the client; casts already made get up to `drain_s` to reach a live node."""
        links = list(self.links.values())
        await asyncio.gather(*(link.drain(drain_s) for link in links))
        for link in links:
            link.close(linger_ms=int(drain_s * 1000))
        self.links.clear()
        if self._own_network and self._network is not None:
            self._network.close()
            self._network = None

    # --- agents --------------------------------------------------------------------------------

    async def call(self, name: str, msg: Any, timeout: float | None = None, request_id: str | None = None,
                   stream: Callable[[Any], None] | None = None) -> Any:
        """Call agent `name`; returns its reply or raises a CallError.

        `request_id` makes retries safe: the same id is answered from the agent's record.
        `stream(part)` receives streamed pieces of the reply, if the agent sends any."""
        return await self.caller.call(name, msg, self.timeout if timeout is None else timeout, request_id, stream)

    async def cast(self, name: str, msg: Any) -> None:
        """Send without waiting for an answer (delivered at most once)."""
        if self.resolver.where(name) is None:
            try:
                await self.whereis(name)
            except CallError:
                pass  # the node it lands on passes it on, or counts it as undeliverable
        self.caller.cast(name, msg)

    # --- groups (mesh.groups) ----------------------------------------------------------------

    async def spawn_group(self, group: str, kind: str, size: int, args: dict | None = None,
                          restart: str = "permanent", supervisor: str | None = None,
                          timeout: float | None = None) -> list[dict]:
        """Spawn members GROUP.0 .. GROUP.size-1 (those missing), on distinct nodes while
        there are enough; returns each member's {name, node, incarnation}."""
        return await self.groups.spawn(group, kind, size, args, restart, supervisor, timeout)

    async def call_group(self, group: str, msg: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        """Call the least loaded member of `group` (as this client sees it); a member
        that cannot take it is passed over at once. `idempotent`: the call may run again on
        another member when the one that had it died (see mesh.groups)."""
        return await self.groups.call(group, msg, self.timeout if timeout is None else timeout, idempotent)

    async def members(self, group: str, timeout: float | None = None) -> list[dict]:
        """The members of `group`: {name, kind, status, node, incarnation, restarts}."""
        return await self.groups.members(group, timeout)

    async def stop_group(self, group: str, timeout: float | None = None) -> list[str]:
        """Stop every member of `group`; returns their names."""
        return await self.groups.stop(group, timeout)

    async def whereis(self, name: str, timeout: float | None = None) -> dict:
        node = self.resolver.any_node()
        body = await self.caller.request(node, Kind.WHEREIS, name, {}, self.timeout if timeout is None else timeout)
        if body.get("node"):
            self.resolver.learn(name, body["node"], body.get("incarnation", -1))
        return body

    # --- the supervisor's business -------------------------------------------------------------

    async def _control(self, kind: Kind, target: str | None, body: Any, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        deadline = self.clock.now() + timeout
        rid = self.caller.new_id()
        node = self.config.supervisor_node
        backoff = Backoff(self.clock)
        while True:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise CallTimeout(f"{kind.name.lower()} got no answer within {timeout:g}s")
            try:
                return await self.caller.request(node, kind, target, body, remaining, rid=rid)
            except Busy as err:  # a burst of spawns: the supervisor says when to send it again
                hint = err.data.get("retry_after_ms", 0) / 1000
                if not err.retryable or hint >= remaining - 0.1:
                    raise
                await self.clock.sleep(hint)
            except Retryable as err:
                if remaining < 0.2 or not err.retryable:
                    raise err
                node = self.resolver.any_node(avoid=node)
                # the supervisor is (re)starting, or no node is reachable: wait, then again
                await backoff.wait(deadline - 0.1, self.caller.link_up())

    async def spawn(self, name: str, kind: str, args: dict | None = None, restart: str = "permanent",
                    supervisor: str | None = None, timeout: float | None = None) -> dict:
        body = {"name": name, "kind": kind, "args": args or {}, "restart": restart}
        if supervisor:
            body["supervisor"] = supervisor
        result = await self._control(Kind.SPAWN, None, body, timeout)
        self.resolver.learn(name, result["node"], result["incarnation"])
        return result

    async def stop(self, name: str, timeout: float | None = None) -> dict:
        """Stop agent `name`. The stop names the incarnation it was sent for, so a copy of it
        that arrives late (held on a link) never stops an agent of the name spawned since."""
        for attempt in range(2):
            try:
                inc = (await self.whereis(name, timeout)).get("incarnation")
            except NoSuchAgent:  # not in the registry: perhaps a stop not yet confirmed, repeated
                inc = None
            body = {"incarnation": inc} if type(inc) is int and inc > 0 else None  # 0: not known yet
            try:
                return await self._control(Kind.STOP, name, body, timeout)
            except NoSuchAgent as err:
                if attempt or not err.data.get("earlier_life"):
                    raise
                # the node asked first had an older view of the name: ask again

    async def status(self, timeout: float | None = None, agents: bool = True, kind: str | None = None,
                     node: str | None = None, status: str | None = None, limit: int | None = None,
                     after: str | None = None, name: str | None = None, top: int | None = None) -> dict:
        """The cluster as the supervisor sees it: {nodes, ready, failed, epoch, total} and
        either `agents` (listed: filtered by kind, node, status; sorted by name; `limit`
        per page, `next` naming where the following page starts, passed as `after`), or
        with agents=False counts only (`kinds`, `statuses`), whose size and cost do not
        grow with the agents on each node. Agents with no `limit`: every one that matches,
        fetched page after page (no one answer grows past a page)."""
        view = {k: v for k, v in (("name", name), ("kind", kind), ("node", node), ("status", status),
                                  ("after", after)) if v is not None}
        if not agents:  # with `top`, also the busiest agents of each node (mesh top)
            return await self._control(Kind.STATUS, None, {"agents": False, **view, **({"top": top} if top else {})},
                                       timeout)
        if limit is not None:
            return await self._control(Kind.STATUS, None, {"agents": True, **view, "limit": limit}, timeout)
        whole = await self._control(Kind.STATUS, None, {"agents": True, **view, "limit": STATUS_PAGE}, timeout)
        while whole.get("next"):  # a supervisor of the release before lists every agent at once
            page = await self._control(Kind.STATUS, None, {"agents": True, **view, "limit": STATUS_PAGE,
                                                           "after": whole.pop("next")}, timeout)
            whole["agents"] += page["agents"]
            whole["next"] = page.get("next")
        whole.pop("next", None)
        return whole

    async def inspect(self, name: str, max_bytes: int = 2000, timeout: float | None = None) -> dict:
        """One agent as its node and its supervisor see it (OTP's sys:get_status): kind,
        code version, node, incarnation, status; its state (as JSON, cut past `max_bytes`);
        its mailbox depth and first waiting messages; the message in hand and for how
        long; commits and recorded replies kept; and, from its supervisor, its restarts
        and latest exits (`supervision`). Read-only: a busy agent is not waited for."""
        timeout = self.timeout if timeout is None else timeout
        deadline = self.clock.now() + timeout
        seen = await self.status(name=name, timeout=timeout)
        if not seen["agents"]:
            raise NoSuchAgent(f"no agent named {name!r}")
        supervision = seen["agents"][0]
        for attempt in range(3):  # it may move between asking where and asking it
            where = await self.whereis(name, timeout=self._left(deadline))
            if not where.get("node"):
                return {"name": name, "node": None, "status": supervision["status"], "supervision": supervision}
            try:
                found = await self.caller.request(where["node"], Kind.INSPECT, name, {"max_bytes": max_bytes},
                                                  self._left(deadline))
                return {**found, "supervision": supervision}
            except NoSuchAgent:
                if attempt == 2:
                    raise

    async def trace(self, name: str, seconds: float = 10.0, on_event: Callable[[dict], None] | None = None,
                    max_body: int = 200) -> list[dict]:
        """Stream what happens to agent `name` for `seconds` (OTP's sys:trace): each event
        (a dict: ev, t, inc, ...; see mesh.tracing) to `on_event` as it happens. A trace
        follows the agent across restarts and moves (a "restart" event says where to).
        Returns the summary of each incarnation's trace."""
        on_event = on_event or (lambda event: None)
        deadline = self.clock.now() + seconds
        summaries: list[dict] = []
        after = -1
        while (left := deadline - self.clock.now()) > 0.01:
            try:
                node, inc = await self.resolver.locate(self.caller, name, after, deadline, None)
            except CallTimeout:
                if not summaries and after < 0:
                    raise CallTimeout(f"could not find {name!r} running within {seconds:g}s") from None
                break  # not placed again before the end
            except NoSuchAgent:
                if not summaries:
                    raise
                break  # stopped for good
            if after >= 0:
                on_event({"ev": "restart", "t": self.clock.wall(), "inc": inc, "node": node})
            left = deadline - self.clock.now()
            try:
                summary = await self.caller.request(node, Kind.TRACE, name, {"for_ms": max(1, int(left * 1000)),
                                                                             "max_body": max_body},
                                                    left + self.timeout, stream=on_event)
            except (NoSuchAgent, Retryable) as err:  # it moved, or its node died: wait for the next one
                if isinstance(err, Retryable):
                    on_event({"ev": "lost", "t": self.clock.wall(), "inc": inc, "node": node, "error": str(err)})
                after = inc
                continue
            summaries.append(summary)
            if summary.get("ended") != "exit":
                break
            after = summary.get("incarnation", after)
        return summaries

    async def drain(self, node: str, timeout: float | None = None) -> dict:
        """Move every agent off `node`, and place nothing there until undrain; returns
        {node, draining, moved: [names], failed: [{agent, error}]}."""
        timeout = max(self.timeout, 4 * self.config.timing.call_timeout_s) if timeout is None else timeout
        return await self._control(Kind.DRAIN, None, {"node": node}, timeout)

    async def undrain(self, node: str, timeout: float | None = None) -> dict:
        """`node` takes placements again (its agents do not move back by themselves)."""
        return await self._control(Kind.DRAIN, None, {"node": node, "undrain": True}, timeout)

    async def restart(self, node: str, timeout: float = 120.0) -> dict:
        """Restart `node` with the code on disk, losing no call: drain it (its agents move
        with their state), have its launcher start it again as a new interpreter, wait
        until it is back, undrain it. A rolling restart runs this node after node. Returns
        {node, restarted, moved, failed, old_pid, pid}; when an agent could not be moved
        (`failed`) the node is not restarted and takes placements again."""
        deadline = self.clock.now() + timeout
        drained = await self.drain(node)
        result = {"node": node, "restarted": False, "moved": drained["moved"], "failed": drained["failed"],
                  "old_pid": None, "pid": None}
        try:
            while not result["failed"]:
                try:
                    answer = await self.caller.request(node, Kind.RESTART, None, None, self._left(deadline))
                except Unavailable as err:  # an agent placed there before the drain began is still starting
                    if not err.retryable or self._left(deadline) < 1:
                        raise
                    again = await self.drain(node)
                    result["moved"] += again["moved"]
                    result["failed"] = again["failed"]
                    continue
                result["old_pid"] = answer["pid"]
                result["pid"] = await self._back(node, answer["pid"], deadline)
                result["restarted"] = True
                break
        finally:
            await self._undrain_again(node, deadline)
        return result

    async def _undrain_again(self, node: str, deadline: float) -> None:
        while True:  # a restarted supervisor has forgotten the drain: undraining is then a no-op
            try:
                await self.undrain(node, timeout=max(1.0, self._left(deadline)))
                return
            except Retryable as err:
                if not err.retryable or self._left(deadline) < 1:
                    raise

    async def _back(self, node: str, old_pid: int, deadline: float) -> int:
        """Wait until the supervisor sees `node` alive in a process other than `old_pid`."""
        backoff = Backoff(self.clock, cap_s=0.5)
        while True:
            try:
                st = await self.status(timeout=min(5.0, self._left(deadline)))
                view = next(n for n in st["nodes"] if n["name"] == node)
                if view["alive"] and view["pid"] not in (None, old_pid):
                    return view["pid"]
            except Retryable as err:  # the supervisor's own node is the one restarting
                if not err.retryable:
                    raise
            if self._left(deadline) < 0.2:
                raise CallTimeout(f"node {node} did not come back in a new process in time")
            await backoff.wait(deadline)

    def _left(self, deadline: float) -> float:
        return max(0.0, deadline - self.clock.now())

    async def upgrade(self, kind: str, to: str | None = None, extra: Any = None, rollback: bool = False,
                      timeout: float | None = None) -> dict:
        """New code for every agent of `kind`, one node at a time (see mesh/upgrade.py):
        the kind's module read again from disk, or `to` ("MODULE:CLASS"); with
        `rollback`, the code it ran before. Stops at the first node where an agent could
        not be migrated (it runs on, on its old code with its old state). Returns
        {kind, from_vsn, to_vsn, nodes, agents, migrated, failed}: `nodes` are the nodes
        done, `failed` lists {node, agent, error} (agent None for a node-wide failure).
        Every node first checks the new code against its agents' states, changing
        nothing: a module that does not import, or a code_change that raises, stops the
        upgrade before any node moved."""
        body: dict[str, Any] = {"kind": kind}
        if to is not None:
            body["to"] = to
        if extra is not None:
            body["extra"] = extra
        if rollback:
            body["rollback"] = True
        timeout = max(self.timeout, self.config.timing.handler_timeout_s + 5.0) if timeout is None else timeout
        result: dict[str, Any] = {"kind": kind, "from_vsn": None, "to_vsn": None, "nodes": [], "agents": 0,
                                  "migrated": 0, "failed": []}
        # first every node checks (the code loads, code_change takes every state), then the roll
        for check in (True, False):
            for node in self.config.nodes:
                try:
                    answer = await self.caller.request(node, Kind.UPGRADE, None, {**body, "check": check}, timeout)
                except CallError as err:
                    result["failed"].append({"node": node, "agent": None, "error": f"{type(err).__name__}: {err}"})
                    return result
                if result["from_vsn"] is None:
                    result["from_vsn"] = answer.get("from_vsn")
                result["to_vsn"] = answer.get("to_vsn")
                if not check:
                    result["agents"] += answer.get("agents", 0)
                    result["migrated"] += answer.get("migrated", 0)
                if answer.get("failed"):
                    result["failed"].extend(answer["failed"])
                    return result
                if not check:
                    result["nodes"].append(node)
        return result


def connect(config: Config | str | os.PathLike | None = None, **kw) -> Client:
    """An async client for the mesh described by `config` (a Config or a path)."""
    return Client(config if isinstance(config, Config) else load(config), **kw)


class SyncClient:
    """The same calls as Client, blocking; runs its own loop in a background thread."""

    def __init__(self, config: Config, key: str | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mesh-client", daemon=True)
        self._thread.start()
        try:
            self._client = self._run(self._make(config, key))
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, config: Config, key: str | None) -> Client:
        return Client(config, key=key)

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, name: str, msg: Any, timeout: float | None = None, request_id: str | None = None) -> Any:
        return self._run(self._client.call(name, msg, timeout, request_id))

    def cast(self, name: str, msg: Any) -> None:
        self._run(self._client.cast(name, msg))

    def spawn(self, name: str, kind: str, args: dict | None = None, restart: str = "permanent",
              supervisor: str | None = None) -> dict:
        return self._run(self._client.spawn(name, kind, args, restart, supervisor))

    def spawn_group(self, group: str, kind: str, size: int, args: dict | None = None,
                    restart: str = "permanent", supervisor: str | None = None) -> list[dict]:
        return self._run(self._client.spawn_group(group, kind, size, args, restart, supervisor))

    def call_group(self, group: str, msg: Any, timeout: float | None = None, idempotent: bool = False) -> Any:
        return self._run(self._client.call_group(group, msg, timeout, idempotent))

    def members(self, group: str) -> list[dict]:
        return self._run(self._client.members(group))

    def stop_group(self, group: str) -> list[str]:
        return self._run(self._client.stop_group(group))

    def stop(self, name: str) -> dict:
        return self._run(self._client.stop(name))

    def status(self, **view) -> dict:
        return self._run(self._client.status(**view))

    def drain(self, node: str) -> dict:
        return self._run(self._client.drain(node))

    def undrain(self, node: str) -> dict:
        return self._run(self._client.undrain(node))

    def inspect(self, name: str, max_bytes: int = 2000) -> dict:
        return self._run(self._client.inspect(name, max_bytes))

    def restart(self, node: str, timeout: float = 120.0) -> dict:
        return self._run(self._client.restart(node, timeout))

    def upgrade(self, kind: str, to: str | None = None, extra: Any = None, rollback: bool = False) -> dict:
        return self._run(self._client.upgrade(kind, to, extra, rollback))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


def connect_sync(config: Config | str | os.PathLike | None = None, key: str | None = None) -> SyncClient:
    return SyncClient(config if isinstance(config, Config) else load(config), key)
