"""`mesh drain NODE` / `mesh undrain NODE` (mesh/supervisor_drains.py), deterministically:
in-memory network, fake clock, real LMDB, real nodes and supervisor."""

import asyncio

from harness import Cluster, make_config


async def test_drain_moves_every_agent_off_a_node_under_calls_and_undrain_takes_it_back(tmp_path):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    names = [f"c{i}" for i in range(9)]
    placed = {n: (await m.spawn(n, "counter"))["node"] for n in names}
    victim = next(node for node in c.cfg.nodes if node != c.cfg.supervisor_node and node in placed.values())
    on_victim = sorted(n for n, node in placed.items() if node == victim)
    counts = {n: 0 for n in names}

    async def calls(rounds: int):
        for i in range(rounds):
            replies = await asyncio.gather(*(m.call(n, {"op": "add"}, request_id=f"{n}-{i}-{rounds}")
                                             for n in names))
            for n, value in zip(names, replies):
                counts[n] += 1
                assert value == counts[n]  # each ran once, on the state the last one left
    draining = asyncio.ensure_future(m.drain(victim))
    await c.run(calls(5), limit_s=30)  # calls go on while the agents move; none fails
    result = await c.run(draining, limit_s=30)
    assert result["node"] == victim and result["draining"] is True and result["failed"] == []
    assert sorted(result["moved"]) == on_victim
    assert not c.nodes[victim].runners or all(r.status != "running" for r in c.nodes[victim].runners.values())
    await c.run(calls(2), limit_s=30)
    st = await m.status()
    assert [n["draining"] for n in st["nodes"] if n["name"] == victim] == [True]
    assert all(a["node"] != victim for a in st["agents"])
    # nothing is placed there while it is drained: not a spawn, not a move off a dead node
    assert [(await m.spawn(f"new{i}", "counter"))["node"] for i in range(4)].count(victim) == 0
    other = next(node for node in c.cfg.nodes if node not in (victim, c.cfg.supervisor_node))
    c.kill(other)
    for n in names:
        assert await c.run(m.call(n, {"op": "get"}), limit_s=20) == counts[n]
    st = await m.status()
    assert all(a["node"] == c.cfg.supervisor_node for a in st["agents"])
    assert (await m.undrain(victim)) == {"node": victim, "draining": False}
    assert victim in [(await m.spawn(f"back{i}", "counter"))["node"] for i in range(4)]
    for n in names:  # the moved agents kept their state
        assert await m.call(n, {"op": "get"}) == counts[n]
    await c.close()


async def test_restart_asks_a_drained_node_only_and_undoes_the_drain_when_it_cannot(tmp_path):
    """`mesh restart NODE` (mesh/restarts.py) here stops short of the restart itself: these
    nodes have no launcher. A node still running agents refuses (drain first); one that no
    launcher started refuses for good; either way the node takes placements again."""
    import pytest

    from mesh.errors import Unavailable
    from mesh.wire import Kind
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    placed = {n: (await m.spawn(n, "counter"))["node"] for n in (f"c{i}" for i in range(6))}
    victim = next(node for node in c.cfg.nodes if node != c.cfg.supervisor_node and node in placed.values())
    asked = []
    c.nodes[victim].on_restart = lambda: asked.append(True)
    with pytest.raises(Unavailable) as err:
        await m.caller.request(victim, Kind.RESTART, None, None, 5)
    assert "drain it first" in str(err.value) and err.value.retryable and asked == []
    c.nodes[victim].on_restart = None
    with pytest.raises(Unavailable) as err:
        await c.run(m.restart(victim), limit_s=60)
    assert "not started by a launcher" in str(err.value) and not err.value.retryable
    st = await m.status()
    assert [bool(n.get("draining")) for n in st["nodes"] if n["name"] == victim] == [False]
    for name in placed:  # moved off by the drain, with their state
        assert await m.call(name, {"op": "get"}) == 0
    await c.close()
