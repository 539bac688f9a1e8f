"""Per-peer limits: request rate (a token bucket), requests awaiting an answer, the
time spent decoding a peer's frames, and each peer's share of a loop turn (FairQueue).

A peer over a limit gets `Busy` for that request and the rest of the node serves on;
the mesh's own nodes are not limited. Peers are forgotten when idle (least recently
seen first) so the table stays bounded however many connections come and go.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def take(self, now: float) -> bool:
        """One token if there is one (rate 0 means unlimited)."""
        if self.rate <= 0:
            return True
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class DecodeBudget(TokenBucket):
    """Seconds of decoding a peer may cost: `rate` (a share) per second, `burst` at once.

    Decoding is charged after the fact (its cost is known only then), so a peer may run
    into debt; while in debt its frames are dropped without being read."""

    __slots__ = ()

    def allows(self, now: float) -> bool:
        self.refill(now)
        return self.tokens > 0

    def charge(self, cost: float) -> None:
        self.tokens -= cost


class Peer:
    __slots__ = ("bucket", "open", "decode")

    def __init__(self, bucket: TokenBucket, decode: DecodeBudget):
        self.bucket, self.open, self.decode = bucket, 0, decode


class PeerLimits:
    def __init__(self, rate: float, burst: float, max_open: int, max_peers: int = 100_000,
                 decode_share: float = 0.5, decode_burst: float = 2.0):
        self.rate, self.burst, self.max_open, self.max_peers = rate, burst, max_open, max_peers
        self.decode_share, self.decode_burst = decode_share, decode_burst
        self.peers: OrderedDict[bytes | str, Peer] = OrderedDict()

    def _peer(self, key, now: float) -> Peer:
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = Peer(TokenBucket(self.rate, self.burst, now),
                                          DecodeBudget(self.decode_share, self.decode_burst, now))
            self._evict()
        else:
            self.peers.move_to_end(key)
        return peer

    def may_decode(self, key, now: float) -> bool:
        """Whether a frame of this peer's is worth reading: False while its decoding debt lasts."""
        return self._peer(key, now).decode.allows(now)

    def charge_decode(self, key, seconds: float) -> None:
        peer = self.peers.get(key)
        if peer is not None:
            peer.decode.charge(seconds)

    def admit(self, route: bytes, needs_answer: bool, now: float) -> str | None:
        """None if the request may go on, else why not. Counts it as open if admitted."""
        peer = self._peer(route, now)
        if not peer.bucket.take(now):
            return f"over the request rate limit of {self.rate:g}/s"
        if needs_answer:
            if peer.open >= self.max_open:
                return f"over the limit of {self.max_open} requests awaiting an answer"
            peer.open += 1
        return None

    def answered(self, route: bytes) -> None:
        peer = self.peers.get(route)
        if peer is not None and peer.open > 0:
            peer.open -= 1

    def _evict(self) -> None:
        while len(self.peers) > self.max_peers:
            route, peer = next(iter(self.peers.items()))
            if peer.open:  # still owed answers: keep it, drop the next idle one
                self.peers.move_to_end(route)
                if all(p.open for p in self.peers.values()):
                    return
                continue
            del self.peers[route]


class FairQueue:
    """Requests read from peers and not yet handled: first in, first out per peer, and
    served round-robin across peers, `quantum` at a time. A request waits behind at most
    `quantum` requests of each other peer per round, however many that peer sent (in one
    BATCH or over many connections). Only queues with requests in them are kept."""

    __slots__ = ("quantum", "queues", "ready", "items")

    def __init__(self, quantum: int = 1):
        self.quantum = quantum
        self.queues: dict = {}
        self.ready: deque = deque()  # the peers with queued requests, in serving order
        self.items = 0

    def put(self, peer, item: tuple) -> None:
        queue = self.queues.get(peer)
        if queue is None:
            queue = self.queues[peer] = deque()
            self.ready.append(peer)
        queue.append(item)
        self.items += 1

    def extend(self, peer, items) -> None:
        queue = self.queues.get(peer)
        if queue is None:
            queue = self.queues[peer] = deque()
            self.ready.append(peer)
        before = len(queue)
        queue.extend(items)
        self.items += len(queue) - before

    def serve(self, handle: Callable, limit: int, until: float,
              emptied: Callable[[tuple], None] | None = None) -> int:
        """Call `handle(*item)` for up to `limit` items, round-robin, until `perf_counter()`
        passes `until` (at least one item is served). `emptied(last item)` is told when a
        peer's queue runs empty. Returns how many were served."""
        queues, ready, quantum, clock = self.queues, self.ready, self.quantum, time.perf_counter
        served = 0
        try:
            while ready and served < limit:
                peer = ready.popleft()
                queue = queues[peer]
                n = quantum if ready else limit - served  # alone: nobody else waits
                try:
                    while True:
                        item = queue.popleft()
                        served += 1
                        n -= 1
                        handle(*item)
                        if not queue or n <= 0 or served >= limit or clock() >= until:
                            break
                finally:  # also when `handle` raised: the peer keeps its place and its queue
                    if queue:
                        ready.append(peer)
                    else:
                        del queues[peer]
                if not queue and emptied is not None:
                    emptied(item)
                if clock() >= until:
                    break
        finally:
            self.items -= served
        return served
