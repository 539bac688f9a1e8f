"""The name table: name -> (node, incarnation), replicated to every node.

The supervisor owns the table (`Table`) and is its only writer. Every change gets the
next sequence number of the supervisor's epoch (its boot id) and is pushed to every node
in one REGISTRY message per loop turn. Each node keeps a `Replica` and resolves names
locally. A replica that sees a gap in the sequence, or a new epoch, stops trusting
itself and asks again (the zguide's Clone pattern), saying which sequence it holds. If
the supervisor still keeps the updates since then (the last `LOG_ITEMS` changes), it
sends them merged into one catch-up (`since`: its size is what changed, not the table);
otherwise a snapshot, in chunks stamped with the sequence it reflects. Updates after
either apply on top.

An entry whose node is None is a name that exists but is not running right now
(restarting, or waiting for a node that its placement allows). Once the root
supervisor gave up, every message says why (`failed`): such a name will not run again
until the supervisor restarts, and nodes answer its callers so at once.
"""

from __future__ import annotations

from collections import Counter, deque
from itertools import islice
from typing import Iterator, NamedTuple

SNAPSHOT_CHUNK = 5000
LOG_ITEMS = 50_000  # changes the supervisor keeps for catch-ups (a snapshot past them)


class Entry(NamedTuple):
    node: str | None
    incarnation: int


