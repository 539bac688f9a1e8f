"""The guarantees under the interleavings that broke them: each test forces one order of
events on the in-memory network and fake clock, and fails on the commit before its fix."""

import asyncio

import msgpack
import pytest

from harness import Cluster, make_config
from mesh.errors import AgentCrashed, NoSuchAgent
from mesh.wire import Kind


@pytest.fixture
def cluster_factory(tmp_path):
    async def make(extra: str = "", limits: str = "") -> Cluster:
        c = Cluster(make_config(tmp_path, extra, 100, limits), tmp_path)
        await c.start()
        return c
    return make


def hold(node, kind):
    """Park every message of `kind` that reaches `node` until the test lets it go."""
    held, real = [], node.handlers[kind]
    node.handlers[kind] = lambda msg, origin: held.append((msg, origin))

    def release():
        node.handlers[kind] = real
        for msg, origin in held:
            real(msg, origin)
    return held, release


async def test_a_stop_racing_a_restart_ends_every_incarnation(cluster_factory):
    """Before: the stop's TERMINATE ended the crashed incarnation and deleted its record
    (and fence); the START already on its way then ran a new incarnation the supervisor
    no longer knew, answering with the old state, and a fresh spawn started from it."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter")
    assert await m.call("c1", {"op": "add", "n": 5}) == 5
    node = c.nodes[placed["node"]]
    held, release = hold(node, Kind.START)
    with pytest.raises(AgentCrashed):
        await m.call("c1", {"op": "crash"})
    await c.run(_until(lambda: held))                 # the restart's START is on its way
    assert (await m.stop("c1"))["stopped"] is True
    release()
    await c.settle()
    for n in c.nodes.values():
        assert "c1" not in n.runners or n.runners["c1"].status in ("stopped", "crashed")
    with pytest.raises(NoSuchAgent):
        await m.call("c1", {"op": "get"})
    await m.spawn("c1", "counter")
    assert await m.call("c1", {"op": "get"}) == 0   # a name that is gone is gone
    await c.close()


async def _until(predicate, limit: int = 200):
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_an_orderly_stop_mid_handler_keeps_none_of_the_handlers_changes(cluster_factory):
    """Before: SIGTERM (node shutdown) cancelled a running handler and then committed the
    state it had half changed, with no reply recorded: the caller's retry ran it again."""
    import kinds
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("w", "waiter")
    node = c.nodes[placed["node"]]
    call = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "never"}, request_id="half"))
    await c.run(_until(lambda: kinds.RUNS.get("never")))   # it changed its state and waits
    await node.shutdown()
    record = node.store.get("w")
    assert msgpack.unpackb(record.state) is None           # the half-done change is not kept
    call.cancel()
    kinds.GATES.clear()
    kinds.RUNS.clear()
    await c.close()
