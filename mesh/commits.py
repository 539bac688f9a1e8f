"""Commit groups: everything the agents of one node change in one loop turn becomes
durable in one LMDB transaction (on the store's thread, while the next group fills), and
only then do its replies, casts and timers leave (G1); with replica hosts, only once the
copies landed too (G6, see replication.py). One group is in flight at a time, so commits
stay in order and grow with the load.

A group that fails as a whole (a full disk) is no agent's crash: each agent goes back to
its last committed state in place, and whatever was built on the lost change is answered
with the failure (G5). A store that failed to commit says so in the node's hellos and
renewals until a small probe write finds room again, so that the supervisor places
nothing there and moves what it can.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from . import otel, supervision, wire
from .agent import TimerRef
from .errors import AgentDown, BadRequest, CallError, StoreError, Unavailable
from .replies import error_response
from .runner import AgentStatus, Envelope, Runner
from .store import Batch, Outcome, Record, commit_failure
from .wire import Kind

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("mesh.node")

UNSAFE_COMMIT_DELAY_S = 0.05  # with unsafe_reply_before_commit: so that a crash surely loses acknowledged writes
_PROBE_KEY = "node/probe/"    # + node name: the small write that tells whether a full store has room again
_PROBE_VALUE = bytes(4096)     # a page's worth (a full disk may still take it: see _note_store)


class Group:
    """Everything that becomes durable in one transaction, and what waits for it."""

    __slots__ = ("batch", "dirty", "replies", "effects", "callbacks", "replicas", "void", "submitted", "span",
                 "copy_span", "local_done")

    def __init__(self):
        self.batch = Batch()
        self.dirty: set[Runner] = set()
        self.replies: list[tuple[Runner, list, bytes]] = []
        self.effects: list[tuple[Runner, list]] = []
        self.callbacks: list[Callable[[Outcome], None]] = []
        self.replicas: dict[str, tuple[str, ...]] = {}  # name -> its replica hosts, for this batch
        self.void: set[str] = set()  # agents that crashed before this group: nothing of theirs is kept
        self.submitted = 0.0   # when it went to the store (perf_counter)
        self.span = self.copy_span = None  # its commit's and its replication's spans (mesh.otel)
        self.local_done = 0.0  # when its local commit ended, if it is copied to replica hosts

    def __bool__(self) -> bool:
        return bool(self.batch or self.dirty or self.replies or self.effects or self.callbacks)


class Commits:
    """The open commit group of one node, the one in flight, and the store's health."""

    def __init__(self, node: "Node"):
        self.node = node
        self.open = Group()
        self._in_flight: Group | None = None
        self._flush_scheduled = False
        # A commit on this host's store failed (a full disk), and none has succeeded
        # since with room left: said in every hello and renewal, so that the supervisor
        # places nothing here and moves what it can (see note_store).
        self.store_full = False
        self.probing = False

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything handed to the store so far is committed."""
        done = asyncio.Event()
        self.open.callbacks.append(lambda outcome: done.set())
        self.schedule_flush()
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            log.error("node %s: commits did not finish within %ss", self.node.name, timeout)

    def send_response(self, runner: Runner, origins: list, rid: str, response: bytes) -> None:
        """Answer with a tagged response, once the runner's pending changes are committed."""
        group = runner.pending_group
        if group is not None and not self.node._unsafe:
            group.replies.append((runner, origins, rid, response))
            return
        if not self.node.serving():
            response = error_response(AgentDown(f"{runner.name!r}: its node lost its lease"))
        elif runner.superseded:
            response = error_response(AgentDown(f"{runner.name!r} was restarted"))
        elif self.node._served is not None and response[:1] == wire.REPLY_TAG:
            self.node._served.record(runner.name, runner.incarnation)
        frame = wire.response_frame(rid, response)
        for origin in origins:
            self.node._respond(origin, frame)

    async def commit_meta(self, puts: dict[str, bytes], deletes=()) -> Outcome:
        """Make supervisor records durable in the next group; returns the commit's outcome."""
        batch = self.open.batch
        for key, value in puts.items():
            batch.meta_deletes.discard(key)
            batch.meta_puts[key] = value
        for key in deletes:
            batch.meta_puts.pop(key, None)
            batch.meta_deletes.add(key)
        future = asyncio.get_running_loop().create_future()
        self.open.callbacks.append(lambda outcome: future.done() or future.set_result(outcome))
        self.schedule_flush()
        return await future

    def mark_dirty(self, runner: Runner) -> None:
        group = self.open
        group.dirty.add(runner)
        runner.pending_group = group
        self.schedule_flush()

    def queue_effects(self, runner: Runner, effects: list) -> None:
        group = runner.pending_group or self.open
        group.effects.append((runner, effects))
        runner.pending_group = group
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self.node._unsafe:  # the planted bug: acknowledged, and not on disk for a while
                asyncio.get_running_loop().call_later(UNSAFE_COMMIT_DELAY_S, self._flush)
            else:
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._in_flight is not None or not self.open:
            return
        group, self.open = self.open, Group()
        batch = group.batch
        for runner in group.dirty:
            if self.node.runners.get(runner.name) is not runner or runner.name in batch.deletes:
                continue
            if runner.last_state is None:  # crashed since: what it did after its last commit is void
                group.void.add(runner.name)
                continue
            batch.add_put(runner.name, Record(runner.incarnation, runner.seq, runner.last_state, runner.vsn))
            batch.add_replies(runner.name, *runner.take_replies())
            if runner.replicas:
                group.replicas[runner.name] = runner.replicas
        self._in_flight = group
        self.node.stats["commits"] += 1
        group.submitted = time.perf_counter()
        if otel.tracer is not None:
            group.span = self._commit_span(group)
        self.node.committer.submit(batch, lambda outcome: self._committed_here(group, outcome))

    def _commit_span(self, group: Group):
        """A child of the first traced handler whose change it carries, linked to the others."""
        changes = [r.traced_change for r in group.dirty if r.traced_change is not None]
        for runner in group.dirty:
            runner.traced_change = None
        if not changes:
            return None
        return otel.start("commit", otel.context_of(changes[0]),
                          attributes={"mesh.node": self.node.name, "mesh.records": len(group.batch.puts)},
                          links=[otel.link(s) for s in changes[1:]])

    def _committed_here(self, group: Group, outcome: Outcome) -> None:
        """The local commit is done; with replicas, the copies must land before anything
        that depends on them leaves (G6)."""
        took, records = time.perf_counter() - group.submitted, len(group.batch.puts)
        self.node.stats["commit_us"] += int(took * 1e6)  # per group, not per message: kept always
        self.node.stats["commit_records"] += records
        if self.node.metrics is not None:
            self.node.metrics.commit(records, took)
        self.note_store(group.batch, outcome)
        if outcome.error is None and any(group.replicas.values()):
            group.local_done = time.perf_counter()
            if group.span is not None:
                group.copy_span = otel.start("replicate", otel.context_of(group.span),
                                             attributes={"mesh.hosts": sorted({h for hs in group.replicas.values() for h in hs})})
            self.node._spawn(self.node.replication.replicate(group, outcome))
        else:
            self._committed(group, outcome)

    def note_store(self, batch: Batch, outcome: Outcome) -> None:
        """Whether this host's store can commit, as its latest write showed: full after a
        commit that failed (a full disk fails it with ENOSPC, or with EIO when LMDB's write
        was cut short at the disk's end); able again after one that wrote something and
        left the disk some room (a full disk may still take a small commit into pages the
        store freed earlier: that alone does not make it eligible again). The supervisor
        hears a change at once, in a renewal sent now."""
        if outcome.error is not None:
            full = True
        elif batch:
            full = self.store_full and not self.node.store.has_room()
        else:
            return
        if full == self.store_full:
            return
        self.store_full = full
        if full:
            self.node.stats["store_full"] += 1
            log.warning("node %s: the store cannot commit (disk full): telling the supervisor", self.node.name)
        else:
            log.warning("node %s: the store commits again", self.node.name)
        self.node.renew_soon()

    def probe_store(self) -> None:
        """While the store is full, write a page to it once a heartbeat: a host whose agents
        and copies moved away commits nothing else, and this says when it has room again."""
        self.probing = True
        batch = Batch()
        batch.meta_puts[_PROBE_KEY + self.node.name] = _PROBE_VALUE

        def done(outcome: Outcome) -> None:
            self.probing = False
            self.note_store(batch, outcome)
        self.node.committer.submit(batch, done)

    def _committed(self, group: Group, outcome: Outcome) -> None:
        self._in_flight = None
        failed = outcome.error
        if group.local_done and self.node.metrics is not None:
            self.node.metrics.replicated(time.perf_counter() - group.local_done)
        if group.span is not None:
            if group.copy_span is not None:
                otel.end(group.copy_span, failed or (f"not on every replica host: {outcome.unreplicated}"
                                                     if outcome.unreplicated else None))
            otel.end(group.span, failed)
        if failed is not None:
            self.node.stats["commit_errors"] += 1
        fenced = outcome.fenced
        leased = self.node.serving()  # no reply leaves once the lease has lapsed, committed or not
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
                response = error_response(commit_failure(failed))
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
            elif self.node._served is not None and response[:1] == wire.REPLY_TAG:
                self.node._served.record(runner.name, runner.incarnation)
            frame = wire.response_frame(rid, response)
            for origin in origins:
                self.node._respond(origin, frame)
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
            runner = self.node.runners.get(name)
            if runner is not None and runner.incarnation < stored and runner.status != AgentStatus.STARTING:
                self.node.stats["fenced"] += 1
                log.warning("agent %s incarnation %d is fenced by %d: dropped here", name, runner.incarnation, stored)
                was_running = runner.status == AgentStatus.RUNNING
                self.node.incarnations.drop(runner, lambda: AgentDown(f"{name!r} was restarted elsewhere"))
                if was_running:
                    # The supervisor may still count on it here (the newer incarnation's
                    # START failed, say): tell it, so that the name runs somewhere.
                    self.node.incarnations.report_exit(runner, supervision.LOST, f"fenced by incarnation {stored}")
        for runner in group.dirty:
            # Not kept: the agent goes back to its last committed state and serves on. The
            # store's trouble is no fault of the agent's, so it is no crash (G5).
            if failed is None and runner.name not in outcome.failed:
                continue
            if self.node.runners.get(runner.name) is runner and runner.status == AgentStatus.RUNNING:
                self.node.stats["rollbacks"] += 1
                err = commit_failure(failed) if failed is not None else _refused(runner.name, outcome.failed[runner.name])
                if not runner.rollback(err, [r[0] for r in group.batch.replies.get(runner.name, ())]):
                    runner.disown_memory()  # nothing durable to go back to: a restart reads the store
                    runner.crash(failed or StoreError(outcome.failed[runner.name]), supervision.LOST)
        for name, why in outcome.unreplicated.items():
            runner = self.node.runners.get(name)
            if runner is not None and runner.status == AgentStatus.RUNNING:
                # committed here but not on its replica hosts: the supervisor places it again
                # with live replicas (no fault of the agent's: it is moved, not counted)
                runner.disown_memory()
                runner.crash(Unavailable(why), supervision.LOST)
        if self.open:
            self._flush()

    def _note_durable(self, batch: Batch, outcome: Outcome) -> None:
        """Remember, per runner, the state this commit made durable (what a rollback returns to)."""
        for part in (batch.claims, batch.puts):
            for name, record in part.items():
                runner = self.node.runners.get(name)
                if runner is not None and runner.incarnation == record.incarnation \
                        and name not in outcome.fenced and name not in outcome.failed:
                    runner.durable = (record.seq, record.state)

    def discard_pending(self, runner: Runner, err: CallError) -> None:
        """Take a runner's uncommitted work out of the open group: its replies are answered
        with `err`, its put and its effects are dropped."""
        group = self.open
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
                self.node._respond(origin, frame)

    def _release(self, runner: Runner, effects: list) -> None:
        for effect in effects:
            if effect[0] == "cast":
                try:
                    self.node.caller.cast(effect[1], effect[2])
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
            r = self.node.runners.get(name) if self.node.serving() else None
            if ref.cancelled or r is None or r.incarnation != inc:
                return
            r.deliver(Envelope(wire.Msg(Kind.INFO, None, name, f"agent:{name}", None, msg), None, self.node.clock.now(),
                               f"node:{self.node.name}"))
            self.schedule_flush()
        ref._timer = self.node.clock.call_after(delay, fire)


def _refused(name: str, why: str) -> CallError:
    """What a caller hears when the store refused the record of its agent (never retried:
    the same record would be refused again)."""
    return BadRequest(f"{name!r}: the store refused its record: {why}")
