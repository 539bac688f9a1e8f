"""A node's lease: its permission to serve agents, renewed with the supervisor.

The node asks for renewal every heartbeat; when the supervisor grants it, the lease
runs until the node's own *send* time plus the lease length. The supervisor counts a
node's silence from when it *received* the renewal, which is later, and declares the
node dead only after `heartbeat x liveness`, which is longer than a lease. So a node's
own view always expires first: by the time the supervisor moves its agents, the node
has stopped serving them (G3), also when it was frozen (SIGSTOP) or cut off. A node
whose lease lapses drops its agents before it handles another message, and rejoins
with a hello that says so.
"""

from __future__ import annotations

from .clock import Clock


class Lease:
    def __init__(self, clock: Clock, length_s: float):
        self.clock, self.length_s = clock, length_s
        self.until = float("-inf")

    def granted(self, sent_at: float) -> None:
        """A renewal sent at `sent_at` (this node's clock) was granted."""
        self.until = max(self.until, sent_at + self.length_s)

    def valid(self) -> bool:
        return self.clock.now() < self.until

    def revoke(self) -> None:
        self.until = float("-inf")

    def remaining(self) -> float:
        return self.until - self.clock.now()
