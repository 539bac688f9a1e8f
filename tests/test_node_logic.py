"""Node and supervisor logic, deterministic: in-memory network, fake clock, real LMDB."""

import asyncio

import msgpack
import pytest

import kinds
from harness import Cluster, GatedCommitter, make_config
from mesh import wire
from mesh.errors import (AgentCrashed, AgentDown, AlreadyExists, BadRequest, Busy, CallTimeout,
                         NoSuchAgent, NotAllowed, SupervisorDown)
from mesh.store import Batch, Committer, Record
from mesh.wire import Kind


@pytest.fixture
def cluster_factory(tmp_path):
    made = []

    async def make(extra: str = "", mailbox: int = 100, nodes=None, limits: str = "") -> Cluster:
        c = Cluster(make_config(tmp_path, extra, mailbox, limits), tmp_path)
        made.append(c)
        await c.start(*(nodes or ()))
        return c
    yield make
    kinds.GATES.clear()
    kinds.RUNS.clear()
    kinds.BROKEN.clear()
    kinds.STARTS.clear()


async def closing(cluster):
    await cluster.close()


# --- calls, durability, exactly-once ---------------------------------------------------------

async def test_spawn_call_cast_and_state_in_the_store(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter", {"start": 10})
    assert placed["name"] == "c1" and placed["node"] in c.nodes
    assert await m.call("c1", {"op": "add", "n": 5}) == 15
    await m.cast("c1", {"op": "add", "n": 1})
    assert await m.call("c1", {"op": "get"}) == 16
    record = c.stores["h1"].get("c1")
    assert msgpack.unpackb(record.state) == {"value": 16}
    assert record.incarnation == placed["incarnation"]
    await c.close()


async def test_reply_leaves_only_after_its_state_is_committed(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter")
    node = c.nodes[placed["node"]]
    gate = node.committer = GatedCommitter(node.store)
    add = asyncio.ensure_future(m.call("c1", {"op": "add", "n": 3}))
    await c.settle()
    assert not add.done() and len(gate.held) == 1          # handled, but not answered
    assert msgpack.unpackb(node.store.get("c1").state) == {"value": 0}
    get = asyncio.ensure_future(m.call("c1", {"op": "get"}))
    await c.settle()
    assert not get.done()                                  # a read of uncommitted state waits too
    gate.release()
    assert await add == 3 and await get == 3
    assert msgpack.unpackb(node.store.get("c1").state) == {"value": 3}
    # a read with nothing pending is answered without any commit
    assert await m.call("c1", {"op": "get"}) == 3 and gate.held == []
    node.committer = Committer(node.store, inline=True)
    await c.close()


async def test_repeated_request_id_returns_the_recorded_reply(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("l1", "ledger")
    first = await m.call("l1", {"op": "append", "value": "x"}, request_id="req-1")
    again = await m.call("l1", {"op": "append", "value": "x"}, request_id="req-1")
    assert first == again == 0
    assert await m.call("l1", {"op": "read"}) == ["x"]
    await c.close()


async def test_recorded_replies_survive_a_node_kill(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("l1", "ledger")
    assert await m.call("l1", {"op": "append", "value": "a"}, request_id="r-a") == 0
    await c.restart(placed["node"])
    assert await m.call("l1", {"op": "append", "value": "a"}, request_id="r-a") == 0
    assert await m.call("l1", {"op": "read"}) == ["a"]
    await c.close()


async def test_dedup_window_is_bounded_but_never_below_its_minimum_age(cluster_factory):
    c = await cluster_factory(limits="dedup_min_s = 10")  # dedup_window = 8
    m = c.client()
    await m.spawn("l1", "ledger")
    for i in range(12):
        await m.call("l1", {"op": "append", "value": i}, request_id=f"r{i}")
    assert await m.call("l1", {"op": "append", "value": 0}, request_id="r0") == 0  # 12 > 8, all young
    await c.advance(11)
    await m.call("l1", {"op": "append", "value": 12}, request_id="r12")  # now the window is trimmed to 8
    assert await m.call("l1", {"op": "append", "value": 11}, request_id="r11") == 11
    assert await m.call("l1", {"op": "append", "value": 0}, request_id="r0") == 13  # forgotten
    await c.close()


async def test_recorded_replies_age_out(cluster_factory):
    c = await cluster_factory(limits="dedup_s = 60")
    m = c.client()
    await m.spawn("l1", "ledger")
    assert await m.call("l1", {"op": "append", "value": "x"}, request_id="old") == 0
    await c.advance(30)
    assert await m.call("l1", {"op": "append", "value": "x"}, request_id="old") == 0  # still recorded
    await c.advance(31)
    await m.call("l1", {"op": "append", "value": "y"}, request_id="new")            # ages "old" out
    assert await m.call("l1", {"op": "append", "value": "x"}, request_id="old") == 2
    await c.close()


async def test_a_repeat_while_running_joins_the_first(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("w", "waiter")
    first = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "k"}, request_id="same"))
    await c.settle()
    second = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "k"}, request_id="same"))
    await c.settle()
    kinds.GATES["k"].set()
    assert await first == await second == "released k"
    assert kinds.RUNS["k"] == 1
    await c.close()


