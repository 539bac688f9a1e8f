"""Starting children: choosing where (placement.py), recording where their state will
be, sending START until one node takes it, and moving agents off hosts whose disk is full.
"""

from __future__ import annotations

import heapq
import logging
from itertools import islice
from collections import Counter
from typing import Callable

import msgpack

from . import placement
from . import supervision as sv
from .admission import busy
from .errors import AlreadyExists, BadRequest, CallError, CallTimeout, Retryable, Unavailable
from .supervision import ChildSpec
from .tree import LAUNCHES_PER_PASS, MAX_START_BACKOFF_S, PLACE_PREFIX, Child, ChildStatus
from .wire import Kind

log = logging.getLogger("mesh.supervisor")


class Starts:
    """The part of SupervisorRole that starts and places children (a mixin: it shares
    the role's records)."""

    def _new_incarnation(self, at_least: int = 0) -> int:
        inc, self._next = placement.next_incarnation(self.epoch, self._next, at_least)
        return inc

    def _candidates(self, spec: ChildSpec) -> list[str]:
        live = [name for name, view in self.nodes.items() if view.alive and name not in self.draining]
        return placement.candidates(self.config, spec, live, self._full_hosts())

    def _choose_node(self, child: Child, prefer: str | None = None, avoid: str | None = None) -> str | None:
        crowd = self._group_crowd(child) if child.spec.group else (lambda n: 0)
        child.aim = placement.choose_node(self.config, self._candidates(child.spec),
                                          lambda n: self.table.running[n] + self.placing[n], prefer, avoid, crowd)
        return child.aim

    def _group_crowd(self, child: Child) -> Callable[[str], int]:
        """How many other members of `child`'s group each node runs or is starting: a
        group's members go to distinct nodes while there are enough (OTP's pg, spread)."""
        where: Counter = Counter()
        for name in self.groups.get(child.spec.group, ()):
            other = self.children.get(name)
            if other is None or other is child:
                continue
            if other.status in (ChildStatus.RUNNING, ChildStatus.STARTING):
                where[other.node] += 1
            elif other.busy and other.aim is not None:
                where[other.aim] += 1
        return lambda n: where[n]

    def _place_pending(self) -> None:
        """Start every child that should run and is not (after boot, when a node returns,
        and on every heartbeat tick for starts the environment refused earlier)."""
        if not self.ready or self.tree_failed or self.booting or self.stopping:
            return
        now, later = self.clock.now(), self.later
        while later and later[0][0] <= now:  # their backoff is over: due again
            _, _, name, child = heapq.heappop(later)
            if self.children.get(name) is child and child.status == ChildStatus.PENDING:
                self.pending[name] = child
        # Each child leaves the index as it is visited, unless its tree gave up (a pass
        # over 100,000 waiting for a slot or their backoff each tick was most of the loop's
        # time after a node that ran them died): a start under way sets it PENDING again
        # if it fails, which puts it back; one whose backoff runs waits in `later`.
        # At most LAUNCHES_PER_PASS starts are put on their way per pass (they wait for the
        # start slots); the others stay in the index, in order, for the next pass.
        for name in list(islice(self.pending, LAUNCHES_PER_PASS)):
            child = self.pending.pop(name)
            if self.children.get(name) is not child or child.status != ChildStatus.PENDING or child.busy:
                continue
            if self.sups[child.parent].failed:
                self.pending[name] = child
            elif child.next_try > now:
                self._later_seq += 1
                heapq.heappush(later, (child.next_try, self._later_seq, name, child))
            else:
                prefer, avoid = child.hint or (None, None)
                child.hint = None
                self._spawn(self._start_or_crash(child, prefer=prefer, avoid=avoid))
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
                    await self.command(old, Kind.TERMINATE, name, {
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

    async def _start_child(self, child: Child, prefer: str | None = None, avoid: str | None = None,
                           deadline: float | None = None, fresh: bool = False) -> CallError | None:
        """Start one incarnation of `child`; returns the error if it could not be started.
        `deadline`: when its spawn's caller stops waiting; a start whose turn comes after
        that does nothing and says Busy (the caller may send the spawn again). `fresh`: the
        first start of a child spawned now (see _start_once)."""
        if child.busy or self.tree_failed:
            return None  # a start is under way already; or nothing starts in a failed tree
        child.busy = True
        try:
            async with self._start_slots:
                late = self.clock.now() - deadline if deadline is not None else 0.0
                if late > 0:
                    return busy(f"{child.spec.name!r} waited for a start slot {late:.1f}s past its caller's "
                                f"deadline: not started", 2 * late)
                return await self._start_once(child, prefer, avoid, fresh)
        finally:
            child.busy = False

    async def _start_once(self, child: Child, prefer: str | None, avoid: str | None,
                          fresh: bool = False) -> CallError | None:
        """With `fresh` (the child was spawned now and never started), the first START says
        so: no incarnation of it ran anywhere, so its node reads and fences no state (the
        claim's commit is still refused by a fence a stop left). A retry is never fresh:
        the attempt before may have started it."""
        name = child.spec.name
        at_least = child.incarnation
        for attempt in range(5):
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
            if fresh and attempt == 0 and not sources:
                body["fresh"] = True
            try:
                await self.command(node, Kind.START, name, body, self.config.timing.call_timeout_s)
            except AlreadyExists as err:
                log.info("supervisor: starting %s on %s as %d: %s", name, node, inc, err)
                at_least = int(err.data.get("incarnation", at_least))
                continue
            except (Retryable, CallTimeout) as err:  # that node cannot take it now
                log.warning("supervisor: starting %s on %s: %s", name, node, err)
                if isinstance(err, CallTimeout) or err.data.get("maybe_sent"):  # it may have started there
                    self._spawn(self._terminate_instance(node, name, inc, "its start timed out"))
                avoid, prefer = node, None
                continue
            except CallError as err:  # init failed, kind missing, snapshot unreadable
                if body.get("fresh") and isinstance(err, BadRequest) and "'fresh'" in str(err):
                    continue  # a node of the release before: the next attempt is not fresh
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
        never to this supervisor (a lost answer, a restart). A set whose write failed is
        forgotten here too, so that the next start records it again."""
        added = self._add_holders(child, hosts)
        if not added and not child.unrecorded:
            return True
        puts = {**child.unrecorded, PLACE_PREFIX + child.spec.name: self._placement(child)}
        outcome = await self.records.write(puts)
        if outcome.error is not None:
            log.error("supervisor: cannot record where %s keeps its state: %s", child.spec.name, outcome.error)
            if added:
                child.holders.remove(hosts)
            return False
        for key in puts:
            child.unrecorded.pop(key, None)
        return True

    def _placement(self, child: Child) -> bytes:
        """Its record of where its state lives; before its first start is confirmed, the
        set it is being started on (so the confirmation changes nothing to write)."""
        home, replicas = ((child.home, child.replicas) if child.home is not None
                          else (child.holders[-1][0], child.holders[-1][1:]))
        return msgpack.packb({"home": home, "replicas": list(replicas), "holders": [list(h) for h in child.holders]})

    def _placed(self, child: Child, host: str, replicas: tuple[str, ...]) -> None:
        """It started: its state lives on `host` and `replicas` now, and only there (it read
        the newest of every earlier set). Remembered in the store too (for a restart)."""
        current = [(host, *replicas)]
        if (child.home, child.replicas, child.holders) == (host, replicas, current):
            return
        recorded = self._placement(child)
        child.home, child.holders = host, current
        self._set_replicas(child, replicas)
        if self._placement(child) != recorded:  # a first start recorded just this already
            self._spawn(self.records.write({PLACE_PREFIX + child.spec.name: self._placement(child)}))

    async def _terminate_instance(self, node: str, name: str, inc: int, reason: str, forget: bool = False,
                                  replicas: tuple[str, ...] = ()) -> None:
        body = {"incarnation": inc, "reason": reason, "forget": forget}
        if forget and replicas:
            body["replicas"] = list(replicas)  # the copies go too
        try:
            await self.command(node, Kind.TERMINATE, name, body, self.config.timing.call_timeout_s)
        except CallError as err:
            log.warning("supervisor: terminating %s on %s: %s", name, node, err)

    # --- public seams: one step of the above at a time, for tests and tools --------------------

    def place_pending(self) -> None:
        """One placement pass now, as each heartbeat tick and a node's hello make: start
        every child that should run and is not, and move what full disks hold."""
        self._place_pending()

    def full_hosts(self) -> set[str]:
        """Hosts whose disk is full, as their live nodes last said: placed on last."""
        return self._full_hosts()

    def sources(self, child: Child, host: str) -> list[list[str]] | None:
        """Where a start of `child` on `host` would read its newest state (placement.sources):
        one group of live nodes per holder set without `host`; None if a set has none."""
        return self._sources(child, host)

    async def note_holders(self, child: Child, hosts: tuple[str, ...]) -> bool:
        """Record, as a START about to leave does, that `hosts` may hold `child`'s newest
        state; False if that could not be committed."""
        return await self._note_holders(child, hosts)

    def placed(self, child: Child, host: str, replicas: tuple[str, ...]) -> None:
        """Record, as a confirmed START does, that `child`'s state lives on `host` and
        `replicas` alone."""
        self._placed(child, host, replicas)