class Replica:
    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self.epoch: str | None = None
        self.seq = -1
        self.synced = False
        self.failed: str | None = None  # why the supervision tree gave up, if it did
        self._loading: dict[str, Entry] | None = None
        self._loading_seq = -1

    def lookup(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def apply(self, body: dict) -> bool:
        """Apply one REGISTRY message. Returns False when a snapshot is needed."""
        epoch, seq = body.get("epoch"), body["seq"]
        if "since" in body:
            return self._catch_up(epoch, body["since"], seq, body)
        if "snapshot" in body:
            # Chunks of two snapshots can interleave (a node that came back is sent one on
            # a new connection while an older one still arrives on the old): a chunk older
            # than the snapshot being loaded, or than the table in place, is a straggler.
            # Taken in, it would restart the loading, and a last chunk would then put a
            # part of the table in place as the whole.
            if epoch == self.epoch and (
                    seq < self.seq or (self._loading is not None and seq < self._loading_seq)
                    or (self._loading is None and self.synced and seq == self.seq)):
                return True
            if self._loading is None or seq != self._loading_seq or epoch != self.epoch:
                self._loading, self._loading_seq, self.epoch = {}, seq, epoch
            for item in body["snapshot"]:
                name, node, inc = _entry(item)
                self._loading[name] = Entry(node, inc)
            if body.get("last"):
                self.entries, self.seq, self.synced = self._loading, seq, True
                self.failed = body.get("failed")
                self._loading = None
            return True
        if epoch != self.epoch or not self.synced:
            self.synced = False
            return False
        if seq <= self.seq:
            return True  # already applied
        if seq != self.seq + 1:
            self.synced = False
            return False
        self._apply_updates(body)
        self.seq = seq
        self.failed = body.get("failed", self.failed)
        return True

    def _apply_updates(self, body: dict) -> None:
        for item in body.get("updates") or ():
            name, node, inc = _entry(item)
            if inc < 0:
                self.entries.pop(name, None)
            else:
                self.entries[name] = Entry(node, inc)

    def _catch_up(self, epoch: str | None, since: int, seq: int, body: dict) -> bool:
        """The changes of (since, seq] merged: each name's last value. Applied on a table
        at any sequence in [since, seq] it gives the table at seq."""
        if epoch != self.epoch or since > self.seq:
            self.synced = False
            return False  # not a table this replica holds a part of
        if seq < self.seq or (self._loading is not None and seq < self._loading_seq):
            return True  # older than what is here or on its way
        self._loading = None
        self._apply_updates(body)
        self.seq, self.synced = seq, True
        self.failed = body.get("failed", self.failed)
        return True


def _entry(item) -> tuple[str, str | None, int]:
    name, node, inc = item
    if not isinstance(name, str) or not (node is None or isinstance(node, str)) or type(inc) is not int:
        raise ValueError(f"bad registry entry {item!r:.80}")
    return name, node, inc


class Table:
    """The supervisor's authoritative table; collects changes until `take_updates`."""

    def __init__(self, epoch: str):
        self.epoch = epoch
        self.entries: dict[str, Entry] = {}
        self.seq = 0
        self.running: Counter = Counter()  # node -> names it runs, kept as entries change
        self._changes: dict[str, tuple] = {}
        self._log: deque[tuple[int, list]] = deque()  # (seq, its updates), the last LOG_ITEMS changes
        self._logged = 0
        self.failed: str | None = None
        self._failed_changed = False

    def fail(self, why: str) -> None:
        """The tree gave up: every message from now on says so."""
        self.failed, self._failed_changed = why, True

    def set(self, name: str, node: str | None, incarnation: int) -> None:
        entry = Entry(node, incarnation)
        old = self.entries.get(name)
        if old != entry:
            self._count(old, -1)
            self.entries[name] = entry
            self._count(entry, 1)
            self._changes[name] = (name, node, incarnation)

    def remove(self, name: str) -> None:
        old = self.entries.pop(name, None)
        if old is not None:
            self._count(old, -1)
            self._changes[name] = (name, None, -1)

    def _count(self, entry: Entry | None, n: int) -> None:
        if entry is not None and entry.node is not None:
            self.running[entry.node] += n

    def lookup(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def take_updates(self) -> dict | None:
        """The REGISTRY body for the changes since last time, or None if nothing changed."""
        if not self._changes and not self._failed_changed:
            return None
        self.seq += 1
        updates = list(self._changes.values())
        body = {"epoch": self.epoch, "seq": self.seq, "updates": updates}
        if self.failed is not None:
            body["failed"] = self.failed
        self._changes, self._failed_changed = {}, False
        self._log.append((self.seq, updates))
        self._logged += len(updates)
        while self._logged > LOG_ITEMS and len(self._log) > 1:
            self._logged -= len(self._log.popleft()[1])
        return body

    def catch_up(self, epoch: str | None, since: int) -> dict | None:
        """The changes after `since` merged into one REGISTRY body, or None when a replica
        at that point needs a snapshot (another epoch, or changes no longer kept).
        Call after `take_updates`, so that nothing is left out."""
        if epoch != self.epoch or since > self.seq or (since < self.seq and (not self._log or self._log[0][0] > since + 1)):
            return None
        merged: dict[str, tuple] = {}
        for seq, updates in reversed(self._log):
            if seq <= since:
                break
            for item in updates:
                merged.setdefault(item[0], item)
        body = {"epoch": self.epoch, "seq": self.seq, "since": since, "updates": list(merged.values())}
        if self.failed is not None:
            body["failed"] = self.failed
        return body

    def snapshot(self) -> Iterator[dict]:
        """REGISTRY bodies carrying the whole table as of the current sequence. The table
        is copied at the first one (a copy of a million references: milliseconds); each
        chunk is built when it is taken, so a sender may spread them over loop turns."""
        entries = self.entries.copy()
        seq, epoch = self.seq, self.epoch
        failed = {"failed": self.failed} if self.failed is not None else {}
        if not entries:
            yield {"epoch": epoch, "seq": seq, "snapshot": [], "last": True, **failed}
            return
        items = iter(entries.items())
        for i in range(0, len(entries), SNAPSHOT_CHUNK):
            chunk = [(n, e.node, e.incarnation) for n, e in islice(items, SNAPSHOT_CHUNK)]
            last = i + SNAPSHOT_CHUNK >= len(entries)
            yield {"epoch": epoch, "seq": seq, "snapshot": chunk, "last": last, **(failed if last else {})}
