"""Starts that race one another in the supervisor (G3): one name, one incarnation at a time.

A dynamic child exists in the supervisor from the moment SPAWN arrives, and its record is
committed before its first START. Whatever else starts children (a heartbeat's placement
of pending ones, a node's hello) must not start it meanwhile: the spawn would find a
start under way, call its own start failed, forget the child and answer an error, and
the client's retry would spawn the name again elsewhere, while the first incarnation ran
on, unknown to the supervisor, and answered reads from its own state (issue 21: an add
acknowledged by the second incarnation, read back as 0 from the first after a kill).
Deterministic: three nodes of one host on the in-memory network, with a fake clock.
"""

import asyncio

from harness import Cluster, make_config
from test_replication import three_hosts
from mesh.runner import AgentStatus
from mesh.wire import Kind


def incarnations(c: Cluster, name: str) -> list[tuple[str, int]]:
    """Every (node, incarnation) of `name` running anywhere."""
    return sorted((node.name, r.incarnation) for node in c.nodes.values()
                  for r in node.runners.values() if r.name == name and r.status == AgentStatus.RUNNING)


async def test_a_placement_pass_during_a_spawn_starts_no_second_incarnation(tmp_path):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    # one SPAWN, not retried (a client would retry an error with the same id, and win)
    body = {"name": "x", "kind": "counter", "args": {}, "restart": "permanent"}
    spawn = asyncio.ensure_future(m.caller.request(c.cfg.supervisor_node, Kind.SPAWN, None, body, 5))
    for _ in range(1000):  # until the supervisor holds the child, its record not yet committed
        if "x" in c.role.children:
            break
        await asyncio.sleep(0)
    assert "x" in c.role.children and c.role.children["x"].node is None
    c.role.place_pending()  # a heartbeat tick (or a node's hello) lands here
    placed = await c.run(spawn)
    await c.settle()
    child = c.role.children["x"]
    assert (child.node, child.incarnation) == (placed["node"], placed["incarnation"])
    assert incarnations(c, "x") == [(placed["node"], placed["incarnation"])]

    # the kill benchmark's shape: an add, the node killed, the value read back from wherever
    assert await m.call("x", {"op": "add", "n": 22}) == 22
    if placed["node"] != c.cfg.supervisor_node:
        await c.restart(placed["node"])
    assert await c.run(m.call("x", {"op": "get"})) == 22
    now = (c.role.children["x"].node, c.role.children["x"].incarnation)
    for node in c.nodes:  # where a client relocating after a kill may ask: one answer everywhere
        where = await c.run(m.caller.request(node, Kind.WHEREIS, "x", {"after": -1}, 5))
        assert (where["node"], where["incarnation"]) == now
    assert len(incarnations(c, "x")) == 1
    await c.close()


async def test_a_spawn_writes_its_record_and_its_placement_at_once(tmp_path):
    """One write of the supervisor's records per spawn (with [control], one etcd
    transaction, shared with the spawns made at the same moment), not two in a row."""
    c = await three_hosts(tmp_path)  # replicas = 1: each start names a home and a replica
    m = c.client()
    before = c.role.records.writes
    for i in range(5):
        await c.run(m.spawn(f"s{i}", "counter"))
    assert c.role.records.writes - before == 5
    await c.restart(c.cfg.supervisor_node)  # and both reached the store
    await c.role.ready_event.wait()
    for i in range(5):
        child = c.role.children[f"s{i}"]
        assert child.spec.kind == "counter" and child.holders == [(child.home, *child.replicas)]
        assert len(child.replicas) == 1
    await c.close()
