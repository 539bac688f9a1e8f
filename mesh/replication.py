"""Replication: the copies of every commit of an agent with replica hosts, sent to a node
of each of those hosts and committed there before the commit's replies leave (G6); and
the reads a starting incarnation makes of those copies (FETCH), fenced for it.

A replica host merges the copies that arrive in one loop turn into one transaction, but
never copies of two incarnations of one name (the older one's reply would outlive its
record).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from . import wire
from .errors import AgentCrashed, BadRequest, CallError, SnapshotCorrupt, Unavailable
from .store import Batch, Outcome, Record, decode_record, replies_from_wire
from .wire import Kind

if TYPE_CHECKING:
    from .commits import Group
    from .node import Node, Origin

log = logging.getLogger("mesh.node")


class Replication:
    """Sends one node's copies, and takes and serves the copies other nodes send."""

    def __init__(self, node: "Node"):
        self.node = node
        self._copies: tuple[Batch, list] | None = None  # replicated records of this loop turn

    async def replicate(self, group: Group, outcome: Outcome) -> None:
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
                self.node.stats["replication_failures"] += 1
                for name, their_hosts in group.replicas.items():
                    if host in their_hosts:
                        outcome.unreplicated[name] = f"its replica host {host} did not take the commit ({result})"
            else:
                for name, stored in (result.get("fenced") or {}).items():
                    outcome.fenced[name] = max(stored, outcome.fenced.get(name, -1))
        self.node.commits._committed(group, outcome)

    async def _replicate_to(self, host: str, body: dict) -> dict:
        """Hand one batch of copies to a live node of `host` (they share its store)."""
        last: Exception = Unavailable(f"host {host} has no nodes")
        for spec in self.node.config.nodes_on(host):
            try:
                return await self.node.caller.request(spec.name, Kind.REPLICATE, None, body, self.node.timing.dead_after_s)
            except CallError as err:
                last = err
        raise last

    def on_replicate(self, msg: wire.Msg, origin: Origin) -> None:
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
                self.node.respond_error(origin, msg.id, Unavailable(f"replica commit failed: {outcome.error}"))
            else:
                fenced = {n: i for n, i in outcome.fenced.items() if n in names}
                for n, i in stale.items():  # beaten in this very batch by a newer incarnation's copy
                    fenced[n] = max(i, fenced.get(n, -1))
                self.node.respond(origin, msg.id, {"fenced": fenced})
        # Copies do not queue behind this node's own groups: those may be waiting for
        # copies to land elsewhere, which could be waiting for this one (a deadlock).
        batch, callbacks = self._copies_of_this_turn()
        if batch.holds_another_incarnation({**puts, **claims}):
            # Two incarnations' copies of one name never share a transaction: merged, the
            # older one's record would be dropped and its replies kept, beside a record
            # without its effects. Committed one after the other, the store fences it.
            self.flush_copies()
            batch, callbacks = self._copies_of_this_turn()
        stale.update(batch.merge(puts, claims, deletes, replies, forgotten))
        callbacks.append(done)
        self.node.stats["replicated"] += len(names)

    def _copies_of_this_turn(self) -> tuple[Batch, list]:
        """The batch (and its callbacks) that copies and fenced reads of this loop turn
        share: one commit at the end of the turn, outside this node's own groups."""
        if self._copies is None:
            self._copies = (Batch(), [])
            asyncio.get_running_loop().call_soon(self.flush_copies)
        return self._copies

    def flush_copies(self) -> None:
        if self._copies is None:
            return  # flushed early already (see _on_replicate)
        batch, callbacks = self._copies
        self._copies = None

        def done(outcome: Outcome) -> None:
            self.node.commits.note_store(batch, outcome)
            for cb in callbacks:
                cb(outcome)
        self.node.committer.submit(batch, done)

    def on_fetch(self, msg: wire.Msg, origin: Origin) -> None:
        self.node._spawn(self._fetch(msg, origin))

    async def _fetch(self, msg: wire.Msg, origin: Origin) -> None:
        try:
            record, replies = await self.fenced_read(msg.target, msg.body["incarnation"])
        except CallError as err:
            self.node.respond_error(origin, msg.id, err)
            return
        self.node.respond(origin, msg.id, {"record": record.to_wire(msg.target) if record else None,
                                      "replies": [list(r) for r in replies]})

    async def fenced_read(self, name: str, incarnation: int) -> tuple[Record | None, list]:
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
