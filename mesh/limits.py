"""Per-peer limits: request rate (a token bucket) and requests awaiting an answer.

A peer over a limit gets `Busy` for that request and the rest of the node serves on;
the mesh's own nodes are not limited. Peers are forgotten when idle (least recently
seen first) so the table stays bounded however many connections come and go.
"""

from __future__ import annotations

from collections import OrderedDict


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def take(self, now: float) -> bool:
        """One token if there is one (rate 0 means unlimited)."""
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Peer:
    __slots__ = ("bucket", "open")

    def __init__(self, bucket: TokenBucket):
        self.bucket, self.open = bucket, 0


class PeerLimits:
    def __init__(self, rate: float, burst: float, max_open: int, max_peers: int = 100_000):
        self.rate, self.burst, self.max_open, self.max_peers = rate, burst, max_open, max_peers
        self.peers: OrderedDict[bytes, Peer] = OrderedDict()

    def admit(self, route: bytes, needs_answer: bool, now: float) -> str | None:
        """None if the request may go on, else why not. Counts it as open if admitted."""
        peer = self.peers.get(route)
        if peer is None:
            peer = self.peers[route] = Peer(TokenBucket(self.rate, self.burst, now))
            self._evict()
        else:
            self.peers.move_to_end(route)
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
