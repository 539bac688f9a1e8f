"""A host whose disk is full (issue 20's goal: served again within 3 s): its replicas are
replaced by live hosts with room. Three hosts, `replicas = 1`, on the in-memory network with a fake clock; the
disk is "full" when every commit on that host's store fails as ENOSPC does."""

import pytest

from mesh.errors import Unavailable
from test_replication import stored, three_hosts

GOAL_S = 3.0


async def served(c, call, limit_s: float = GOAL_S):
    """Repeat `call()` (one request id) until it is answered, as a client does after an
    Unavailable; returns its answer and the fake seconds it took."""
    start = c.clock.now()
    while True:
        try:
            return await c.run(call(), limit_s=max(0.1, limit_s - (c.clock.now() - start))), c.clock.now() - start
        except Unavailable:
            if c.clock.now() - start >= limit_s:
                raise
            await c.advance(0.05)


async def ledgers(c, m, n: int = 6) -> None:
    for i in range(n):
        await m.spawn(f"l{i}", "ledger")
        for v in ("a", "b"):
            await m.call(f"l{i}", {"op": "append", "value": v})


def node_on(c, host: str) -> str:
    return next(n for n, spec in c.cfg.nodes.items() if spec.host == host)


async def test_a_replica_host_whose_disk_is_full_is_replaced_by_a_live_one(tmp_path):
    """Before: the agent was restarted with the same replica host over and over (every
    start's copy failed there) and went unserved as long as the disk stayed full."""
    c = await three_hosts(tmp_path)
    m = c.client()
    await ledgers(c, m)
    sup_host = c.cfg.nodes[c.cfg.supervisor_node].host
    name, child = next((n, ch) for n, ch in sorted(c.role.children.items()) if ch.replicas[0] != sup_host)
    full = child.replicas[0]
    c.fill_disk(full)
    answer, took = await served(c, lambda: m.call(name, {"op": "append", "value": "c"}, request_id="c-1"))
    assert answer == 2 and took <= c.cfg.timing.dead_after_s  # within the liveness window
    assert full not in child.replicas and len(child.replicas) == 1
    assert stored(c, child.home, name) == stored(c, child.replicas[0], name) == {"values": ["a", "b", "c"]}
    assert await m.call(name, {"op": "append", "value": "c"}, request_id="c-1") == 2  # not twice
    assert await m.call(name, {"op": "read"}) == ["a", "b", "c"]
    await c.close()
