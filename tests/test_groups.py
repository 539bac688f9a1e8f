"""Process groups (mesh/groups.py, OTP's pg): members on distinct nodes, a call to the
least loaded member, and failover to another member at once when one cannot take it.
In-memory network, fake clock, real nodes, supervisor and LMDB."""

import asyncio

import pytest

from harness import Cluster, make_config
from kinds import GATES, RUNS
from mesh.errors import BadRequest, Busy, LinkDown, NoSuchAgent
from mesh.groups import CONNECT_S
from mesh.wire import Kind


async def _mesh(tmp_path, mailbox: int = 100):
    c = Cluster(make_config(tmp_path, mailbox=mailbox), tmp_path)
    await c.start()
    return c, c.client()


def _nodes(members: list[dict]) -> list[str]:
    return [m["node"] for m in members]


async def test_members_are_placed_on_distinct_nodes_and_listed(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        for i in range(4):  # other agents first: the group spreads all the same
            await m.spawn(f"other{i}", "counter")
        pool = await m.spawn_group("pool", "counter", 3)
        assert [p["name"] for p in pool] == ["pool.0", "pool.1", "pool.2"]
        assert sorted(_nodes(pool)) == sorted(c.cfg.nodes)
        grown = await m.spawn_group("pool", "counter", 4)  # only the missing member is spawned
        assert grown[:3] == pool and grown[3]["node"] in c.cfg.nodes
        listed = await m.members("pool")
        assert [(x["name"], x["status"], x["kind"]) for x in listed] == [
            (f"pool.{i}", "running", "counter") for i in range(4)]
        assert await m.members("nobody") == []
        with pytest.raises(NoSuchAgent, match="no members"):
            await m.call_group("nobody", {"op": "get"})
    finally:
        await c.close()


async def test_a_group_survives_a_supervisor_restart(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        await m.spawn_group("pool", "counter", 3)
        sup = c.cfg.supervisor_node
        await c.restart(sup)
        await c.run(c.role.ready_event.wait())
        listed = await c.run(m.members("pool"))
        assert [x["name"] for x in listed] == ["pool.0", "pool.1", "pool.2"]
    finally:
        await c.close()


async def test_a_member_that_restarts_goes_where_no_other_member_runs(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        sup = c.cfg.supervisor_node
        pool = await m.spawn_group("pool", "counter", 2)
        lost = next(p for p in pool if p["node"] != sup)
        other = next(p for p in pool if p is not lost)
        c.kill(lost["node"])
        await c.advance(2.0)
        listed = {x["name"]: x for x in await c.run(m.members("pool"))}
        moved = listed[lost["name"]]
        assert moved["status"] == "running" and moved["node"] not in (lost["node"], other["node"])
    finally:
        await c.close()


async def test_a_call_goes_to_the_member_with_fewest_calls_in_flight(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        await m.spawn_group("pool", "waiter", 2)
        held = asyncio.ensure_future(m.call_group("pool", {"op": "wait", "key": "held"}))
        await c.settle()
        busy = [name for name, n in m.groups.in_flight.items() if n]
        assert len(busy) == 1
        for _ in range(5):  # each goes to the other member while the first is held
            assert await m.call_group("pool", {"op": "name"}) != busy[0]
        GATES["held"].set()
        assert await c.run(held) == "released held"
    finally:
        GATES.pop("held", None)
        await c.close()


async def test_a_dead_members_node_is_passed_over_at_once(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        sup = c.cfg.supervisor_node
        pool = await m.spawn_group("pool", "counter", 3)
        for p in pool:  # this client has a connection to each member's node
            await m.call(p["name"], {"op": "get"})
        fresh = c.client()  # this one has none yet
        dead = next(p for p in pool if p["node"] != sup)
        c.kill(dead["node"])
        await c.settle()
        for i in range(20):  # no fake time passes: not one waits for the supervisor to move it
            await asyncio.wait_for(m.call_group("pool", {"op": "add", "n": 1}), 5.0)
        start = c.clock.now()
        for i in range(10):  # the dead node costs a client that never reached it one connect wait
            await c.run(fresh.call_group("pool", {"op": "add", "n": 1}), step=0.01)
        assert c.clock.now() - start < CONNECT_S + 0.2  # once, not once per call
        served = sum([await m.call(p["name"], {"op": "get"}) for p in pool if p is not dead], 0)
        assert served == 30
    finally:
        await c.close()


async def _one_in_flight_off_the_supervisor(c, m, msg: dict, idempotent: bool):
    """A group call held by a member that is not on the supervisor's node (the member
    there looks loaded to this client, so it is not chosen); returns (task, its node)."""
    sup = c.cfg.supervisor_node
    pool = await m.spawn_group("pool", "waiter", 3)
    on_sup = next(p["name"] for p in pool if p["node"] == sup)
    m.groups.in_flight[on_sup] = 1
    task = asyncio.ensure_future(m.call_group("pool", msg, idempotent=idempotent))
    await c.settle()
    holder = next(name for name, n in m.groups.in_flight.items() if n and name != on_sup)
    return task, m.resolver.where(holder)[0]


async def test_a_call_that_may_have_run_on_a_dead_member_is_not_run_again_unless_idempotent(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        task, node = await _one_in_flight_off_the_supervisor(c, m, {"op": "wait", "key": "once"}, False)
        c.kill(node)
        with pytest.raises(LinkDown):
            await c.run(task)
        assert RUNS["once"] == 1
    finally:
        GATES.pop("once", None)
        RUNS.pop("once", None)
        await c.close()


async def test_an_idempotent_call_goes_on_to_another_member_when_its_member_dies(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        task, node = await _one_in_flight_off_the_supervisor(c, m, {"op": "wait", "key": "again"}, True)
        GATES.setdefault("again", asyncio.Event())
        c.kill(node)
        await c.settle()
        assert RUNS["again"] == 2 and not task.done()  # running on another member now
        GATES["again"].set()
        assert await c.run(task) == "released again"
    finally:
        GATES.pop("again", None)
        RUNS.pop("again", None)
        await c.close()


async def test_a_busy_member_passes_the_call_on_and_all_busy_is_busy(tmp_path):
    c, m = await _mesh(tmp_path, mailbox=1)
    try:
        pool = await m.spawn_group("pool", "waiter", 2)
        full, free = pool[0]["name"], pool[1]["name"]
        held = [asyncio.ensure_future(m.call(full, {"op": "wait", "key": "full"})) for _ in range(2)]
        await c.settle()  # one runs, one waits: its mailbox is full
        m.groups.in_flight[free] = 1  # so the full one is asked first
        assert await m.call_group("pool", {"op": "name"}) == free
        held += [asyncio.ensure_future(m.call(free, {"op": "wait", "key": "full"})) for _ in range(2)]
        await c.settle()
        with pytest.raises(Busy, match="every member"):
            await m.call_group("pool", {"op": "name"})
        GATES["full"].set()
        await c.run(asyncio.gather(*held))
    finally:
        GATES.pop("full", None)
        RUNS.pop("full", None)
        await c.close()


async def test_a_bad_group_name_is_refused_and_a_group_is_stopped_whole(tmp_path):
    c, m = await _mesh(tmp_path)
    try:
        node = c.cfg.supervisor_node
        with pytest.raises(BadRequest, match="invalid group name"):
            await m.caller.request(node, Kind.SPAWN, None, {"name": "x", "kind": "counter", "group": "no spaces"}, 1.0)
        await m.spawn_group("pool", "counter", 2)
        assert await m.stop_group("pool") == ["pool.0", "pool.1"]
        assert await m.members("pool") == []
        assert (await m.status(agents=False))["total"] == 0
    finally:
        await c.close()
