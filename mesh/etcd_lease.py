"""An etcd lease kept alive, and how long its holder may surely count on it.

Both a node's permission to serve and the supervisor's leadership are etcd leases
(G3, G8). The holder's own view must lapse first: etcd counts a lease's TTL from when a
keepalive *arrived*, so the holder counts it from when it *sent* the keepalive, which
is earlier, and stops acting once that runs out, whatever it believes about etcd. By
the time etcd expires the lease (and so lets anyone else act in its place), the holder
has stopped. This assumes only that the two monotonic clocks run at about the same rate.
"""

from __future__ import annotations

import asyncio
import logging

from .clock import Clock
from .etcd import Etcd, EtcdError

log = logging.getLogger("mesh.etcd")

RETRY_S = 0.05  # the wait before another keepalive after one failed


class KeptLease:
    """One etcd lease of `ttl_s` seconds, renewed every `ttl_s / 3` by `keep`."""

    def __init__(self, etcd: Etcd, ttl_s: int, clock: Clock):
        if ttl_s < 1:
            raise ValueError("an etcd lease lasts at least one second")
        self.etcd, self.ttl_s, self.clock = etcd, ttl_s, clock
        self.id = 0
        self.until = float("-inf")

    async def grant(self) -> int:
        """A new lease; it counts from this send time."""
        sent = self.clock.now()
        self.id = await self.etcd.grant(self.ttl_s)
        self.until = sent + self.ttl_s
        return self.id

    def valid(self) -> bool:
        return self.clock.now() < self.until

    def remaining(self) -> float:
        return self.until - self.clock.now()

    async def renew(self) -> bool:
        """One keepalive; False once the lease is gone in etcd or surely run out here."""
        sent = self.clock.now()
        try:  # a member whose etcd leader just died holds a request for seconds: ask another soon
            ttl = await self.etcd.keepalive(self.id, timeout_s=max(0.05, min(self.ttl_s / 4, self.remaining())))
        except EtcdError as exc:
            log.debug("lease %x: keepalive failed: %s", self.id, exc)
            return self.valid()
        if ttl <= 0:
            self.until = float("-inf")
            return False
        self.until = max(self.until, sent + min(ttl, self.ttl_s))
        return self.valid()

    async def keep(self) -> None:
        """Renew until the lease is lost, and return the moment it is: its holder must
        stop acting then, also while a keepalive is still on its way."""
        keep_ahead = self.ttl_s * 2 / 3  # renew once a third of the lease is spent
        failed = False
        while True:
            # due when a third is spent since the last send; at once if a slow grant or
            # win already spent more (waiting a full interval would let it run out)
            due = max(0.0, self.remaining() - keep_ahead)
            await asyncio.sleep(min(RETRY_S, max(0.0, self.remaining())) if failed else due)
            if not self.valid():
                return
            before = self.until
            try:
                if not await asyncio.wait_for(self.renew(), timeout=self.remaining()):
                    return
            except asyncio.TimeoutError:
                return
            failed = self.until <= before  # a failed keepalive is tried again soon

    async def revoke(self) -> None:
        """Give the lease up now (an orderly stop): others need not wait for its TTL."""
        self.until = float("-inf")
        if self.id:
            try:
                await self.etcd.revoke(self.id)
            except EtcdError as exc:
                log.debug("lease %x: revoke failed (it expires on its own): %s", self.id, exc)
