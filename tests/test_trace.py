"""TRACE (mesh/tracing.py, `mesh trace`): the ordered events of one agent's messages, a
call that crosses nodes seen from both ends, the end of a trace by time and by the
agent's exit, a flood cut to its budget, and the CLI against a real mesh.
In-memory network and fake clock for the logic; real processes for the CLI."""

import asyncio
import json

import pytest

import mesh
from harness import Cluster, make_config
from mesh import tracing
from mesh.errors import NoSuchAgent
from mesh.wire import Kind
from procs import mesh_cmd


async def _placed_apart(c, m):
    """A relay and a counter on different nodes."""
    await m.spawn("r1", "relay")
    for i in range(10):
        placed = await m.spawn(f"c{i}", "counter")
        if placed["node"] != (await m.whereis("r1"))["node"]:
            return f"c{i}"
    raise AssertionError("no counter landed away from the relay")


async def _trace(c, m, name: str, seconds: float, events: list):
    where = await m.whereis(name)
    return asyncio.ensure_future(m.caller.request(where["node"], Kind.TRACE, name, {"for_ms": int(seconds * 1000)},
                                                  seconds + 2, stream=events.append))


async def test_a_call_across_nodes_is_seen_in_order_from_both_ends(tmp_path):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    try:
        counter = await _placed_apart(c, m)
        relay_events, counter_events = [], []
        relay_trace = await _trace(c, m, "r1", 5.0, relay_events)
        counter_trace = await _trace(c, m, counter, 5.0, counter_events)
        await c.settle()
        assert await m.call("r1", {"to": counter, "msg": {"op": "add", "n": 3}}) == 3
        await c.settle()
        assert [e["ev"] for e in relay_events] == ["trace", "in", "handle", "call_out", "call_back", "commit", "reply"]
        assert [e["ev"] for e in counter_events] == ["trace", "in", "handle", "commit", "reply"]
        call_in = relay_events[1]
        assert call_in["kind"] == "call" and call_in["sender"] == "client:test" and '"op": "add"' in call_in["body"]
        assert relay_events[3]["to"] == counter and relay_events[4]["body"] == "3"
        assert counter_events[1]["sender"] == "node:" + (await m.whereis("r1"))["node"]
        assert counter_events[1]["id"] != call_in["id"]  # the relay's own call, with an id derived from its caller's
        times = [e["t"] for e in relay_events]
        assert times == sorted(times)
        await c.advance(5.1)
        assert (await relay_trace)["ended"] == "time" and (await counter_trace)["events"] == 5
    finally:
        await c.close()


async def test_a_trace_ends_with_the_agent_and_a_second_trace_replaces_the_first(tmp_path):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    try:
        await m.spawn("c1", "counter")
        first, second = [], []
        t1 = await _trace(c, m, "c1", 60.0, first)
        await c.settle()
        t2 = await _trace(c, m, "c1", 60.0, second)
        await c.settle()
        assert (await t1)["ended"] == "another trace of it began"
        await m.stop("c1")
        await c.settle()
        ended = await t2
        assert ended["ended"] == "exit" and second[-1]["ev"] == "exit"
        with pytest.raises(NoSuchAgent):
            await m.caller.request(c.cfg.supervisor_node, Kind.TRACE, "c1", None, 1.0)
    finally:
        await c.close()


async def test_a_flood_is_cut_to_the_budget_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(tracing, "MAX_EVENTS_PER_S", 10)
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    try:
        await m.spawn("c1", "counter")
        events = []
        t = await _trace(c, m, "c1", 0.5, events)
        await c.settle()
        for _ in range(20):
            await m.call("c1", {"op": "get"})
        await c.advance(0.6)
        ended = await t
        assert len(events) == 10 and ended["events"] == 10 and ended["dropped"] == 20 * 3 - 9
    finally:
        await c.close()


@pytest.mark.async_timeout(60)
async def test_mesh_trace_prints_the_events_and_stops_by_itself(local_mesh):
    cfg, _ = local_mesh
    async with mesh.connect(cfg) as m:
        await m.spawn("t1", "counter")
        tracer = asyncio.ensure_future(asyncio.to_thread(mesh_cmd, "trace", "-c", str(cfg), "t1", "--for", "3",
                                                         "--json", timeout=30))
        for i in range(40):  # until the trace is attached, and then some
            await m.call("t1", {"op": "add", "n": 1})
            await asyncio.sleep(0.05)
        done = await tracer
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["ev"] == "trace" and events[-1]["ev"] == "end" and events[-1]["ended"] == "time"
    kinds = [e["ev"] for e in events]
    assert kinds.count("in") >= 5 and kinds.count("in") == kinds.count("reply")


async def test_a_trace_follows_the_agent_to_its_next_incarnation(tmp_path):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    try:
        for i in range(10):
            placed = await m.spawn(f"c{i}", "counter")
            if placed["node"] != c.cfg.supervisor_node:
                break
        name, first = f"c{i}", placed["node"]
        events = []
        tracing_task = asyncio.ensure_future(m.trace(name, 3.0, events.append))
        await c.settle()
        c.kill(first)
        await c.advance(1.5)
        assert await c.run(m.call(name, {"op": "add", "n": 1})) == 1
        summaries = await c.run(tracing_task, limit_s=5)
        kinds = [e["ev"] for e in events]
        assert kinds[:2] == ["trace", "lost"] and "restart" in kinds
        restart = events[kinds.index("restart")]
        assert restart["node"] != first and restart["inc"] > placed["incarnation"]
        assert kinds[kinds.index("restart") + 1:] == ["trace", "in", "handle", "commit", "reply"]
        assert summaries[-1]["ended"] == "time"
    finally:
        await c.close()