async def test_mailbox_is_bounded(cluster_factory):
    c = await cluster_factory(mailbox=2)
    m = c.client()
    await m.spawn("w", "waiter")
    busy = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "b"}))
    await c.settle()
    queued = [asyncio.ensure_future(m.call("w", {"op": "get"})) for _ in range(2)]
    await c.settle()
    with pytest.raises(Busy, match="mailbox of 'w' is full"):
        await m.call("w", {"op": "get"})
    kinds.GATES["b"].set()
    await busy
    assert [await q for q in queued] == [1, 1]
    await c.close()


async def test_nested_call_is_not_repeated_when_the_caller_reruns(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("c1", "counter")
    await m.spawn("r", "relay")
    request = {"to": "c1", "msg": {"op": "add", "n": 1}, "then_crash": True}
    with pytest.raises(AgentCrashed):
        await m.call("r", request, request_id="outer")
    # the caller retries the same request; the relay runs again, its inner call does not
    with pytest.raises(AgentCrashed):
        await m.call("r", request, request_id="outer")
    assert await m.call("c1", {"op": "get"}) == 1
    await c.close()


async def test_casts_from_a_handler_leave_after_the_commit(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("c1", "counter")
    await m.spawn("r", "relay")
    await m.cast("r", {"to": "c1", "msg": {"op": "add", "n": 4}})
    await c.settle()
    assert await m.call("c1", {"op": "get"}) == 4
    await c.close()


# --- errors and bad input -------------------------------------------------------------------

async def test_errors_callers_see(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    with pytest.raises(NoSuchAgent):
        await m.call("nobody", {})
    await m.spawn("c1", "counter")
    with pytest.raises(AlreadyExists):
        await m.spawn("c1", "counter")
    with pytest.raises(NotAllowed):
        await m.spawn("x", "os:system")
    with pytest.raises(NotAllowed, match="not an Agent"):
        await m.spawn("x", "notagent")
    with pytest.raises(BadRequest, match="cannot be loaded"):
        await m.spawn("x", "missing")
    with pytest.raises(AgentCrashed, match="init refuses"):
        await m.spawn("x", "failsinit")
    with pytest.raises(BadRequest, match="unknown op"):
        await m.call("c1", {"op": "explode"})
    with pytest.raises(BadRequest, match="cannot be sent"):
        await m.call("c1", {"op": object()})
    # a failed spawn leaves the name free
    assert (await m.spawn("x", "counter"))["name"] == "x"
    with pytest.raises(CallTimeout):
        await m.call("c1", {"op": "get"}, timeout=0.0)
    await c.close()


async def test_bad_frames_get_errors_are_counted_and_reach_no_agent(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter")
    node = c.nodes[placed["node"]]
    answers = []
    link = c.net.link(f"tcp://127.0.0.1:{c.cfg.nodes[node.name].port}", answers.append)
    await c.settle()
    link.send(b"\xc1 not msgpack")
    link.send(msgpack.packb([1, 1, "rid-1", "c1", None, None, {"op": "add"}, "meta?"]))
    link.send(msgpack.packb([1, 3, "rid-2", None, None, None, 1, None]))  # a REPLY sent as a request
    link.send(wire.batch_frame([msgpack.packb([1, 1, "rid-3", "c1", None, 9, {"op": "add"}, {"inc": placed["incarnation"]}]),
                                msgpack.packb([7])]))
    await c.settle()
    got = {}
    for frame in answers:
        msg = wire.decode(frame)
        for item in (msg.body if msg.kind == Kind.BATCH else [msg]):
            got[item.id] = item
    assert got["rid-1"].kind == Kind.ERROR and "meta must be" in got["rid-1"].body[1]
    assert got["rid-2"].kind == Kind.ERROR and "not a request" in got["rid-2"].body[1]
    assert got["rid-3"].kind == Kind.REPLY and got["rid-3"].body == 1  # the good one in the batch
    assert node.stats["bad_messages"] == 4
    assert await m.call("c1", {"op": "get"}) == 1
    link.close()
    await c.close()


# --- crashes and supervision ----------------------------------------------------------------

async def test_crash_restarts_from_the_last_good_state(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    first = await m.spawn("c1", "counter")
    await m.call("c1", {"op": "add", "n": 7})
    with pytest.raises(AgentCrashed, match="asked to crash"):
        await m.call("c1", {"op": "crash"})
    assert await m.call("c1", {"op": "get"}) == 7
    status = await m.status()
    agent = next(a for a in status["agents"] if a["name"] == "c1")
    assert agent["restarts"] == 1 and agent["incarnation"] > first["incarnation"]
    await c.close()


STATIC = """
[tree.root]
children = ["sessions", "pair", "chain"]

[tree.pair]
strategy = "one_for_all"
intensity = 1
period_s = 60
children = ["p1", "p2"]

[tree.chain]
strategy = "rest_for_one"
intensity = 5
children = ["c1", "c2", "c3"]

[agents.p1]
kind = "counter"
[agents.p2]
kind = "counter"
[agents.c1]
kind = "counter"
[agents.c2]
kind = "counter"
[agents.c3]
kind = "counter"
"""


def incarnations(status):
    return {a["name"]: a["incarnation"] for a in status["agents"]}


async def test_strategies_one_for_all_and_rest_for_one(cluster_factory):
    c = await cluster_factory(STATIC)
    m = c.client()
    for name in ("p1", "p2", "c1", "c2", "c3"):
        await m.call(name, {"op": "add", "n": 1})
    before = incarnations(await m.status())
    with pytest.raises(AgentCrashed):
        await m.call("c2", {"op": "crash"})
    await c.settle()
    assert await m.call("c3", {"op": "get"}) == 1
    after = incarnations(await m.status())
    assert after["c1"] == before["c1"]
    assert after["c2"] > before["c2"] and after["c3"] > before["c3"]
    with pytest.raises(AgentCrashed):
        await m.call("p1", {"op": "crash"})
    await c.settle()
    assert await m.call("p2", {"op": "get"}) == 1  # restarted with its state
    after2 = incarnations(await m.status())
    assert after2["p1"] > after["p1"] and after2["p2"] > after["p2"]
    await c.close()


def record_requests(monkeypatch, kinds_seen):
    """Every START/TERMINATE a caller sends: ("begin"/"end", kind, name), in order."""
    from mesh.caller import Caller
    events, request = [], Caller.request

    async def recorded(self, node, kind, target, *args, **kw):
        if kind not in kinds_seen:
            return await request(self, node, kind, target, *args, **kw)
        events.append(("begin", kind.name, target))
        try:
            return await request(self, node, kind, target, *args, **kw)
        finally:
            events.append(("end", kind.name, target))
    monkeypatch.setattr(Caller, "request", recorded)
    return events


def one_after_another(events, kind, names):
    return events == [e for n in names for e in (("begin", kind, n), ("end", kind, n))]


async def test_the_tree_starts_in_declared_order_and_stops_in_reverse_one_by_one(cluster_factory, monkeypatch):
    events = record_requests(monkeypatch, {Kind.START, Kind.TERMINATE})
    c = await cluster_factory(STATIC)
    m = c.client()
    await m.spawn("d1", "counter")
    for name in ("p1", "c3"):
        await m.call(name, {"op": "get"})
    static = [e for e in events if e[2] != "d1"]  # a spawn may go on beside the boot
    assert one_after_another(static, "START", ["p1", "p2", "c1", "c2", "c3"]), events
    del events[:]
    await c.role.stop_tree(5.0)
    # root's children reversed: chain (c3, c2, c1), pair (p2, p1), then sessions (d1)
    assert one_after_another(events, "TERMINATE", ["c3", "c2", "c1", "p2", "p1", "d1"]), events
    await c.settle()
    assert not any(r.status == "running" for n in c.nodes.values() for r in n.runners.values())
    await c.close()


async def test_too_many_restarts_escalate_to_the_parent(cluster_factory):
    c = await cluster_factory(STATIC)
    m = c.client()
    await m.call("p2", {"op": "add", "n": 5})
    with pytest.raises(AgentCrashed):
        await m.call("p1", {"op": "crash"})
    await m.call("p1", {"op": "get"})
    before = incarnations(await m.status())
    with pytest.raises(AgentCrashed):  # a second restart within the period: 'pair' gives up
        await m.call("p1", {"op": "crash"})
    await m.call("p1", {"op": "get"})
    await c.settle()
    after = incarnations(await m.status())
    assert after["p1"] > before["p1"] and after["p2"] > before["p2"]  # root restarted 'pair'
    assert after["c1"] == before["c1"]                                # siblings untouched
    assert await m.call("p2", {"op": "get"}) == 5
    status = await m.status()
    assert not status["failed"]
    await c.close()


async def test_a_failed_tree_refuses_spawns_restarts_nothing_and_callers_hear_why_at_once(cluster_factory):
    c = await cluster_factory(STATIC.replace('children = ["sessions", "pair", "chain"]',
                                             'children = ["sessions", "pair", "chain"]\nintensity = 0'))
    m = c.client()
    await m.spawn("d1", "counter")
    await m.call("p2", {"op": "add", "n": 5})
    for _ in range(2):  # 'pair' allows one restart; the root none
        with pytest.raises(AgentCrashed):
            await m.call("p1", {"op": "crash"})
    await c.settle()
    status = await m.status()
    assert status["failed"] and "'pair' then 'root' gave up" in status["failure"]
    assert {a["status"] for a in status["agents"]} == {"failed"}
    with pytest.raises(SupervisorDown, match="cannot spawn 'x': supervisor 'pair' then 'root' gave up"):
        await m.spawn("x", "counter")
    for name in ("p2", "c1", "d1"):  # at once, not after the call's deadline
        with pytest.raises(SupervisorDown, match=f"'{name}' is stopped: supervisor 'pair' then 'root' gave up"):
            await asyncio.wait_for(m.call(name, {"op": "get"}), 5)
    await c.advance(2.0)  # nothing is restarted
    assert {a["status"] for a in (await m.status())["agents"]} == {"failed"}
    assert not any(r.status == "running" for n in c.nodes.values() for r in n.runners.values())
    await c.close()


async def test_restart_types(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("perm", "lifecycle", restart="permanent")
    await m.spawn("trans", "lifecycle", restart="transient")
    await m.spawn("temp", "lifecycle", restart="temporary")
    for name in ("perm", "trans", "temp"):
        assert await m.call(name, {"op": "stop"}) == "stopping"
    await c.settle()
    events = await m.call("perm", {"op": "events"})
    assert events == ["init", "terminate normal", "init"]  # permanent: back again
    for name in ("trans", "temp"):
        with pytest.raises(NoSuchAgent):
            await m.call(name, {"op": "events"})
    # an abnormal stop of a transient agent is restarted
    await m.spawn("trans2", "lifecycle", restart="transient")
    await m.call("trans2", {"op": "stop", "reason": "broken"})
    await c.settle()
    assert (await m.call("trans2", {"op": "events"}))[-1] == "init"
    await c.close()


async def test_an_agent_gone_for_good_leaves_no_state_for_a_later_one_of_its_name(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("t1", "lifecycle", restart="transient")
    await m.call("t1", {"op": "stop"})             # a normal exit: not restarted
    await m.spawn("t2", "counter", restart="temporary")
    await m.call("t2", {"op": "add", "n": 5})
    with pytest.raises(AgentCrashed):               # a crash: temporary, not restarted
        await m.call("t2", {"op": "crash"})
    await c.settle()
    assert c.stores["h1"].get("t1") is None and c.stores["h1"].get("t2") is None
    await m.spawn("t1", "counter")                  # another kind under the same name
    assert await m.call("t1", {"op": "get"}) == 0
    await m.spawn("t2", "counter")
    assert await m.call("t2", {"op": "get"}) == 0
    await c.close()


async def test_a_spawn_right_after_an_exit_for_good_waits_for_the_delete(cluster_factory, monkeypatch):
    from mesh.caller import Caller
    gate, request = asyncio.Event(), Caller.request

    async def held(self, node, kind, target, *args, **kw):  # the delete is slow to arrive
        if kind == Kind.TERMINATE and target == "t":
            await gate.wait()
        return await request(self, node, kind, target, *args, **kw)
    monkeypatch.setattr(Caller, "request", held)
    c = await cluster_factory()
    m = c.client()
    await m.spawn("t", "counter", restart="temporary")
    await m.call("t", {"op": "add", "n": 5})
    with pytest.raises(AgentCrashed):
        await m.call("t", {"op": "crash"})
    await c.settle()
    assert "t" not in c.role.children               # gone for good; its delete is held
    spawn = asyncio.ensure_future(m.spawn("t", "counter"))
    await c.settle()
    assert not spawn.done()                         # it waits for the delete
    gate.set()
    await spawn
    assert await m.call("t", {"op": "get"}) == 0
    await c.close()


LOOPS = """
[tree.jobs]
dynamic = true
intensity = 100
period_s = 10
backoff_s = 0.1
backoff_max_s = 1.0
"""


async def test_a_crash_loop_is_slowed_by_backoff_shown_in_status_and_recovers(cluster_factory):
    c = await cluster_factory(LOOPS)
    m = c.client()
    await m.spawn("f", "flaky", supervisor="jobs")
    kinds.BROKEN.add("f")
    kinds.STARTS["f"] = 0
    with pytest.raises(AgentCrashed):
        await m.call("f", {"op": "crash"})
    await c.advance(5.0)
    # waits 0, 0.1, 0.2, 0.4, 0.8, then 1.0 each: about 9 starts in 5 s (without backoff, 100 at once)
    assert 6 <= kinds.STARTS["f"] <= 11, kinds.STARTS["f"]
    status = await m.status()
    agent = next(a for a in status["agents"] if a["name"] == "f")
    assert agent["status"] == "backoff" and 0 < agent["restart_in_s"] <= 1.0 and agent["streak"] >= 6
    assert not status["failed"]
    kinds.BROKEN.discard("f")
    assert await c.run(m.call("f", {"op": "get"}), limit_s=1.5) == 0
    await c.close()


async def test_shutdown_reasons_are_normal_exits_for_transient_agents(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    for name, reason in (("t1", "shutdown"), ("t2", ["shutdown", "job done"])):
        await m.spawn(name, "lifecycle", restart="transient")
        assert await m.call(name, {"op": "stop", "reason": reason}) == "stopping"
    await m.spawn("p1", "lifecycle", restart="permanent")
    await m.call("p1", {"op": "stop", "reason": "shutdown"})
    await c.settle()
    for name in ("t1", "t2"):
        with pytest.raises(NoSuchAgent):
            await m.call(name, {"op": "events"})
    assert await m.call("p1", {"op": "events"}) == ["init", "terminate shutdown", "init"]
    await c.close()


async def test_unserializable_state_or_reply_is_a_crash(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("lc", "lifecycle")
    with pytest.raises(AgentCrashed, match="state is not serializable"):
        await m.call("lc", {"op": "bad_state"})
    with pytest.raises(AgentCrashed, match="reply is not serializable"):
        await m.call("lc", {"op": "bad_reply"})
    # the second crash in a row is restarted after its backoff (0.1 s)
    assert (await c.run(m.call("lc", {"op": "events"}))) == ["init", "init", "init"]
    await c.close()


async def test_timers_fire_on_the_agents_clock(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    await m.spawn("lc", "lifecycle")
    assert await m.call("lc", {"op": "tick_after", "seconds": 2.0, "n": 7}) == "armed"
    await c.advance(1.0)
    assert "tick 7" not in await m.call("lc", {"op": "events"})
    await c.advance(1.1)
    assert (await m.call("lc", {"op": "events"}))[-1] == "tick 7"
    await c.close()


async def test_a_handler_past_its_deadline_is_cancelled_and_restarted(cluster_factory):
    c = await cluster_factory()  # handler_timeout_s = 10
    m = c.client()
    await m.spawn("w", "waiter")
    await m.call("w", {"op": "get"})
    stuck = asyncio.ensure_future(m.call("w", {"op": "forever"}, timeout=60))
    await c.advance(10.5, step=0.25)
    with pytest.raises(AgentCrashed, match="TimeoutError"):
        await stuck
    assert await m.call("w", {"op": "get"}) is None
    await c.close()


# --- nodes that die -------------------------------------------------------------------------

async def test_killed_node_restarts_and_its_agents_come_back_with_state(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("l1", "ledger")
    await m.call("l1", {"op": "append", "value": "kept"})
    await c.restart(placed["node"])
    assert await m.call("l1", {"op": "read"}) == ["kept"]
    await c.close()


async def test_silent_node_is_declared_dead_and_its_agents_move(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    spawned = [await m.spawn(f"c{i}", "counter") for i in range(6)]
    victim = next(p["node"] for p in spawned if p["node"] != c.cfg.supervisor_node)
    for p in spawned:
        await m.call(p["name"], {"op": "add", "n": 2})
    c.kill(victim)                     # gone, and no launcher brings it back
    await c.advance(0.3)
    assert all(v.alive for v in c.role.nodes.values())   # not yet: 0.3 s < 4 x 100 ms
    await c.advance(0.3)
    assert not c.role.nodes[victim].alive
    for p in spawned:
        assert await m.call(p["name"], {"op": "get"}) == 2
    status = await m.status()
    assert victim not in {a["node"] for a in status["agents"]}
    await c.close()


async def test_supervisor_restart_adopts_running_agents_and_keeps_dynamic_ones(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    spawned = {p["name"]: p for p in [await m.spawn(f"c{i}", "counter") for i in range(4)]}
    epoch = c.role.epoch
    await c.restart(c.cfg.supervisor_node)
    await c.role.ready_event.wait()
    assert c.role.epoch == epoch + 1
    status = await m.status()
    for a in status["agents"]:
        p = spawned[a["name"]]
        if p["node"] != c.cfg.supervisor_node:
            assert a["incarnation"] == p["incarnation"]   # adopted, not restarted
            assert a["status"] == "running"
    for name in spawned:
        assert await m.call(name, {"op": "add"}) == 1
    await c.close()


async def test_stop_forgets_the_agent_and_its_state(cluster_factory):
    c = await cluster_factory(STATIC)
    m = c.client()
    await m.spawn("tmp", "counter")
    await m.call("tmp", {"op": "add", "n": 9})
    assert (await m.stop("tmp"))["stopped"]
    with pytest.raises(NoSuchAgent):
        await m.call("tmp", {"op": "get"})
    assert c.stores["h1"].get("tmp") is None
    await m.spawn("tmp", "counter")
    assert await m.call("tmp", {"op": "get"}) == 0
    with pytest.raises(NotAllowed, match="static agent"):
        await m.stop("p1")
    with pytest.raises(NoSuchAgent):
        await m.stop("ghost")
    await c.close()


JOBS = """
[tree.jobs]
dynamic = true
"""


async def test_spawn_names_a_dynamic_supervisor_from_a_client_and_from_an_agent(cluster_factory):
    c = await cluster_factory(JOBS)
    m = c.client()
    await m.spawn("j1", "counter", supervisor="jobs")
    await m.spawn("sp", "spawner")
    await m.call("sp", {"name": "j2", "kind": "counter", "supervisor": "jobs"})
    await m.call("sp", {"name": "s1", "kind": "counter"})
    parents = {a["name"]: a["supervisor"] for a in (await m.status())["agents"]}
    assert parents == {"j1": "jobs", "j2": "jobs", "sp": "sessions", "s1": "sessions"}
    with pytest.raises(BadRequest, match="'root' is not a dynamic supervisor"):
        await m.call("sp", {"name": "x", "kind": "counter", "supervisor": "root"})
    await c.close()


async def test_callers_are_redirected_to_where_the_agent_lives(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter")
    wrong = next(n for n in c.nodes if n != placed["node"])
    m.resolver.learn("c1", wrong, 0)  # a stale belief
    assert await m.call("c1", {"op": "add"}) == 1
    assert m.resolver.where("c1")[0] == placed["node"]
    m.resolver.learn("c1", wrong, 0)
    m.caller.cast("c1", {"op": "add", "n": 10})  # a cast to the wrong node is passed on
    await c.settle()
    assert await m.call("c1", {"op": "get"}) == 11
    await c.close()


async def test_a_stale_incarnation_is_fenced_by_the_store(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter")
    node = c.nodes[placed["node"]]
    # another incarnation claims the name behind this node's back (as after a partition)
    batch = Batch()
    batch.add_claim("c1", Record(placed["incarnation"] + 100, 1, msgpack.packb({"value": 0})))
    node.store.write(batch)
    with pytest.raises(AgentDown):
        await node.caller.request(node.name, Kind.CALL, "c1", {"op": "add"}, 1.0, meta={"inc": placed["incarnation"]})
    assert "c1" not in node.runners and node.stats["fenced"] == 1
    await c.close()


async def test_a_failed_commit_answers_unavailable_and_loses_nothing_acknowledged(cluster_factory):
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("l1", "ledger")
    assert await m.call("l1", {"op": "append", "value": "safe"}) == 0
    node = c.nodes[placed["node"]]
    store = node.store
    real = store._write_once

    def disk_full(batch):
        import lmdb
        raise lmdb.DiskError("No space left on device")
    store._write_once = disk_full
    # the append's commit fails: its caller is told so at once, naming the cause; the
    # agent goes back to its last committed state and serves on (no crash, no restart)
    from mesh.errors import Unavailable
    with pytest.raises(Unavailable, match="disk full"):
        await m.call("l1", {"op": "append", "value": "lost?"}, timeout=1.0)
    assert await m.call("l1", {"op": "read"}) == ["safe"]  # reads need no commit
    st = await m.status()
    assert not st["failed"]  # an environmental fault is not a crash: nobody escalated
    store._write_once = real
    assert await m.call("l1", {"op": "append", "value": "later"}) == 1
    assert await m.call("l1", {"op": "read"}) == ["safe", "later"]
    assert node.stats["commit_errors"] >= 1 and node.stats["crashes"] == 0
    assert node.runners["l1"].incarnation == placed["incarnation"]
    await c.close()


async def test_a_retry_after_a_failed_commit_is_not_answered_from_memory(cluster_factory):
    """The agent still holds, in memory, the reply of the call whose commit failed. A
    retry must not get it: it runs again, once."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("l1", "ledger")
    node = c.nodes[placed["node"]]
    named = {"inc": placed["incarnation"]}  # raw calls name the incarnation they are for
    real_write = node.store._write_once

    def disk_full(batch):
        import lmdb
        raise lmdb.DiskError("No space left on device")
    node.store._write_once = disk_full
    from mesh.errors import Unavailable
    with pytest.raises(Unavailable):  # its commit failed: not acknowledged
        await node.caller.request(node.name, Kind.CALL, "l1", {"op": "append", "value": "v"}, 5, rid="r1", meta=named)
    node.store._write_once = real_write
    retry = node.caller.request(node.name, Kind.CALL, "l1", {"op": "append", "value": "v"}, 5, rid="r1", meta=named)
    assert await c.run(retry) == 0  # run again, once, on the committed state
    assert await node.caller.request(node.name, Kind.CALL, "l1", {"op": "append", "value": "v"}, 5, rid="r1", meta=named) == 0
    assert await m.call("l1", {"op": "read"}) == ["v"]
    await c.close()


async def test_a_call_in_flight_on_a_connection_that_is_replaced_is_sent_again(cluster_factory):
    """A client replaces its connection to a node that came back (no reconnect backoff). A
    call already sent on the old connection is lost with it (its frames, or its reply): it
    is sent again with its id, joins the run under way, and is answered once (G2). Before,
    it waited for a reply that could not come until its deadline, although the agent ran."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("w", "waiter")
    call = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "replaced"}, timeout=5))
    await c.settle()
    assert kinds.RUNS["replaced"] == 1 and not call.done()
    m._reconnect(placed["node"])   # as its LinkDown branch does when the node came back
    await c.settle()
    kinds.GATES["replaced"].set()
    assert await c.run(call) == "released replaced"
    assert kinds.RUNS["replaced"] == 1
    await c.close()
