"""Where a restarted agent finds its newest state: every host set that may hold it.

An incarnation keeps each acknowledged commit on its home host and its replicas. A
START whose answer the supervisor never got (lost, or the supervisor restarted) may
still have run and acknowledged commits on its own host set, so the supervisor records
that set before the START leaves and the next incarnation reads one host of each set.
Deterministic: three hosts on the in-memory network with a fake clock.
"""

import msgpack
import pytest

from mesh.errors import Unavailable
from mesh.store import Batch, Record
from mesh.wire import Kind
from test_replication import three_hosts


def put(c, host: str, name: str, inc: int, seq: int, value: int) -> None:
    batch = Batch()
    batch.add_put(name, Record(inc, seq, msgpack.packb({"value": value})))
    assert c.stores[host].write(batch).error is None


async def start(c, node: str, name: str, inc: int, sources: list) -> dict:
    body = {"kind": "counter", "incarnation": inc, "replicas": [], "sources": sources}
    return await c.run(c.role.node.caller.request(node, Kind.START, name, body, 5))


def named(c, node: str, name: str) -> dict:
    """A call's meta naming the incarnation that runs on `node` (calls must name it)."""
    return {"inc": c.nodes[node].runners[name].incarnation}


async def get(c, node: str, name: str):
    return await c.run(c.role.node.caller.request(node, Kind.CALL, name, {"op": "get"}, 5, meta=named(c, node, name)))


async def test_an_unanswered_start_counts_where_the_state_may_be_until_a_start_is_confirmed(tmp_path):
    c = await three_hosts(tmp_path)
    m = c.client()
    await m.spawn("x", "counter")
    await m.call("x", {"op": "add", "n": 1})
    child = c.role.children["x"]
    first = (child.home, *child.replicas)
    assert child.holders == [first]
    home, replica = first
    other = next(h for h in c.cfg.hosts if h not in first)
    # a START to `other` with `replica` as its copy leaves, and its answer never comes back:
    # a later start on `home` must not take its own store for the newest state
    assert await c.role.note_holders(child, (other, replica))
    node_of = {spec.host: name for name, spec in c.cfg.nodes.items()}
    assert c.role.sources(child, home) == [sorted([node_of[other], node_of[replica]])]
    assert c.role.sources(child, replica) == []  # in every set: its own store has the newest

    await c.restart(c.cfg.supervisor_node)  # the record outlives the supervisor
    await c.role.ready_event.wait()
    assert c.role.children["x"].holders == [first, (other, replica)]

    c.role.placed(c.role.children["x"], other, (replica,))  # a START confirmed: that set alone
    assert c.role.children["x"].holders == [(other, replica)]
    await c.close()


async def test_a_start_reads_one_host_of_every_set_and_keeps_the_newest(tmp_path):
    c = await three_hosts(tmp_path, replicas=0)
    put(c, "h2", "x", 1_000_000_005, 3, 3)
    put(c, "h3", "x", 1_000_000_007, 4, 4)  # a later incarnation, elsewhere
    await start(c, "n1", "x", 1_000_000_009, [["n2"], ["n3"]])
    assert await get(c, "n1", "x") == 4

    put(c, "h2", "y", 1_000_000_005, 3, 3)
    c.freeze("n3")
    with pytest.raises(Unavailable, match="n3"):  # one set did not answer: no start from a guess
        await start(c, "n1", "y", 1_000_000_010, [["n2"], ["n3"]])
    await start(c, "n1", "y", 1_000_000_011, [["n2", "n3"]])  # one answer covers one set
    assert await get(c, "n1", "y") == 3
    c.thaw("n3")
    await c.close()


async def test_a_newer_copy_wins_over_the_memory_of_an_older_incarnation_here(tmp_path):
    c = await three_hosts(tmp_path, replicas=0)
    await start(c, "n1", "x", 1_000_000_005, [])
    await c.run(c.role.node.caller.request("n1", Kind.CALL, "x", {"op": "add", "n": 1}, 5, meta=named(c, "n1", "x")))
    with pytest.raises(Exception, match="asked to crash"):
        await c.run(c.role.node.caller.request("n1", Kind.CALL, "x", {"op": "crash"}, 5, meta=named(c, "n1", "x")))
    assert c.nodes["n1"].runners["x"].last_state is not None  # kept for a restart in place
    put(c, "h2", "x", 1_000_000_007, 9, 5)  # meanwhile a later incarnation ran on h2
    await start(c, "n1", "x", 1_000_000_009, [["n2"]])
    assert await get(c, "n1", "x") == 5
    await c.close()


async def test_an_older_incarnation_acknowledges_nothing_once_a_newer_one_read_its_state(tmp_path):
    """Two incarnations at once (a START whose answer was lost, say): the new one's read
    fences every host it read, so the old one's next commit is refused, not acknowledged
    and then overwritten by the new one's first record."""
    from mesh.errors import AgentDown
    c = await three_hosts(tmp_path, replicas=0)
    await start(c, "n2", "x", 1_000_000_005, [])
    call = c.role.node.caller.request
    old = named(c, "n2", "x")
    assert await c.run(call("n2", Kind.CALL, "x", {"op": "add", "n": 1}, 5, meta=old)) == 1
    await start(c, "n1", "x", 1_000_000_009, [["n2"]])  # h1 keeps its state; h2 is only read
    with pytest.raises(AgentDown, match="restarted elsewhere"):
        await c.run(call("n2", Kind.CALL, "x", {"op": "add", "n": 1}, 5, meta=old))
    assert "x" not in c.nodes["n2"].runners
    assert await get(c, "n1", "x") == 1
    await c.close()


async def test_a_host_set_whose_record_failed_is_recorded_by_the_next_start(tmp_path):
    c = await three_hosts(tmp_path)
    m = c.client()
    await m.spawn("x", "counter")
    child = c.role.children["x"]
    first = (child.home, *child.replicas)
    other = next(h for h in c.cfg.hosts if h not in first)
    sup_host = c.cfg.nodes[c.cfg.supervisor_node].host
    c.fill_disk(sup_host)  # the supervisor's records cannot be written
    assert not await c.role.note_holders(child, (other, first[1]))
    assert child.holders == [first]  # not recorded: not counted as recorded either
    c.free_disk(sup_host)
    assert await c.role.note_holders(child, (other, first[1]))  # so this start records it

    await c.restart(c.cfg.supervisor_node)
    await c.role.ready_event.wait()
    assert c.role.children["x"].holders == [first, (other, first[1])]
    await c.close()
