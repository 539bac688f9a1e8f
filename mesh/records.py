"""Where the supervisor keeps its records: the epoch, dynamic children, where state lives.

Two homes, one interface (`load`, `get`, `items`, `write`, `begin_epoch`):

  * `LocalRecords`: the supervisor's own host's store (a mesh without `[control]`): a
    restarted supervisor on the same node finds them; a lost host loses them.
  * `EtcdRecords`: etcd (a mesh with `[control]`, G8): a new leader on any host finds
    every record the old one wrote, and no deposed leader can write one. Each write is a
    transaction guarded by the leader's term and by the revision of the previous
    write, and one is in flight at a time: so writes land in order, a repeat of one
    whose answer was lost cannot land after a later one, and a write queued by a
    leader that lost its term fails instead of overwriting the next leader's records.
    Writes made while one is in flight are joined into the next transaction (as the
    store's group commit joins agents' commits), up to etcd's 128 operations per
    transaction.

`write` returns an object whose `error` is None once the records are durable.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack

from .errors import MeshError
from .etcd import MAX_TXN_OPS, Etcd, EtcdError, EtcdUnavailable, delete_op, modified_at, put_op
from .tree import EPOCH_KEY

if TYPE_CHECKING:
    from .leadership import Leadership
    from .node import Node

log = logging.getLogger("mesh.records")


class Deposed(MeshError):
    """A write was refused because this supervisor's term has ended."""


@dataclass(frozen=True)
class Written:
    error: Exception | None = None


class LocalRecords:
    """The records in this node's host store, committed with the node's next group."""

    def __init__(self, node: "Node"):
        self.node = node
        self.writes = 0  # writes asked for (for tests and benchmarks)

    async def load(self) -> None:
        pass  # read straight from the store

    def get(self, key: str) -> bytes | None:
        return self.node.store.get_meta(key)

    def items(self, prefix: str) -> list[tuple[str, bytes]]:
        return list(self.node.store.meta_items(prefix))

    async def begin_epoch(self) -> int:
        """One more than the last supervisor's epoch, recorded before it is used."""
        raw = self.get(EPOCH_KEY)
        epoch = (msgpack.unpackb(raw) if raw else 0) + 1
        outcome = await self.write({EPOCH_KEY: msgpack.packb(epoch)})
        if outcome.error is not None:
            raise outcome.error
        return epoch

    async def write(self, puts: dict[str, bytes], deletes=()):
        self.writes += 1
        return await self.node.commits.commit_meta(puts, deletes)


SEQ_KEY = "sup/seq"  # written by every transaction: its revision orders the next


class EtcdRecords:
    """The records under `prefix` in etcd, written only while `leadership` holds its term."""

    def __init__(self, etcd: Etcd, leadership: "Leadership", prefix: str):
        self.etcd, self.leadership, self.prefix = etcd, leadership, prefix
        self._records: dict[str, bytes] = {}
        self._last = 0  # mod revision of SEQ_KEY after this leader's last write (0: absent)
        self._pending: dict[str, bytes | None] = {}  # key -> value, or None to delete
        self._waiting: list[asyncio.Future] = []
        self._flushing: asyncio.Task | None = None
        self.writes = 0  # transactions sent (for the benchmarks)

    async def load(self) -> None:
        """Read every record (once, as the term begins)."""
        kvs, _ = await self.etcd.range(self.prefix, prefix=True)
        self._records = {kv.key[len(self.prefix):]: kv.value for kv in kvs}
        seq = next((kv for kv in kvs if kv.key == self.prefix + SEQ_KEY), None)
        self._last = seq.mod_revision if seq is not None else 0

    def get(self, key: str) -> bytes | None:
        return self._records.get(key)

    def items(self, prefix: str) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self._records.items() if k.startswith(prefix))

    async def begin_epoch(self) -> int:
        """The term: it grows with every leader, so incarnations of a newer one are newer."""
        return self.leadership.term

    async def write(self, puts: dict[str, bytes], deletes=()) -> Written:
        for key, value in puts.items():
            self._pending[key] = value
        for key in deletes:
            self._pending[key] = None
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())
        return await done

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                waiting, self._waiting = self._waiting, []
                try:
                    error = await self._send(batch)
                except Exception as exc:  # whatever failed, no writer waits forever
                    log.exception("records: a write to etcd failed")
                    error = exc
                for done in waiting:
                    if not done.done():
                        done.set_result(Written(error))
        finally:
            self._flushing = None

    async def _send(self, batch: dict[str, bytes | None]) -> Exception | None:
        keys = list(batch)
        step = MAX_TXN_OPS - 1  # one operation of each transaction moves SEQ_KEY
        for at in range(0, len(keys), step):
            ops = [put_op(self.prefix + k, batch[k]) if batch[k] is not None else delete_op(self.prefix + k)
                   for k in keys[at:at + step]]
            error = await self._txn(ops)
            if error is not None:
                return error
            for k in keys[at:at + step]:
                if batch[k] is None:
                    self._records.pop(k, None)
                else:
                    self._records[k] = batch[k]
        return None

    async def _txn(self, ops: list[dict]) -> Exception | None:
        seq_key = self.prefix + SEQ_KEY
        for _ in range(3):
            if not self.leadership.leading():
                return Deposed(f"term {self.leadership.term} has ended: not written")
            try:
                result = await self.etcd.txn([self.leadership.guard(), modified_at(seq_key, self._last)],
                                             ops + [put_op(seq_key, b"")])
            except EtcdUnavailable as exc:
                if not exc.unknown:
                    return exc  # sent nowhere
                landed = await self._landed(seq_key)  # it may have landed: the order key says
                if landed is not False:
                    return None if landed is True else landed
                continue  # it did not land, and cannot land later: the order key moves first
            except EtcdError as exc:
                return exc
            self.writes += 1
            if result.succeeded:
                self._last = result.revision
                return None
            # refused: the term ended, or an earlier send of these same operations landed late
            landed = await self._landed(seq_key)
            if landed is True:
                return None
            return landed if isinstance(landed, Exception) else Deposed(
                f"term {self.leadership.term} was overtaken: records not written")
        return EtcdUnavailable("records not written: etcd did not answer")

    async def _landed(self, seq_key: str) -> bool | Exception:
        """Whether this term's last transaction landed although its answer was lost: the
        order key moved since, and the leader key is still this term's (only this term
        can move the order key then)."""
        try:
            seq = await self.etcd.get(seq_key)
            leader = await self.etcd.get(self.leadership.key)
        except EtcdError as exc:
            return exc
        if leader is None or leader.create_revision != self.leadership.term:
            return Deposed(f"term {self.leadership.term} has ended: not known to be written")
        moved = seq is not None and seq.mod_revision != self._last
        if moved:
            self._last = seq.mod_revision
        return moved
