"""Calls an agent declares read-only (Agent.read_ops) are answered without packing its state,
and keep G1; MESH_CHECK_READS catches a declared read that changed the state."""

import asyncio
import contextlib

import msgpack
import pytest

from harness import Cluster, GatedCommitter, make_config
from mesh import runner
from mesh.errors import AgentCrashed

PAD = 200_000


class CountingPack:
    """Stands in for the runner's msgpack: records the size of everything packed."""

    def __init__(self):
        self.sizes: list[int] = []

    def packb(self, obj):
        out = msgpack.packb(obj)
        self.sizes.append(len(out))
        return out

    def big(self) -> int:
        return sum(1 for size in self.sizes if size >= PAD)


@contextlib.asynccontextmanager
async def running(tmp_path):
    """A started cluster on the in-memory network, closed however the test ends."""
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def packs(monkeypatch):
    counting = CountingPack()
    monkeypatch.setattr(runner, "msgpack", counting)
    monkeypatch.setattr(runner, "CHECK_READS", False)
    return counting


def test_read_ops_is_declared_by_the_kinds_we_ship():
    from nodes.conversation import ConversationAgent
    from nodes.counter import Counter
    from nodes.ledger import Ledger
    assert Counter().reads_only({"op": "get"}) and not Counter().reads_only({"op": "add"})
    assert Ledger().reads_only({"op": "len"}) and Ledger().reads_only({"op": "read"})
    assert ConversationAgent().reads_only({"op": "history"}) and not ConversationAgent().reads_only({"op": "say"})
    assert not Counter().reads_only(["get"]) and not Counter().reads_only({"op": ["get"]})


async def test_a_declared_read_packs_nothing_the_size_of_the_state(tmp_path, packs):
    async with running(tmp_path) as c:
        m = c.client()
        await m.spawn("p", "peeker", {"pad": PAD})
        assert await m.call("p", {"op": "add"}) == 1
        before = packs.big()
        assert before >= 1                                        # a change packs the state ...
        for _ in range(5):
            assert await m.call("p", {"op": "peek"}) == 1
        assert packs.big() == before                              # ... a declared read does not
        assert await m.call("p", {"op": "add"}) == 2
        assert packs.big() == before + 1


async def test_a_declared_read_still_waits_for_the_agents_earlier_change(tmp_path, packs):
    async with running(tmp_path) as c:
        m = c.client()
        placed = await m.spawn("p", "peeker")
        node = c.nodes[placed["node"]]
        gate = node.committer = GatedCommitter(node.store)
        add = asyncio.ensure_future(m.call("p", {"op": "add"}))
        await c.settle()
        peek = asyncio.ensure_future(m.call("p", {"op": "peek"}))
        await c.settle()
        assert not add.done() and not peek.done()   # it saw 1, which is not durable yet (G1)
        gate.release()
        assert await add == 1 and await peek == 1


async def test_a_declared_read_that_casts_commits_before_its_cast_leaves(tmp_path, packs):
    async with running(tmp_path) as c:
        m = c.client()
        await m.spawn("p", "peeker")
        await m.spawn("q", "peeker")
        commits = sum(n.stats["commits"] for n in c.nodes.values())
        assert await m.call("p", {"op": "tell", "to": "q"}) == 0
        await c.settle()
        assert await m.call("q", {"op": "peek"}) == 1
        assert sum(n.stats["commits"] for n in c.nodes.values()) > commits


async def test_with_check_reads_a_declared_read_that_changes_the_state_crashes(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "CHECK_READS", True)
    async with running(tmp_path) as c:
        m = c.client()
        await m.spawn("p", "peeker")
        assert await m.call("p", {"op": "add"}) == 1
        with pytest.raises(AgentCrashed, match=r"read-only \(sneak in read_ops\) changed the state"):
            await m.call("p", {"op": "sneak"})
        await c.settle()
        assert await m.call("p", {"op": "peek"}) == 1      # the change was thrown away
        assert await m.call("p", {"op": "add"}) == 2
