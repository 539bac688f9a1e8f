"""Replicated snapshots (G6), deterministically: three hosts, one node each, one store
per host, on the in-memory network with a fake clock."""

import textwrap

import msgpack
import pytest

from harness import Cluster
from mesh import config as config_mod

HOSTS = """
[cluster]
heartbeat_ms = 100
liveness = 4
lease_ms = 300
call_timeout_s = 5

[store]
replicas = {replicas}

[kinds]
counter = "nodes.counter:Counter"
ledger = "nodes.ledger:Ledger"

[hosts.h1]
address = "127.0.0.1"
[hosts.h2]
address = "127.0.0.2"
[hosts.h3]
address = "127.0.0.3"

[nodes.n1]
host = "h1"
port = 1
[nodes.n2]
host = "h2"
port = 1
[nodes.n3]
host = "h3"
port = 1

[supervisor]
node = "n1"
"""


async def three_hosts(tmp_path, replicas=1) -> Cluster:
    path = tmp_path / "hosts.toml"
    path.write_text(textwrap.dedent(HOSTS.format(replicas=replicas)))
    c = Cluster(config_mod.load(path), tmp_path)
    await c.start()
    return c


def stored(c: Cluster, host: str, name: str):
    record = c.stores[host].get(name)
    return None if record is None else msgpack.unpackb(record.state)


async def test_every_acknowledged_commit_is_on_a_replica_host(tmp_path):
    c = await three_hosts(tmp_path)
    m = c.client()
    placed = [await m.spawn(f"l{i}", "ledger") for i in range(6)]
    for p in placed:
        for v in range(3):
            await m.call(p["name"], {"op": "append", "value": v})
    status = {a["name"]: a for a in (await m.status())["agents"]}
    for p in placed:
        home = c.cfg.nodes[status[p["name"]]["node"]].host
        child = c.role.children[p["name"]]
        assert child.home == home and len(child.replicas) == 1 and child.replicas[0] != home
        assert stored(c, home, p["name"]) == stored(c, child.replicas[0], p["name"]) == {"values": [0, 1, 2]}
    await c.close()


async def test_a_lost_host_loses_no_acknowledged_state(tmp_path):
    c = await three_hosts(tmp_path)
    m = c.client()
    placed = [await m.spawn(f"l{i}", "ledger") for i in range(6)]
    victim = next(p["node"] for p in placed if p["node"] != c.cfg.supervisor_node)
    lost = [p["name"] for p in placed if p["node"] == victim]
    for p in placed:
        await m.call(p["name"], {"op": "append", "value": p["name"]})
    c.kill(victim)
    c.stores[c.cfg.nodes[victim].host].env.close()  # the host and its disk are gone
    for name in lost:
        assert await c.run(m.call(name, {"op": "read"})) == [name]
    status = {a["name"]: a for a in (await m.status())["agents"]}
    for name in lost:
        child = c.role.children[name]
        assert status[name]["node"] != victim and child.home != c.cfg.nodes[victim].host
        assert c.cfg.nodes[victim].host not in child.replicas and len(child.replicas) == 1
        assert await m.call(name, {"op": "append", "value": "after"}) == 1
    del c.stores[c.cfg.nodes[victim].host]
    await c.close()


async def test_without_replicas_an_agent_waits_for_its_host(tmp_path):
    c = await three_hosts(tmp_path, replicas=0)
    m = c.client()
    placed = [await m.spawn(f"l{i}", "ledger") for i in range(6)]
    victim = next(p["node"] for p in placed if p["node"] != c.cfg.supervisor_node)
    name = next(p["name"] for p in placed if p["node"] == victim)
    await m.call(name, {"op": "append", "value": "only here"})
    previous = c.kill(victim)
    await c.advance(1.0)
    # its state is only on the dead host: it is not started empty elsewhere
    assert c.role.children[name].status == "pending"
    await c.start_node(victim, previous)
    assert await c.run(m.call(name, {"op": "read"})) == ["only here"]
    await c.close()


async def test_a_replica_host_that_stops_answering_moves_the_copies(tmp_path):
    c = await three_hosts(tmp_path)
    m = c.client()
    placed = [await m.spawn(f"c{i}", "counter") for i in range(6)]
    for p in placed:
        await m.call(p["name"], {"op": "add", "n": 1})
    # a host that is only a replica for some agents: take it away
    replica_host = c.role.children[placed[0]["name"]].replicas[0]
    victim = next(n for n, spec in c.cfg.nodes.items() if spec.host == replica_host)
    if victim == c.cfg.supervisor_node:
        pytest.skip("the replica host is the supervisor's")
    c.kill(victim)
    for p in placed:  # every agent answers again, with a live replica host
        assert await c.run(m.call(p["name"], {"op": "add", "n": 1}, timeout=5)) == 2
    for p in placed:
        assert replica_host not in c.role.children[p["name"]].replicas
    await c.close()


async def test_stop_forgets_the_copies_too(tmp_path):
    c = await three_hosts(tmp_path)
    m = c.client()
    await m.spawn("gone", "counter")
    await m.call("gone", {"op": "add", "n": 3})
    child = c.role.children["gone"]
    holders = [child.home, *child.replicas]
    assert all(stored(c, h, "gone") == {"value": 3} for h in holders)
    await m.stop("gone")
    await c.settle()
    assert all(stored(c, h, "gone") is None for h in holders)
    await m.spawn("gone", "counter")
    assert await m.call("gone", {"op": "get"}) == 0
    await c.close()
