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

from harness import Cluster, GatedCommitter, make_config
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


async def test_a_stop_during_a_spawns_start_is_final_and_the_spawns_retry_brings_nothing_back(tmp_path):
    """A stop that lands while the spawn's START is under way is answered stopped. The
    spawn's own answer must be final too: a retryable one made the client send the spawn
    again with its id, and the stopped name ran again (issue 22: kept and undone, both)."""
    from mesh.errors import NoSuchAgent
    from mesh.tree import ChildStatus
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    spawn = asyncio.ensure_future(m.spawn("x", "counter"))  # retries retryable answers by itself
    for _ in range(5000):  # until its START is on its way
        child = c.role.children.get("x")
        if child is not None and child.status == ChildStatus.STARTING:
            break
        await asyncio.sleep(0)
    assert c.role.children["x"].status == ChildStatus.STARTING
    # its START may be handled within a turn (a fresh name reads no state): hold its claim's
    # commit, so that the stop lands while the start is under way
    node = c.nodes[c.role.children["x"].node]
    committer, gate = node.committer, GatedCommitter(node.store)
    node.committer = gate
    stop = asyncio.ensure_future(m.stop("x"))
    await c.settle()
    node.committer = committer
    gate.release()
    spawned, stopped = await asyncio.gather(c.run(spawn), c.run(stop), return_exceptions=True)
    assert stopped == {"name": "x", "stopped": True}
    assert isinstance(spawned, NoSuchAgent) and spawned.data.get("stopped"), spawned
    await c.advance(1.0)
    assert "x" not in c.role.children and incarnations(c, "x") == []
    assert c.role.table.lookup("x") is None
    # the answer is kept for the spawn's id: a later copy of it gets it, and acts not
    assert any(not ok and isinstance(answer, NoSuchAgent) for _, _, ok, answer in c.role.control._done.values())
    await c.close()


async def test_the_first_start_of_a_spawned_name_reads_and_fences_nothing(tmp_path, monkeypatch):
    """A name spawned now has no incarnation anywhere: its START says `fresh` and its node
    commits the claim without a fenced read first. A restart reads (and fences) as ever."""
    from mesh.store import Store
    fenced: list[str] = []
    write = Store.write

    def counting(self, batch):
        fenced.extend(batch.fences)
        return write(self, batch)
    monkeypatch.setattr(Store, "write", counting)
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    placed = await c.run(m.spawn("x", "counter"))
    assert fenced == [] and await c.run(m.call("x", {"op": "add", "n": 3})) == 3
    await c.restart(placed["node"])
    assert await c.run(m.call("x", {"op": "get"})) == 3
    assert "x" in fenced
    await c.close()


async def test_a_fresh_start_is_refused_by_a_fence_a_later_stop_left(tmp_path):
    """A START that a stop overtook (its record deleted, the fence left at the stop's
    incarnation) does not run, fresh or not: the claim's commit meets the fence."""
    from mesh.errors import AlreadyExists
    from mesh.store import Batch
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    node = c.nodes["n2"]
    batch = Batch()
    batch.add_fence("late", 50)
    assert node.store.write(batch).error is None
    body = {"kind": "counter", "incarnation": 40, "supervisor": c.cfg.dynamic_supervisor, "since": 40, "fresh": True}
    try:
        await c.run(c.role.command("n2", Kind.START, "late", body, 5))
        raise AssertionError("a fenced START was answered as started")
    except AlreadyExists as err:
        assert err.data["incarnation"] == 50
    await c.settle()
    assert "late" not in node.runners and incarnations(c, "late") == []
    await c.close()
