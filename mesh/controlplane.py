"""A node's part of the control plane ([control], G3 and G8): its own lease in etcd, who
leads, its candidacy, and on the leader the view of which nodes hold a lease.

Without [control] a node serves under a lease the supervisor grants, so the loss of the
supervisor's host ends every lease. With it, a node holds its lease in etcd itself and
keeps it alive there: agents on every host serve on while leadership moves. The safety
argument is the same as before, with etcd in the supervisor's place: the node counts its
lease from each keepalive's *send* time, etcd from its arrival, so a node cut off from
etcd's majority stops serving before etcd expires its key; and only when that key is
gone does the leader start the node's agents elsewhere.

Keys, under the cluster's prefix:
  leader        the leader's node name, held by the leader's lease; its create revision
                is the term (`leadership`)
  nodes/NAME    {boot, host, hold}, held by the node's lease (`hold` counts the leases of
                this boot: a node that lost one drops its agents and takes a new one)
  sup/...       the supervisor's records (`records.EtcdRecords`)

A node refuses the supervisor's commands (START, TERMINATE, INVENTORY, REGISTRY) from a
term older than the newest it has seen. A leader whose term ends stops its node's
process: the launcher starts a fresh one, which campaigns again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Callable

import msgpack

from .clock import Backoff
from .errors import BadRequest, Unavailable
from .etcd import Etcd, EtcdError, KV
from .etcd_lease import KeptLease
from .leadership import Leadership
from .records import EtcdRecords

if TYPE_CHECKING:
    from . import wire
    from .control_settings import ControlSettings
    from .node import Node

log = logging.getLogger("mesh.control")

LEADER_KEY = "leader"
NODES_PREFIX = "nodes/"
DEPOSED_EXIT = 75  # a leader whose term ended: its launcher starts its node again


class ControlPlane:
    def __init__(self, node: "Node", settings: "ControlSettings"):
        self.node, self.settings = node, settings
        self.etcd = Etcd(settings.endpoints, settings.timeout_s, settings.ssl_context(node.spec.host, node.config.path))
        self.lease = KeptLease(self.etcd, settings.lease_s, node.clock)
        self.leader: str | None = None   # the node that leads, as last seen in etcd
        self.term = 0                    # the newest term seen: older commands are refused
        self.holds = 0                   # leases this boot has taken, in turn
        self.leadership = (Leadership(self.etcd, settings.prefix + LEADER_KEY, node.name.encode(),
                                      settings.lease_s, node.clock)
                           if node.name in settings.candidates else None)
        self.live: dict[str, dict] = {}  # on the leader: node -> its key's value, for nodes holding a lease
        self.on_node_gone: Callable[[str, dict], None] | None = None  # the leader's supervisor hears of it
        self._nodes_revision = 0
        self._tasks: list[asyncio.Task] = []

    def key(self, suffix: str) -> str:
        return self.settings.prefix + suffix

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._hold_lease()))
        self._tasks.append(asyncio.ensure_future(self._follow_leader()))
        if self.leadership is not None:
            self._tasks.append(asyncio.ensure_future(self._campaign()))

    async def stop(self, resign: bool = True) -> None:
        """An orderly stop: give the lease and any leadership up at once, so nobody waits
        for their TTLs. When the whole mesh stops, the leader keeps its term to the end
        (`resign=False`): another candidate elected meanwhile would start the agents again."""
        for task in self._tasks:
            task.cancel()
        if resign and self.leadership is not None and self.leadership.term:
            await self.leadership.resign()
        await self.lease.revoke()
        await self.etcd.close()

    # --- this node's lease ---------------------------------------------------------------------

    async def _hold_lease(self) -> None:
        backoff = Backoff(self.node.clock)
        while not self.node.stopping:
            try:
                await self.lease.grant()
                self.holds += 1
                value = msgpack.packb({"boot": self.node.boot, "host": self.node.spec.host, "hold": self.holds})
                await self.etcd.put(self.key(NODES_PREFIX + self.node.name), value, lease=self.lease.id)
            except EtcdError as exc:
                log.warning("node %s: no lease from etcd: %s", self.node.name, exc)
                await backoff.wait()
                continue
            backoff.reset()
            log.info("node %s: holds lease %x (hold %d)", self.node.name, self.lease.id, self.holds)
            self.node.lease_taken()
            await self.lease.keep()
            if self.node.stopping:
                return
            self.node.serving()  # drops its agents now, not at its next message
            asyncio.ensure_future(self._let_go(self.lease.id))

    async def _let_go(self, lease: int) -> None:
        """Revoke a lease this node stopped counting on (it may still run in etcd)."""
        try:
            await self.etcd.revoke(lease)
        except EtcdError:
            pass  # it expires on its own

    # --- who leads -----------------------------------------------------------------------------

    async def _follow_leader(self) -> None:
        backoff = Backoff(self.node.clock)
        while not self.node.stopping:
            try:
                kvs, revision = await self.etcd.range(self.key(LEADER_KEY))
                self._saw_leader(kvs[0] if kvs else None)
                async for events in self.etcd.watch(self.key(LEADER_KEY), start_revision=revision + 1):
                    backoff.reset()
                    for event in events:
                        self._saw_leader(event.kv if event.kind == "put" else None)
            except EtcdError as exc:
                log.debug("node %s: following the leader: %s", self.node.name, exc)
                await backoff.wait()

    def _saw_leader(self, kv: KV | None) -> None:
        before = self.leader
        self.leader = kv.value.decode(errors="replace") if kv is not None else None
        if kv is not None:
            self.term = max(self.term, kv.create_revision)
        if self.leader is not None and self.leader != before:
            log.info("node %s: %s leads (term %d)", self.node.name, self.leader, self.term)
            self.node.leader_changed()

    def check_term(self, msg: "wire.Msg") -> None:
        """Refuse a supervisor's command from a term older than the newest seen here."""
        term = msg.meta.get("term") if msg.meta else None
        if type(term) is not int:
            raise BadRequest(f"{msg.kind.name} without the term of the leader that sent it")
        if term < self.term:
            self.node.stats["stale_term"] += 1
            raise Unavailable(f"{msg.kind.name} from term {term}, which term {self.term} has replaced",
                              {"term": self.term, "retry": False})
        self.term = term

    # --- leading -------------------------------------------------------------------------------

    async def _campaign(self) -> None:
        term = await self.leadership.campaign()
        self.term = max(self.term, term)
        backoff = Backoff(self.node.clock)
        while True:  # no view of the leases, no leading: a node missing from it would be moved
            try:
                await self._learn_nodes()
                break
            except EtcdError as exc:
                log.warning("node %s: reading the nodes' leases: %s", self.node.name, exc)
                await backoff.wait()
        self.node.lead(EtcdRecords(self.etcd, self.leadership, self.settings.prefix))
        self._tasks.append(asyncio.ensure_future(self._watch_nodes()))
        await self.leadership.hold()
        if not self.node.stopping:
            log.error("node %s: its term as leader ended (no keepalive reached etcd in time): "
                      "stopping, to start again as a candidate", self.node.name)
            os._exit(DEPOSED_EXIT)

    async def _learn_nodes(self) -> None:
        kvs, self._nodes_revision = await self.etcd.range(self.key(NODES_PREFIX), prefix=True)
        self.live = {kv.key.rsplit("/", 1)[1]: _value(kv, kv.lease) for kv in kvs}

    async def evict(self, name: str) -> bool:
        """Revoke a node's lease (it is silent to the leader, yet keeps its lease alive).
        It may serve on until its own count runs out, up to `lease_s` from now."""
        lease = self.live.get(name, {}).get("lease")
        if not lease:
            return False
        try:
            await self.etcd.revoke(lease)
        except EtcdError as exc:
            log.warning("node %s: cannot revoke the lease of node %s: %s", self.node.name, name, exc)
            return False
        return True

    def live_nodes(self) -> set[str]:
        return set(self.live)

    async def _watch_nodes(self) -> None:
        """The leader's view of the nodes: a node whose key is gone holds no lease, so it
        serves nothing any more; its agents may start elsewhere at once."""
        backoff = Backoff(self.node.clock)
        revision = self._nodes_revision
        while not self.node.stopping:
            try:
                async for events in self.etcd.watch(self.key(NODES_PREFIX), prefix=True,
                                                    start_revision=revision + 1):
                    backoff.reset()
                    for event in events:
                        revision = event.kv.mod_revision
                        name = event.kv.key.rsplit("/", 1)[1]
                        if event.kind == "put":
                            self.live[name] = _value(event.kv, event.kv.lease)
                        else:
                            gone = self.live.pop(name, None) or (_value(event.prev) if event.prev else {})
                            if self.on_node_gone is not None:
                                self.on_node_gone(name, gone)
            except EtcdError as exc:
                log.warning("node %s: watching the nodes' leases: %s", self.node.name, exc)
                await backoff.wait()
                before = dict(self.live)
                try:
                    await self._learn_nodes()  # what changed meanwhile
                except EtcdError:
                    continue
                revision = self._nodes_revision
                for name in before.keys() - self.live.keys():
                    if self.on_node_gone is not None:
                        self.on_node_gone(name, before[name])


def _value(kv: KV, lease: int = 0) -> dict:
    """A node key's value, with the lease that holds it."""
    try:
        value = msgpack.unpackb(kv.value, raw=False)
    except Exception:
        value = None
    value = value if isinstance(value, dict) else {}
    value["lease"] = lease
    return value
