"""A host whose disk is full (issue 20's goal: served again within 3 s): its replicas are
replaced by live hosts with room, its agents move off it, and it takes agents again once
it has room. Three hosts, `replicas = 1`, on the in-memory network with a fake clock; the
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


async def home_disk_full(tmp_path):
    """Fill the disk of a host that is home to an agent (not the supervisor's host); one
    append fails there. Returns the cluster, client, the agent's name and the full host."""
    c = await three_hosts(tmp_path)
    m = c.client()
    await ledgers(c, m)
    sup_host = c.cfg.nodes[c.cfg.supervisor_node].host
    name = next(n for n, ch in sorted(c.role.children.items()) if ch.home != sup_host)
    full = c.role.children[name].home
    c.fill_disk(full)
    with pytest.raises(Unavailable, match="disk full"):  # not kept, and said so
        await m.call(name, {"op": "append", "value": "lost"}, request_id="lost-1", timeout=1)
    return c, m, name, full


async def test_an_agent_whose_home_disk_is_full_moves_with_its_history(tmp_path):
    """Before: it stayed on the full host, and every change was refused until the disk had
    room again."""
    c, m, name, full = await home_disk_full(tmp_path)
    answer, took = await served(c, lambda: m.call(name, {"op": "append", "value": "c"}, request_id="c-1"))
    assert answer == 2 and took <= c.cfg.timing.dead_after_s  # within the liveness window
    child = c.role.children[name]
    assert child.home != full and full not in child.replicas
    assert c.cfg.nodes[child.node].host == child.home
    assert await m.call(name, {"op": "read"}) == ["a", "b", "c"]
    assert stored(c, child.replicas[0], name) == {"values": ["a", "b", "c"]}
    old = c.nodes[node_on(c, full)].runners.get(name)
    assert old is None or old.status != "running"  # one incarnation serves the name
    # every agent of the full host moved, and none was placed there
    for n, ch in c.role.children.items():
        assert ch.home != full and full not in ch.replicas, n
        assert await m.call(n, {"op": "read"}) == (["a", "b", "c"] if n == name else ["a", "b"])
    await c.close()


async def test_a_host_whose_disk_has_room_again_takes_agents_again(tmp_path):
    c, m, name, full = await home_disk_full(tmp_path)
    await served(c, lambda: m.call(name, {"op": "append", "value": "c"}, request_id="c-1"))
    node = node_on(c, full)
    await m.spawn("while-full", "ledger")
    assert c.role.children["while-full"].node != node
    c.free_disk(full)
    await c.advance(0.5)
    placed = [await m.spawn(f"after-{i}", "ledger") for i in range(3)]
    assert node in {p["node"] for p in placed}  # the emptiest node is eligible again
    for p in placed:
        assert await m.call(p["name"], {"op": "append", "value": 1}) == 0
    await c.close()


async def test_with_one_host_left_with_room_agents_stay_where_they_are(tmp_path):
    """Two of three hosts full, `replicas = 1`: no host set without a full host is left.
    Nothing is stopped for a move that cannot start: agents serve what needs no commit
    where they are, and their changes again once the disks have room."""
    c = await three_hosts(tmp_path)
    m = c.client()
    await ledgers(c, m)
    sup_host = c.cfg.nodes[c.cfg.supervisor_node].host
    first, second = sorted(h for h in c.cfg.hosts if h != sup_host)
    c.fill_disk(first)
    for name in sorted(c.role.children):  # the first full disk: its agents and copies move
        answer, _ = await served(c, lambda: m.call(name, {"op": "append", "value": "c"}, request_id=f"{name}-c"))
        assert answer == 2
    before = {n: (ch.node, ch.incarnation) for n, ch in c.role.children.items()}
    assert all(first not in (ch.home, *ch.replicas) for ch in c.role.children.values())
    c.fill_disk(second)
    name = next(n for n, ch in sorted(c.role.children.items()) if ch.home == second)
    with pytest.raises(Unavailable, match="disk full"):
        await m.call(name, {"op": "append", "value": "lost"}, request_id="lost-1", timeout=1)
    await c.advance(1.0)
    assert c.role.full_hosts() == {first, second}
    assert {n: (ch.node, ch.incarnation) for n, ch in c.role.children.items()} == before
    assert all(ch.status == "running" for ch in c.role.children.values())
    for n in sorted(c.role.children):
        assert await m.call(n, {"op": "read"}) == ["a", "b", "c"]
    c.free_disk(first)
    c.free_disk(second)
    for n in sorted(c.role.children):
        answer, _ = await served(c, lambda: m.call(n, {"op": "append", "value": "d"}, request_id=f"{n}-d"))
        assert answer == 3
        assert await m.call(n, {"op": "read"}) == ["a", "b", "c", "d"]
    await c.close()


async def test_an_agent_whose_move_found_no_room_is_served_once_a_disk_has_room(tmp_path):
    """Its home and its replica host fill up together: the move decided when the first
    was known full finds the second full too, and the agent waits (no host set without a
    full host is left). Once the replica host has room, it is served from there, with
    every acknowledged change."""
    c = await three_hosts(tmp_path)
    m = c.client()
    await ledgers(c, m)
    sup_host = c.cfg.nodes[c.cfg.supervisor_node].host
    name, child = next((n, ch) for n, ch in sorted(c.role.children.items())
                       if sup_host not in (ch.home, *ch.replicas))
    home, replica = child.home, child.replicas[0]
    c.fill_disk(home)
    c.fill_disk(replica)
    with pytest.raises(Unavailable, match="disk full"):
        await m.call(name, {"op": "append", "value": "lost"}, request_id="lost-1", timeout=1)
    await c.advance(1.0)
    c.free_disk(replica)
    answer, took = await served(c, lambda: m.call(name, {"op": "append", "value": "c"}, request_id="c-1"))
    assert answer == 2
    assert await m.call(name, {"op": "read"}) == ["a", "b", "c"]
    assert home not in (child.home, *child.replicas)
    await c.close()
