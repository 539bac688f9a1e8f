"""Agent.checkpoint: a state made durable in the middle of a handler (in-memory nodes,
fake clock, real LMDB)."""

import msgpack
import pytest

import kinds
from harness import Cluster, make_config
from mesh.errors import AgentCrashed


@pytest.fixture
def cluster(tmp_path):
    made = []

    async def make():
        c = Cluster(make_config(tmp_path), tmp_path)
        made.append(c)
        await c.start()
        return c
    yield make
    kinds.RUNS.clear()


async def test_a_checkpoint_outlives_a_crash_later_in_the_handler(cluster):
    c = await cluster()
    try:
        m = c.client()
        await m.spawn("s", "stepper")
        with pytest.raises(AgentCrashed, match="after the checkpoint"):
            await m.call("s", {"op": "step", "crash": True})
        assert msgpack.unpackb(c.stores["h1"].get("s").state) == 1  # durable before the crash
        assert await c.run(m.call("s", {"op": "get"})) == 1  # the next incarnation starts from it
    finally:
        await c.close()


async def test_a_call_that_checkpointed_has_its_reply_recorded(cluster):
    c = await cluster()
    try:
        m = c.client()
        await m.spawn("s", "stepper")
        assert await m.call("s", {"op": "step"}, request_id="r1") == 1
        # nothing changed after the checkpoint, and still the repeat is answered from the record
        assert await m.call("s", {"op": "step"}, request_id="r1") == 1
        assert kinds.RUNS["steps"] == 1
    finally:
        await c.close()
