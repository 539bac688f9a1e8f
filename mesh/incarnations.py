"""Incarnations on one node: starting one on the supervisor's word (from this host's
record, or the newest of the copies other hosts hold), terminating one (its `terminate`
callback, and with a stop its record deleted and fenced), and an agent's own stop.

A START names the incarnation and the sources that may hold the newest acknowledged
state; every read of them is fenced for the new incarnation (see store), so no older
incarnation acknowledges anything after it. A stop remembers its incarnation: a START
older than it that is still under way fails (`stopped_after`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

import msgpack

from . import wire
from .agent import Agent
from .errors import (AgentCrashed, AgentDown, AlreadyExists, BadRequest, CallError, NoSuchAgent,
                     SnapshotCorrupt, Unavailable)
from .runner import AgentStatus, Runner
from .store import Outcome, Record, commit_failure, replies_from_wire, unpack_state
from .upgrade import code_changed, kind_vsn
from .wire import Kind

if TYPE_CHECKING:
    from .node import Node, Origin

log = logging.getLogger("mesh.node")


class Incarnations:
    """The starts and ends of incarnations on one node (the node carries out the I/O)."""

    def __init__(self, node: "Node"):
        self.node = node
        self._stops: OrderedDict[str, int] = OrderedDict()  # name -> the incarnation its latest stop took

    def kind_class(self, kind: str) -> type[Agent]:
        """The class this node runs for `kind` (upgrade.py keeps it, and changes it)."""
        return self.node.upgrades.kind_class(kind)

    def on_start(self, msg: wire.Msg, origin: Origin) -> None:
        name, body = msg.target, msg.body
        inc = body["incarnation"]
        if self.node.stopping:
            raise Unavailable(f"node {self.node.name} is shutting down")
        if not self.node.serving():
            # The supervisor answers a HELLO (granting the lease) before it sends STARTs,
            # but on another connection: a START may overtake that answer. It waits for it.
            if not self.node._hellos_in_flight:
                raise Unavailable(f"node {self.node.name} holds no lease")
            self.node._parked_starts.append((msg, origin))
            return
        old = self.node.runners.get(name)
        if old is not None and old.incarnation >= inc:
            raise AlreadyExists(f"{name!r} already runs incarnation {old.incarnation} here",
                                {"incarnation": old.incarnation})
        self.kind_class(body["kind"])  # refuse unknown kinds before anything else
        if old is None and body.get("fresh") is True and not body.get("sources"):
            # the first start of a name spawned now: no incarnation of it ran anywhere, so no
            # state to read and none older to fence; its claim's commit is checked against
            # the store's fence all the same (a stop that overtook this START refuses it)
            self._begin(msg, origin, None, None)
            return
        if old is not None and old.status in (AgentStatus.RUNNING, AgentStatus.STARTING):
            self._stop_quietly(old)
        self.node._spawn(self._start_from_copies(msg, origin))

    async def _start_from_copies(self, msg: wire.Msg, origin: Origin) -> None:
        try:
            copy = await self._newest_copy(msg.target, msg.body.get("sources") or [], msg.body["incarnation"])
            if copy[0] is not None and copy[0].incarnation < msg.body.get("since", 0):
                # older than the spawn of this agent: an earlier agent's of the same name,
                # left on a host its stop could not reach, never this one's state
                log.warning("node %s: %s starts from nothing: the record found (incarnation %d) is older than "
                            "its spawn (%d)", self.node.name, msg.target, copy[0].incarnation, msg.body["since"])
                copy = (None, [])
            old = self.node.runners.get(msg.target)
            if old is not None and old.incarnation < msg.body.get("since", 0):
                # the same: an earlier agent of the name ran here. Neither its state nor
                # the messages that waited for it (a burst of its calls) are this one's.
                old.disown_memory()
                old.fail_queued(lambda: NoSuchAgent(f"{msg.target!r} was stopped; another agent of "
                                                    f"the name runs now"), forward=False)
            self._begin(msg, origin, copy, old, copied=bool(msg.body.get("sources")))
        except CallError as err:
            self.node.respond_error(origin, msg.id, err)
        self.node.commits.schedule_flush()

    async def _newest_copy(self, name: str, sources: list, incarnation: int) -> tuple[Record | None, list]:
        """The newest snapshot of `name` (and its recorded replies) among this host's store
        and the source nodes', each read fenced for `incarnation`. `sources` holds groups of
        nodes, one group per set of hosts that may hold the newest acknowledged state: every
        acknowledged commit is on each host of its set, so one answer per group is enough
        (and, being fenced, no older incarnation acknowledges anything more); none is not."""
        mine = self.node.spec.host
        groups = [[n for n in group if isinstance(n, str) and n in self.node.config.nodes]
                  for group in sources if isinstance(group, list)]
        if len(groups) != len(sources):
            raise BadRequest("sources must be lists of node names")
        remote = sorted({n for group in groups for n in group if self.node.config.nodes[n].host != mine})
        answered = {self.node.name}  # this host's store counts for a group that names a node of it

        async def fetch(node: str):
            return await self.node.caller.request(node, Kind.FETCH, name, {"incarnation": incarnation},
                                             min(self.node.timing.call_timeout_s, 2.0))
        if not remote:  # the common case: no task per start for a gather of one
            best, best_replies = await self.node.replication.fenced_read(name, incarnation)
            results = []
        else:
            mine_read, *results = await asyncio.gather(self.node.replication.fenced_read(name, incarnation),
                                                       *(fetch(n) for n in remote), return_exceptions=True)
            if isinstance(mine_read, BaseException):
                raise mine_read
            best, best_replies = mine_read
        for node, result in zip(remote, results):
            if isinstance(result, BaseException):
                log.warning("node %s: no copy of %s from %s: %s", self.node.name, name, node, result)
                continue
            if isinstance(result, dict) and result.get("record") is not None:
                try:
                    _, record = Record.from_wire(result["record"])
                    replies = replies_from_wire(result.get("replies"))
                except ValueError as exc:
                    log.warning("node %s: bad copy of %s from %s: %s", self.node.name, name, node, exc)
                    continue
                if record.newer_than(best):
                    best, best_replies = record, replies
            answered.add(node)
        missing = [group for group in groups
                   if not any(n in answered or self.node.config.nodes[n].host == mine for n in group)]
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
            old.disown_memory()  # a later incarnation ran elsewhere: its record wins over this one's memory
        inc = body["incarnation"]
        if self.node.stopping:
            raise Unavailable(f"node {self.node.name} is shutting down")
        if self.stopped_after(name, inc):
            raise AlreadyExists(f"{name!r} was stopped after incarnation {inc} was sent",
                                {"incarnation": self._stops[name]})
        current = self.node.runners.get(name)
        if current is not None and current.incarnation >= inc:
            raise AlreadyExists(f"{name!r} already runs incarnation {current.incarnation} here",
                                {"incarnation": current.incarnation})
        cls = self.kind_class(body["kind"])
        if old is not None and old.last_state is not None:
            seq, state, window, mailbox, inflight = old.seq, old.last_state, old.window, old.mailbox, old.inflight
            state_vsn = old.vsn
            waiting = old.waiting
            restarts = old.restarts + 1
            log.info("node %s: %s incarnation %d starts from incarnation %d's last state (seq %d)",
                     self.node.name, name, inc, old.incarnation, seq)
        else:
            if old is not None:
                old.superseded = True  # the new incarnation starts from the store, not from it
            log.info("node %s: %s incarnation %d starts from %s", self.node.name, name, inc,
                     f"incarnation {record.incarnation}'s record (seq {record.seq}){' fetched' if copied else ''}"
                     if record else "nothing")
            if record is not None and record.incarnation >= inc:
                raise AlreadyExists(f"{name!r}: the store holds incarnation {record.incarnation}",
                                    {"incarnation": record.incarnation})
            seq, state = (record.seq, record.state) if record else (0, msgpack.packb(None))
            state_vsn = record.vsn if record else kind_vsn(cls)
            window = OrderedDict((reply[0], reply[1:]) for reply in replies)
            mailbox, inflight, waiting = (old.mailbox, old.inflight, old.waiting) if old is not None else (None, {}, {})
            restarts = old.restarts + 1 if old is not None else 0
        code_vsn = kind_vsn(cls)
        if state_vsn > code_vsn:  # never read by code that does not know its shape
            log.warning("node %s: %s not started here: its state was written by version %d of %s, and this "
                        "node runs version %d", self.node.name, name, state_vsn, body["kind"], code_vsn)
            raise Unavailable(f"{name!r}: its state was written by version {state_vsn} of kind {body['kind']!r}, "
                              f"newer than the code on node {self.node.name} (version {code_vsn})",
                              {"vsn": state_vsn, "node_vsn": code_vsn})
        runner = Runner(self.node, name, body["kind"], body.get("args") or {}, inc)
        runner.vsn = code_vsn
        runner.seq, runner.mailbox, runner.inflight, runner.restarts = seq, mailbox, inflight, restarts
        runner.waiting = waiting
        runner.supervisor = body.get("supervisor")
        runner.since = body.get("since", 0)
        runner.replicas = tuple(h for h in body.get("replicas") or () if h in self.node.config.hosts and h != self.node.spec.host)
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
            if restored is not None and state_vsn < code_vsn:  # a snapshot of older code: migrated first
                restored = unpack_state(code_changed(agent, state_vsn, restored, None))
                log.info("node %s: %s migrated from version %d to %d by code_change", self.node.name, name,
                         state_vsn, code_vsn)
        except Exception as exc:
            self.node.stats["init_failures"] += 1
            raise AgentCrashed(f"{name}: code_change from version {state_vsn} failed: {type(exc).__name__}: {exc}"[:500],
                               {"exception": type(exc).__name__}) from None
        try:
            agent.state = agent.init(runner.args, restored)
            if asyncio.iscoroutine(agent.state):
                agent.state.close()
                raise TypeError("init must not be async")
            packed = msgpack.packb(agent.state)
        except Exception as exc:
            self.node.stats["init_failures"] += 1
            raise AgentCrashed(f"{name}: init failed: {type(exc).__name__}: {exc}"[:500],
                               {"exception": type(exc).__name__}) from None
        runner.begin(agent, packed)
        self.node.runners[name] = runner
        group = self.node.commits.open
        group.batch.add_claim(name, Record(inc, seq, packed, code_vsn))
        # the replies that go with this state, and only those, to this host and its replicas
        group.batch.add_replies(name, [(rid, *entry) for rid, entry in runner.window.items()], [])
        group.replicas[name] = runner.replicas
        runner.pending_group = group
        group.callbacks.append(lambda outcome: self._started(runner, origin, msg.id, outcome))
        self.node.commits.schedule_flush()

    def _started(self, runner: Runner, origin: Origin, rid: str, outcome: Outcome) -> None:
        if runner.pending_group is not None and runner.pending_group is not self.node.commits.open:
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
            log.info("node %s: %s incarnation %d not started: %s", self.node.name, name, runner.incarnation, err)
            if self.node.runners.get(name) is runner:
                del self.node.runners[name]
            runner.fail_queued(lambda: AgentDown(f"{name!r} failed to start"))
            self.node.respond_error(origin, rid, err)
            return
        if self.node.runners.get(name) is not runner:
            self.node.respond_error(origin, rid, AgentDown(f"{name!r} was stopped while starting"))
            return
        if self.stopped_after(name, runner.incarnation):  # a stop came while it started: it ends here
            self.drop(runner, lambda: NoSuchAgent(f"{name!r} was stopped"))
            self.node.respond_error(origin, rid, AlreadyExists(f"{name!r} was stopped while starting",
                                                          {"incarnation": self._stops[name]}))
            return
        self.node.respond(origin, rid, {"node": self.node.name, "incarnation": runner.incarnation})
        runner.started()
        self.node.commits.schedule_flush()

    def _stop_quietly(self, runner: Runner) -> None:
        """End an incarnation without its terminate callback (it is being replaced)."""
        runner.interrupt()
        runner.end()

    def on_terminate(self, msg: wire.Msg, origin: Origin) -> None:
        """End the incarnation named, and any older one of the name here. With `forget`
        (a stop) the record is deleted too, fenced at the stop's incarnation, and every
        START older than it is refused from then on, also one already under way."""
        name, body = msg.target, msg.body
        runner = self.node.runners.get(name)
        forget = bool(body.get("forget"))
        hosts = tuple(h for h in body.get("replicas") or () if h in self.node.config.hosts and h != self.node.spec.host)
        if forget:
            self._note_stop(name, body["incarnation"])
        if runner is None or runner.incarnation > body["incarnation"]:
            if forget:
                self.node.commits.open.batch.deletes[name] = body["incarnation"]
                self.node.commits.open.replicas[name] = hosts
                self.node.commits.open.callbacks.append(lambda outcome: self._answer_stop(origin, msg.id, outcome, name))
                self.node.commits.schedule_flush()
            else:
                self.node.respond(origin, msg.id, {"stopped": False})
            return
        self.node._spawn(self._terminate(runner, body.get("reason") or "shutdown", forget, origin, msg.id, hosts,
                                    body["incarnation"]))

    def _note_stop(self, name: str, incarnation: int) -> None:
        """Remember a stop, so that a START older than it that is still under way fails."""
        self._stops[name] = max(incarnation, self._stops.get(name, -1))
        self._stops.move_to_end(name)
        while len(self._stops) > 100_000:
            self._stops.popitem(last=False)  # the store's fence refuses those STARTs all the same

    def stopped_after(self, name: str, incarnation: int) -> bool:
        return self._stops.get(name, -1) > incarnation

    def _answer_stop(self, origin: Origin, rid: str, outcome: Outcome, name: str) -> None:
        if outcome.error is not None:
            self.node.respond_error(origin, rid, Unavailable(f"the stop of {name!r} could not be committed: {outcome.error}"))
        elif name in outcome.unreplicated:
            self.node.respond_error(origin, rid, Unavailable(f"the stop of {name!r}: {outcome.unreplicated[name]}"))
        elif name in outcome.fenced:
            self.node.respond(origin, rid, {"stopped": False})  # a newer incarnation (a new spawn) owns it
        else:
            self.node.respond(origin, rid, {"stopped": True})

    async def _terminate(self, runner: Runner, reason: str, forget: bool, origin: Origin, rid: str,
                         hosts: tuple[str, ...] = (), stop_at: int | None = None) -> None:
        if runner.task is not None:
            runner.interrupt()
            await asyncio.sleep(0)
        if runner.status == AgentStatus.RUNNING and runner.agent is not None:
            await self.terminate_agent(runner, reason)
            self.node.commits.mark_dirty(runner)
        runner.end()
        if forget:
            self.drop(runner, lambda: NoSuchAgent(f"{runner.name!r} was stopped"))
            self.node.commits.open.batch.deletes[runner.name] = max(runner.incarnation, stop_at or -1)
            self.node.commits.open.replicas[runner.name] = tuple(set(hosts) | set(runner.replicas))
        done = asyncio.get_running_loop().create_future()
        self.node.commits.open.callbacks.append(lambda outcome: done.done() or done.set_result(outcome))
        self.node.commits.schedule_flush()
        outcome = await done
        if forget:
            self._answer_stop(origin, rid, outcome, runner.name)
        elif outcome.error is not None:  # ended all the same: only what terminate changed is not kept
            self.node.respond_error(origin, rid, commit_failure(outcome.error))
        else:
            self.node.respond(origin, rid, {"stopped": True})

    async def terminate_agent(self, runner: Runner, reason: str) -> None:
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
        runner.keep(packed)

    def stop_runner(self, runner: Runner, reason: str, how: str) -> None:
        """The agent asked to stop: terminate it in order, then tell the supervisor."""
        async def stop():
            if runner.agent is not None:
                await self.terminate_agent(runner, reason)
                self.node.commits.mark_dirty(runner)
            runner.end()
            self.report_exit(runner, how, reason)
        runner.hold()
        self.node._spawn(stop())

    def drop(self, runner: Runner, make_error: Callable[[], CallError]) -> None:
        runner.superseded = True
        if self.node.runners.get(runner.name) is runner:
            del self.node.runners[runner.name]
        runner.interrupt()
        runner.hold()
        runner.fail_queued(make_error)
        self.node.busy_runners.discard(runner)

    def report_exit(self, runner: Runner, how: str, reason: str) -> None:
        body = {"name": runner.name, "incarnation": runner.incarnation, "how": how,
                "reason": reason if isinstance(reason, str) else repr(reason)[:500], "node": self.node.name}
        try:
            self.node.send(self.node.supervisor_node, wire.encode(Kind.EXIT, None, None, f"node:{self.node.name}", None, body))
        except CallError as err:
            log.warning("could not report the exit of %s: %s", runner.name, err)
