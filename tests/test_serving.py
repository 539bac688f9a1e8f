"""The Serving behaviour (mesh/serving.py) on in-memory nodes with a fake clock: a real
worker thread runs predict_batch, held and released by the test through events."""

import asyncio
import os
import re
import textwrap
import threading

import pytest

import kinds
import harness
from harness import Cluster
from mesh import config as config_mod
from mesh.errors import AgentCrashed, Busy, CallTimeout

WAIT_S = 10  # a bound on real time for the worker thread; the tests wait on events


def one_node(test):
    """Run `test(cluster)` on a cluster of one node (every agent shares its loop), and
    end it, releasing every held worker thread, even when the test fails."""
    async def run(tmp_path):
        text = re.sub(r"\[nodes\.n[23]\]\nhost = \"h1\"\nport = \d\n", "", harness.BASE)
        (tmp_path / "cluster.toml").write_text(textwrap.dedent(text.format(mailbox=100, limits="")))
        c = Cluster(config_mod.load(tmp_path / "cluster.toml"), tmp_path)
        try:
            await c.start()
            await test(c)
        finally:
            for event in kinds.HOLD.values():
                event.set()  # no worker thread is left waiting
            await c.close()
            for table in (kinds.HOLD, kinds.ENTERED, kinds.BATCHES, kinds.LOADS, kinds.NICES):
                table.clear()
    run.__name__ = test.__name__
    return run


def hold(key: str) -> threading.Event:
    return kinds.HOLD.setdefault(key, threading.Event())


async def entered(key: str) -> None:
    """Wait until the worker runs a batch holding on `key`."""
    event = kinds.ENTERED.setdefault(key, threading.Event())
    assert await asyncio.to_thread(event.wait, WAIT_S)


async def done(*futures):
    return await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)


async def ready(c, m, name, args=None):
    await m.spawn(name, "doubler", args or {})
    first = asyncio.ensure_future(m.call(name, {"input": 0}))
    await c.settle()
    await c.advance((args or {}).get("batch_timeout_ms", 5) / 1000 + 0.01)  # its batch's wait
    assert await done(first) == [0]  # loaded and serving
    kinds.BATCHES.clear()


@one_node
async def test_calls_that_come_within_the_batch_timeout_share_one_batch(cluster):
    c, m = cluster, cluster.client()
    await ready(c, m, "d", {"batch_size": 8, "batch_timeout_ms": 50})
    calls = [asyncio.ensure_future(m.call("d", msg)) for msg in ({"input": 1}, {"inputs": [2, 3]}, {"input": 4})]
    await c.settle()
    assert kinds.BATCHES == []  # the first call waits for company
    await c.advance(0.06)
    assert await done(*calls) == [2, [4, 6], 8]  # each caller gets its own outputs
    assert kinds.BATCHES == [[1, 2, 3, 4]]
    stats = await c.run(m.call("d", {"op": "stats"}))  # it too waits for company
    assert stats["model"] == "ready" and stats["inputs"] == 5 and stats["batches"] == 2
    assert stats["mean_batch"] == 2.5 and stats["inference_ms"]["p99"] is not None
    assert stats["queue_ms"]["p50"] == 50.0  # on the fake clock: the batch timeout


@one_node
async def test_a_full_batch_runs_without_waiting_and_a_big_call_spans_batches(cluster):
    c, m = cluster, cluster.client()
    await ready(c, m, "d", {"batch_size": 2, "batch_timeout_ms": 1000})
    calls = [asyncio.ensure_future(m.call("d", {"input": n})) for n in (1, 2)]
    assert await done(*calls) == [2, 4]  # two calls fill the batch: no waiting for the clock
    big = asyncio.ensure_future(m.call("d", {"inputs": [1, 2, 3, 4, 5]}))
    await c.settle()
    await c.advance(1.01)
    assert await done(big) == [[2, 4, 6, 8, 10]]
    assert kinds.BATCHES == [[1, 2], [1, 2], [3, 4], [5]]


@one_node
async def test_an_expired_callers_inputs_never_reach_the_model(cluster):
    c, m = cluster, cluster.client()
    await ready(c, m, "d", {"batch_size": 4, "batch_timeout_ms": 0})
    first = asyncio.ensure_future(m.call("d", {"input": "hold:a"}, timeout=30))
    await entered("a")
    late = asyncio.ensure_future(m.call("d", {"inputs": [7, 8]}, timeout=1))
    keep = asyncio.ensure_future(m.call("d", {"input": 9}, timeout=30))
    await c.settle()
    await c.advance(1.5)  # `late`'s deadline passes while it waits for the model
    with pytest.raises(CallTimeout):
        await late
    hold("a").set()
    assert await done(first, keep) == ["hold:a", 18]
    assert kinds.BATCHES == [["hold:a"], [9]]  # 7 and 8 were never run


