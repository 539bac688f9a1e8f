"""LMDB snapshots: one environment per host directory, group commit, fencing.

Every agent has one record, name -> [format, incarnation, seq, state, vsn]:

    incarnation  the incarnation that wrote it; a write from an older one is refused
    seq          grows with every change the agent commits
    state        the agent's state, msgpack-packed once by the node
    vsn          the version of the kind's code that wrote the state (`Agent.vsn`);
                 a state of version 1 is written as format 2, [2, incarnation, seq,
                 state], without it, which the release before versions reads too

a fence per agent, name -> incarnation: the incarnation about to start read the record
under it, so no older one may write after that read (its write would be lost under the
new incarnation's first record); and the replies it recorded for exactly-once calls, each under its own key
name\0request-id -> [packed response, agent time, kept until, request digest], written once with the commit that
produced it and deleted when it ages out of the agent's window, so a large window costs
nothing per commit. A record's replies are written only if the record itself is (a
fenced, stale incarnation must not leave replies for effects that were never kept).

One agent's bad record never fails the others of its batch: a key LMDB cannot hold
(over 511 bytes) is refused before the transaction and reported per name in
`Outcome.failed`. Only a failure of the transaction itself (a full disk) fails them all.

A node hands the store a `Batch` per loop turn; one thread per process commits batches
one after another, each in one write transaction (fsync on by default), and reports
back to the loop. The loop never holds a write transaction, and is free while the disk
syncs. Several node processes of one host share the environment; LMDB lets one writer
in at a time. The map grows by itself when full. lmdb's exceptions end here: they
become StoreError, SnapshotCorrupt or Fenced.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import lmdb
import msgpack

from .errors import SnapshotCorrupt, StoreError, Unavailable

log = logging.getLogger("mesh.store")

FORMAT = 3
_FORMAT_WITHOUT_VSN = 2  # [2, incarnation, seq, state]: written before kinds had versions (vsn 1)
_AGENTS = b"agents"
_META = b"meta"
_REPLIES = b"replies"
_FENCES = b"fences"
ROOM_AFTER_FULL = 8 << 20  # free bytes a disk that filled up needs before its store counts as able again


@dataclass
class Record:
    incarnation: int
    seq: int
    state: bytes
    vsn: int = 1  # the version of the kind's code that wrote `state`

    def encode(self) -> bytes:
        """Version 1's state in the layout without vsn, which the previous release reads
        too: nodes of both can share a store until a kind is upgraded (docs/protocol.md)."""
        if self.vsn == 1:
            return msgpack.packb([_FORMAT_WITHOUT_VSN, self.incarnation, self.seq, self.state])
        return msgpack.packb([FORMAT, self.incarnation, self.seq, self.state, self.vsn])

    def to_wire(self, name: str) -> list:
        if self.vsn == 1:  # as the previous release sends and reads it
            return [name, self.incarnation, self.seq, self.state]
        return [name, self.incarnation, self.seq, self.state, self.vsn]

    @classmethod
    def from_wire(cls, item: Any) -> tuple[str, "Record"]:
        """A record sent by another node ([name, incarnation, seq, state, vsn?]; a record
        without vsn is version 1's); ValueError if it is not one."""
        if not (isinstance(item, list) and len(item) in (4, 5)):
            raise ValueError("a record is [name, incarnation, seq, state, vsn?]")
        name, inc, seq, state = item[:4]
        vsn = item[4] if len(item) == 5 else 1
        if not (isinstance(name, str) and type(inc) is int and type(seq) is int and isinstance(state, bytes)
                and type(vsn) is int and vsn >= 1):
            raise ValueError(f"bad record for {name!r:.60}")
        return name, cls(inc, seq, state, vsn)

    def newer_than(self, other: "Record | None") -> bool:
        return other is None or (self.incarnation, self.seq) > (other.incarnation, other.seq)


def unpack_state(packed: bytes) -> Any:
    """An agent's state as it was packed: any msgpack map keys (an int key is fine in a
    state), unlike a message off a socket, which must have string keys."""
    return msgpack.unpackb(packed, raw=False, strict_map_key=False)


def decode_record(name: str, raw: bytes) -> Record:
    try:
        value = msgpack.unpackb(raw, raw=False)
        fmt, inc, seq, state, *rest = value
    except Exception as exc:  # any decoding failure means the same: unreadable
        raise SnapshotCorrupt(name, f"{type(exc).__name__}: {exc}"[:200]) from None
    if fmt == _FORMAT_WITHOUT_VSN and not rest:
        vsn = 1
    elif fmt == FORMAT and len(rest) == 1:
        vsn = rest[0]
    else:
        raise SnapshotCorrupt(name, f"unknown record layout (format {fmt!r})")
    if type(inc) is not int or type(seq) is not int or type(state) is not bytes or type(vsn) is not int or vsn < 1:
        raise SnapshotCorrupt(name, f"unknown record layout (format {fmt!r})")
    return Record(inc, seq, state, vsn)


# request id, tagged packed response, agent time recorded, agent time it is kept at least
# until, digest of the request (None in records older than digests). Agent time is the
# agent's own running time (see Runner.agent_now): it moves with the agent between hosts.
Reply = tuple[str, bytes, float, float, "bytes | None"]


def _reply(rid: str, fields: Any) -> Reply:
    """A reply from its stored or sent fields: [response, t] (older stores) or
    [response, t, until, digest]; ValueError if it is neither."""
    if isinstance(fields, (list, tuple)) and len(fields) == 2:
        response, t = fields
        until, digest = t, None
    elif isinstance(fields, (list, tuple)) and len(fields) == 4:
        response, t, until, digest = fields
    else:
        raise ValueError("a recorded reply is [response, time] or [response, time, until, digest]")
    if not (isinstance(rid, str) and isinstance(response, bytes) and isinstance(t, (int, float))
            and isinstance(until, (int, float)) and (digest is None or isinstance(digest, bytes))):
        raise ValueError("a recorded reply has fields of the wrong types")
    return rid, response, float(t), float(until), digest


MAX_KEY_BYTES = 511  # LMDB's default build; Store checks its environment's own figure


def reply_key(name: str, rid: str) -> bytes:
    return name.encode() + b"\0" + rid.encode()


def replies_from_wire(items: Any) -> list[Reply]:
    """Recorded replies sent by another node; ValueError if they are not."""
    out = []
    for item in items or ():
        if not (isinstance(item, list) and item):
            raise ValueError("a recorded reply is [request id, response, time, until, digest]")
        out.append(_reply(item[0], item[1:]))
    return out


@dataclass
class Batch:
    """What one loop turn asks the store to make durable, in one transaction."""

    puts: dict[str, Record] = field(default_factory=dict)   # fenced by incarnation
    claims: dict[str, Record] = field(default_factory=dict)  # a new incarnation's first record
    deletes: dict[str, int] = field(default_factory=dict)   # name -> incarnation deleting (and its replies)
    replies: dict[str, list[Reply]] = field(default_factory=dict)       # name -> replies recorded
    forgotten: dict[str, list[str]] = field(default_factory=dict)       # name -> request ids aged out
    meta_puts: dict[str, bytes] = field(default_factory=dict)
    meta_deletes: set[str] = field(default_factory=set)
    fences: dict[str, int] = field(default_factory=dict)  # name -> incarnation reading it to start

    def __bool__(self) -> bool:
        return bool(self.puts or self.claims or self.deletes or self.replies or self.forgotten
                    or self.meta_puts or self.meta_deletes or self.fences)

    def add_fence(self, name: str, incarnation: int) -> None:
        """Read `name`'s record and replies for `incarnation`, and refuse older writers from then on."""
        self.fences[name] = max(incarnation, self.fences.get(name, -1))

    def add_replies(self, name: str, replies: list[Reply], forgotten: list[str]) -> None:
        if replies:
            self.replies.setdefault(name, []).extend(replies)
        if forgotten:
            self.forgotten.setdefault(name, []).extend(forgotten)

    def add_claim(self, name: str, record: Record) -> None:
        """A new incarnation's first record; it must be newer than the stored one. It
        replaces the recorded replies too: add the ones that go with its state."""
        self.puts.pop(name, None)
        self.deletes.pop(name, None)
        self.claims[name] = record

    def add_put(self, name: str, record: Record) -> None:
        """A newer record of a running incarnation (merged into its claim if in this batch)."""
        claim = self.claims.get(name)
        if claim is not None and claim.incarnation == record.incarnation:
            self.claims[name] = record
        else:
            self.puts[name] = record

    def holds_another_incarnation(self, records: dict[str, Record]) -> bool:
        """Whether this batch holds a record of one of these names by another incarnation."""
        for name, rec in records.items():
            for mine in (self.puts.get(name), self.claims.get(name)):
                if mine is not None and mine.incarnation != rec.incarnation:
                    return True
        return False

    def merge(self, puts: dict[str, Record], claims: dict[str, Record], deletes: dict[str, int],
              replies: dict[str, list[Reply]] | None = None,
              forgotten: dict[str, list[str]] | None = None) -> dict[str, int]:
        """Records another node replicated here; where this batch has the name too, the
        newer record wins. Returns the names whose copy lost to a newer incarnation's in
        this batch, with that incarnation: fenced, as the store would have said, and
        their replies are not kept (they answer for effects that were not). A node never
        merges two incarnations' copies of one name into one batch (holds_another_incarnation):
        an older copy merged first would lose its record to the newer and keep its replies."""
        stale: dict[str, int] = {}

        def newest_incarnation(name: str) -> int:
            return max((r.incarnation for r in (self.puts.get(name), self.claims.get(name)) if r is not None),
                       default=-1)
        for name, rec in puts.items():
            if rec.newer_than(self.puts.get(name)) and rec.newer_than(self.claims.get(name)):
                self.puts[name] = rec
            elif newest_incarnation(name) > rec.incarnation:
                stale[name] = newest_incarnation(name)
        for name, rec in claims.items():
            if rec.newer_than(self.claims.get(name)):
                self.claims[name] = rec
                if name in self.puts and not self.puts[name].newer_than(rec):
                    self.puts.pop(name)  # the claim is written first: an older put must not follow it
            elif newest_incarnation(name) > rec.incarnation:
                stale[name] = newest_incarnation(name)
        for name, inc in deletes.items():
            self.deletes[name] = max(inc, self.deletes.get(name, -1))
        for name, items in (replies or {}).items():
            if name not in stale:
                self.add_replies(name, items, [])
        for name, rids in (forgotten or {}).items():
            if name not in stale:
                self.add_replies(name, [], rids)
        return stale


    def names(self) -> set[str]:
        return (self.puts.keys() | self.claims.keys() | self.deletes.keys() | self.replies.keys()
                | self.forgotten.keys() | self.fences.keys())

    def drop(self, name: str) -> None:
        """Leave everything of `name` out of this batch."""
        for part in (self.puts, self.claims, self.deletes, self.replies, self.forgotten, self.fences):
            part.pop(name, None)

    def oversized(self, max_key: int) -> dict[str, str]:
        """Names whose record or recorded replies would need a key over `max_key` bytes."""
        bad = {}
        for name in self.names():
            size = len(name.encode())
            longest = max((len(r[0].encode()) for r in self.replies.get(name, ())), default=0)
            longest = max(longest, max((len(rid.encode()) for rid in self.forgotten.get(name, ())), default=0))
            if size > max_key or (longest and size + 1 + longest > max_key):
                bad[name] = (f"a store key of {max(size, size + 1 + longest)} bytes exceeds "
                             f"the store's limit of {max_key}")
        return bad


@dataclass
class Outcome:
    fenced: dict[str, int] = field(default_factory=dict)   # name -> the stored incarnation
    failed: dict[str, str] = field(default_factory=dict)   # name -> why its records could not be kept
    error: StoreError | None = None
    unreplicated: dict[str, str] = field(default_factory=dict)  # name -> why a replica host missed it
    read: dict[str, tuple[bytes | None, list]] = field(default_factory=dict)  # fenced names: raw record, replies


class Store:
    """One LMDB environment. Open it only in the process that uses it (never before a fork)."""

    def __init__(self, path: str, map_size_mb: int = 1024, sync: bool = True):
        self.path = path
        self._pid = os.getpid()
        self._resize_lock = threading.Lock()
        try:
            os.makedirs(path, exist_ok=True)
            self.env = lmdb.open(
                path, map_size=map_size_mb << 20, max_dbs=5, sync=sync, metasync=sync,
                max_readers=512, lock=True, subdir=True,
            )
            self.env.reader_check()  # slots of readers that were killed with -9
            self.agents = self.env.open_db(_AGENTS)
            self.meta = self.env.open_db(_META)
            self.replies_db = self.env.open_db(_REPLIES)
            self.fences_db = self.env.open_db(_FENCES)
            self.max_key = self.env.max_key_size()
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from None

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            raise StoreError("an LMDB environment must not be used across a fork")

    # --- reads (any thread) ---------------------------------------------------------------

    def _read(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        self._check_pid()
        with self._resize_lock:
            for _ in range(2):
                try:
                    with self.env.begin() as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # another process grew the map: adopt its size
                except lmdb.Error as exc:
                    raise StoreError(f"read failed: {exc}") from None
        raise StoreError("read failed: the map kept being resized")

    def get(self, name: str) -> Record | None:
        raw = self._read(lambda txn: txn.get(name.encode(), db=self.agents))
        return None if raw is None else decode_record(name, raw)

    def replies(self, name: str) -> list[Reply]:
        """The replies `name` recorded, oldest first."""
        return self._read(lambda txn: self._scan_replies(txn, name))

    def _scan_replies(self, txn, name: str) -> list[Reply]:
        prefix = name.encode() + b"\0"
        out, cur = [], txn.cursor(db=self.replies_db)
        if cur.set_range(prefix):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                try:
                    out.append(_reply(key[len(prefix):].decode(), msgpack.unpackb(value)))
                except Exception:
                    log.error("an unreadable recorded reply of %r is skipped", name)
        return sorted(out, key=lambda r: r[2])

    def get_meta(self, key: str) -> bytes | None:
        return self._read(lambda txn: txn.get(key.encode(), db=self.meta))

    def meta_items(self, prefix: str) -> list[tuple[str, bytes]]:
        p = prefix.encode()

        def scan(txn):
            out, cur = [], txn.cursor(db=self.meta)
            if cur.set_range(p):
                for k, v in cur:
                    if not k.startswith(p):
                        break
                    out.append((k.decode(), bytes(v)))
            return out

        return self._read(scan)

    def names(self) -> list[str]:
        return self._read(lambda txn: [k.decode() for k in txn.cursor(db=self.agents).iternext(values=False)])

    # --- writes (the committer thread) ----------------------------------------------------

    def write(self, batch: Batch) -> Outcome:
        """Apply a batch in one transaction; never raises, reports what happened."""
        self._check_pid()
        failed = batch.oversized(self.max_key)
        for name in failed:
            batch.drop(name)
        for _ in range(8):
            try:
                out = self._write_once(batch)
                out.failed.update(failed)
                return out
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                with self._resize_lock:
                    self.env.set_mapsize(0)
            except (lmdb.Error, OSError) as exc:
                return Outcome(failed=failed, error=_commit_error(exc))
        return Outcome(failed=failed, error=StoreError("commit failed: the map could not be grown enough"))

    def _write_once(self, batch: Batch) -> Outcome:
        out = Outcome()
        with self.env.begin(write=True) as txn:
            for name, inc in batch.fences.items():
                key = name.encode()
                if _fence_of(txn.get(key, db=self.fences_db)) < inc:
                    txn.put(key, msgpack.packb(inc), db=self.fences_db)
                out.read[name] = (txn.get(key, db=self.agents), self._scan_replies(txn, name))
            for name, rec in batch.claims.items():
                key = name.encode()
                stored, fence = self._guards(txn, key)
                if stored >= rec.incarnation or fence > rec.incarnation:
                    out.fenced[name] = max(stored, fence)
                    continue
                txn.put(key, rec.encode(), db=self.agents)
                # The claim brings the replies that go with its state (below); any others
                # here belong to another line of incarnations and must not answer a retry.
                self._delete_replies(txn, name)
            for name, rec in batch.puts.items():
                key = name.encode()
                stored = max(self._guards(txn, key))
                if stored > rec.incarnation:
                    out.fenced[name] = stored
                    continue
                txn.put(key, rec.encode(), db=self.agents)
            for name, inc in batch.deletes.items():
                key = name.encode()
                stored = max(self._guards(txn, key))
                if stored > inc:
                    out.fenced[name] = stored
                    continue
                txn.delete(key, db=self.agents)
                # the fence stays, at the deleting incarnation: a START older than the stop
                # that is still under way must not write the name back
                if _fence_of(txn.get(key, db=self.fences_db)) < inc:
                    txn.put(key, msgpack.packb(inc), db=self.fences_db)
                self._delete_replies(txn, name)
            for name, items in batch.replies.items():
                if name in out.fenced or name in batch.deletes:
                    continue
                for rid, *fields in items:
                    txn.put(reply_key(name, rid), msgpack.packb(fields), db=self.replies_db)
            for name, rids in batch.forgotten.items():
                if name not in out.fenced:
                    for rid in rids:
                        txn.delete(reply_key(name, rid), db=self.replies_db)
            for key, value in batch.meta_puts.items():
                txn.put(key.encode(), value, db=self.meta)
            for key in batch.meta_deletes:
                txn.delete(key.encode(), db=self.meta)
        return out

    def _guards(self, txn, key: bytes) -> tuple[int, int]:
        """The stored record's incarnation and the fence's (-1 for none): a write of an
        older incarnation than either is refused."""
        return _stored_incarnation(txn.get(key, db=self.agents)), _fence_of(txn.get(key, db=self.fences_db))

    def _delete_replies(self, txn, name: str) -> None:
        prefix = name.encode() + b"\0"
        cur = txn.cursor(db=self.replies_db)
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break

    def _grow(self) -> None:
        with self._resize_lock:
            size = self.env.info()["map_size"]
            self.env.set_mapsize(size * 2)
            log.info("store map grown to %d MiB", size * 2 >> 20)

    def has_room(self, need: int = ROOM_AFTER_FULL) -> bool:
        """Whether the filesystem under the store has `need` bytes free (True when it
        cannot tell: the commits themselves then decide)."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize >= need

    def close(self) -> None:
        if os.getpid() == self._pid:
            self.env.close()


_last_error_log = [0.0, 0]  # when the last commit failure was logged, and how many since


def _commit_error(exc: BaseException) -> StoreError:
    """A failed transaction as a StoreError that says why in words a user acts on."""
    text = str(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text
    err = StoreError(f"commit failed: disk full ({text})" if full else f"commit failed: {text}")
    err.disk_full = full
    now = time.monotonic()
    _last_error_log[1] += 1
    if now - _last_error_log[0] >= 5.0:  # one line per 5 s, with a count: a full disk fails every commit
        log.error("%s (%d failed commits since the last report)", err, _last_error_log[1])
        _last_error_log[0], _last_error_log[1] = now, 0
    return err


def _fence_of(raw: bytes | None) -> int:
    try:
        return -1 if raw is None else int(msgpack.unpackb(raw))
    except Exception:
        return -1


def _stored_incarnation(raw: bytes | None) -> int:
    """The incarnation of a stored record ([layout, incarnation, seq, state, ...]), read
    from its first bytes: unpacking the whole record cost each write what the state weighs."""
    if raw is None:
        return -1
    try:
        head = msgpack.Unpacker()
        head.feed(raw[:64])
        if head.read_array_header() < 2:
            return -1
        head.skip()  # the layout version
        incarnation = head.unpack()
        return incarnation if type(incarnation) is int else -1
    except Exception:
        return -1  # unreadable: the node refused to start from it before it came to this


class Committer:
    """Commits batches on one thread, in order; results come back on the loop.

    `inline=True` commits in the loop's own thread (deterministic tests)."""

    def __init__(self, store: Store, inline: bool = False):
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.inline = inline
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._run, name="mesh-committer", daemon=True)
            self._thread.start()

    def submit(self, batch: Batch, done: Callable[[Outcome], None]) -> None:
        if self.inline:
            outcome = self.store.write(batch)
            self.loop.call_soon(done, outcome)
        else:
            self._queue.put((batch, done))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, done = item
            outcome = self.store.write(batch)
            try:
                self.loop.call_soon_threadsafe(done, outcome)
            except RuntimeError:  # the loop closed during shutdown
                return

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)


def commit_failure(failed: StoreError) -> Unavailable:
    """What a caller hears when the commit its reply waited for failed: Unavailable naming
    the cause. Safe to repeat with the same request id, but not at once: the caller's
    library hands it over instead of retrying (a full disk is mended by freeing space)."""
    return Unavailable(f"the store could not commit: {failed}", {"disk_full": failed.disk_full, "retry": False})
