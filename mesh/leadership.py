"""Who supervises the mesh: an election in etcd, and the term that fences the leader (G8).

Candidates (one node per host, from the config's `[control]`) race to create the
leader key with a lease of their own. The winner leads while that lease surely runs
(`etcd_lease.KeptLease`: counted from its keepalives' send times), and the key's create
revision is its **term**: it grows with every new leader, across etcd's own restarts.

The term fences everything a leader does:
  * its writes to etcd are transactions that hold only while the leader key still has
    that create revision (`guard`), so a deposed leader's writes fail in etcd itself;
  * its commands carry the term, and a node refuses a term lower than the highest it
    has seen;
  * incarnation numbers start from it (`placement.next_incarnation`), so a store's
    fence refuses what an older leader started.

A leader whose lease runs out stops acting before etcd lets anyone else win, since its
own count ends first.
"""

from __future__ import annotations

import logging

from .clock import Backoff, Clock
from .etcd import Etcd, EtcdError, EtcdUnavailable, KV, absent, created_at, put_op, range_op
from .etcd_lease import KeptLease

log = logging.getLogger("mesh.leadership")


class Leadership:
    def __init__(self, etcd: Etcd, key: str, identity: bytes, ttl_s: int, clock: Clock):
        self.etcd, self.key, self.identity, self.clock = etcd, key, identity, clock
        self.lease = KeptLease(etcd, ttl_s, clock)
        self.term = 0

    def leading(self) -> bool:
        """Whether this candidate leads now: elected, and its lease surely runs."""
        return self.term > 0 and self.lease.valid()

    def guard(self) -> dict:
        """A txn comparison that holds only while this leader's term lasts."""
        return created_at(self.key, self.term)

    async def campaign(self) -> int:
        """Wait until this candidate leads, and return its term."""
        backoff = Backoff(self.clock)
        while True:
            try:
                if not self.lease.valid():
                    await self.lease.grant()
                result = await self.etcd.txn([absent(self.key)], [put_op(self.key, self.identity, self.lease.id)],
                                             [range_op(self.key)])
                held = None if result.succeeded else (result.kvs(0) or [None])[0]
                if result.succeeded or (held is not None and held.lease == self.lease.id):
                    # won now, or by an earlier attempt whose answer was lost; but the lease
                    # counts from its grant: a slow win (etcd without a leader yet) may find it
                    # out here, and then the term must be renewed before it is used
                    if not self.lease.valid() and not await self.lease.renew():
                        continue  # gone in etcd too (the key with it): campaign again
                    self.term = result.revision if result.succeeded else held.create_revision
                    log.info("leadership: %s leads, term %d", self.identity.decode(errors="replace"), self.term)
                    return self.term
                await self.lease.revoke()  # not needed while someone else leads
                if held is not None:
                    await self._until_gone(held)
                backoff.reset()
            except EtcdError as exc:
                log.debug("leadership: campaign: %s", exc)
                await backoff.wait()

    async def _until_gone(self, held: KV) -> None:
        """Wait until the leader key that `held` shows is deleted (or replaced)."""
        try:
            async for events in self.etcd.watch(self.key, start_revision=held.mod_revision + 1):
                if any(e.kind == "delete" or e.kv.create_revision != held.create_revision for e in events):
                    return
        except EtcdUnavailable:
            return  # campaign again: its txn says whether the key is still held

    async def hold(self) -> None:
        """Keep leading until the term surely ends here; return then (stop acting)."""
        await self.lease.keep()
        log.warning("leadership: term %d ended (its lease ran out)", self.term)
        self.term = 0

    async def resign(self) -> None:
        """End the term now (an orderly stop), so another candidate need not wait for the TTL."""
        self.term = 0
        await self.lease.revoke()


async def current_leader(etcd: Etcd, key: str) -> tuple[bytes, int] | None:
    """The leader's identity and term, or None while there is none."""
    kv = await etcd.get(key)
    return (kv.value, kv.create_revision) if kv is not None else None