@one_node
async def test_a_call_that_expires_between_its_batches_runs_no_further(cluster):
    c, m = cluster, cluster.client()
    await ready(c, m, "d", {"batch_size": 1, "batch_timeout_ms": 0})
    call = asyncio.ensure_future(m.call("d", {"inputs": ["hold:b", 5, 6]}, timeout=1))
    await entered("b")
    await c.advance(1.5)
    with pytest.raises(CallTimeout):
        await call
    hold("b").set()
    stats = await c.run(m.call("d", {"op": "stats"}))
    assert kinds.BATCHES == [["hold:b"]] and stats["dropped_calls"] == 1  # 5 and 6 never ran


@one_node
async def test_a_full_queue_answers_busy_at_once(cluster):
    c, m = cluster, cluster.client()
    await ready(c, m, "d", {"batch_size": 2, "batch_timeout_ms": 0, "queue": 2})
    first = asyncio.ensure_future(m.call("d", {"input": "hold:q"}))
    await entered("q")
    queued = [asyncio.ensure_future(m.call("d", {"input": n})) for n in (1, 2)]
    await c.settle()
    with pytest.raises(Busy, match="mailbox of 'd' is full"):
        await asyncio.wait_for(m.call("d", {"input": 3}), WAIT_S)
    hold("q").set()
    assert await done(first, *queued) == ["hold:q", 2, 4]


@one_node
async def test_the_node_answers_other_agents_while_the_model_runs(cluster):
    c, m = cluster, cluster.client()
    await m.spawn("c1", "counter")
    await ready(c, m, "d", {"batch_timeout_ms": 0})
    busy = asyncio.ensure_future(m.call("d", {"input": "hold:x"}))
    await entered("x")  # the worker is inside predict_batch, and stays there
    assert await asyncio.wait_for(m.call("c1", {"op": "add", "n": 2}), WAIT_S) == 2
    assert not busy.done()
    hold("x").set()
    assert await done(busy) == ["hold:x"]


@one_node
async def test_a_crash_in_predict_batch_fails_its_batch_and_the_agent_reloads(cluster):
    c, m = cluster, cluster.client()
    await ready(c, m, "d", {"batch_size": 4, "batch_timeout_ms": 50})
    inc = c.nodes["n1"].runners["d"].incarnation
    calls = [asyncio.ensure_future(m.call("d", msg)) for msg in ({"input": 1}, {"input": "boom"})]
    await c.settle()
    await c.advance(0.06)
    for call in calls:
        with pytest.raises(AgentCrashed, match="ValueError: the model cannot take 'boom'"):
            await asyncio.wait_for(call, WAIT_S)
    assert await c.run(m.call("d", {"input": 5})) == 10  # restarted by its supervisor
    assert c.nodes["n1"].runners["d"].incarnation > inc and kinds.LOADS == ["d", "d"]


@one_node
async def test_calls_wait_for_the_model_to_load(cluster):
    c, m = cluster, cluster.client()
    await m.spawn("d", "doubler", {"hold_load": "l", "batch_timeout_ms": 0})
    call = asyncio.ensure_future(m.call("d", {"input": 21}, timeout=30))
    await c.settle()
    assert not call.done() and kinds.LOADS == []
    hold("l").set()
    assert await done(call) == [42]
    stats = await m.call("d", {"op": "stats"})
    assert stats["model"] == "ready" and stats["load_s"] is not None


@one_node
async def test_the_model_runs_at_a_lower_priority_than_the_nodes_loop(cluster):
    c, m = cluster, cluster.client()
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    await ready(c, m, "default")
    await ready(c, m, "off", {"worker_nice": 0})
    await ready(c, m, "five", {"worker_nice": 5})
    assert kinds.NICES == {"default": min(19, loop_nice + 10), "off": loop_nice, "five": min(19, loop_nice + 5)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice  # the loop's own is untouched
    with pytest.raises(AgentCrashed, match="worker_nice must be 0 to 19, not 25"):
        await m.spawn("bad", "doubler", {"worker_nice": 25})
