"""`mesh inspect NAME` (mesh/introspect.py): an agent as its node and supervisor see it,
on the in-memory network with real nodes and LMDB, and the CLI on a real mesh."""

import asyncio
import json

import pytest

from harness import Cluster, make_config
from kinds import GATES
from mesh.errors import AgentCrashed, NoSuchAgent


async def test_inspect_shows_state_mailbox_the_message_in_hand_and_exits(tmp_path):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    await m.spawn("w", "waiter")
    gate = GATES.setdefault("inspect-w", asyncio.Event())
    first = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "inspect-w"}, request_id="r1"))
    queued = [asyncio.ensure_future(m.call("w", {"op": "get"}, request_id=f"g{i}")) for i in range(3)]
    while True:  # until the first call is in hand and the others wait behind it
        seen = await m.inspect("w")
        if seen["handling"] and seen["mailbox"] == 3:
            break
        await c.run(asyncio.sleep(0), limit_s=1)
    assert seen["kind"] == "waiter" and seen["status"] == "running" and seen["vsn"] == 1
    assert seen["state"] == "1"  # the handler in hand already counted its run
    assert [m_["kind"] for m_ in seen["handling"]] == ["call"] and "inspect-w" in seen["handling"][0]["body"]
    assert seen["handling_for_ms"] >= 0
    assert [w["id"] for w in seen["waiting"]] == ["g0", "g1", "g2"]
    assert seen["supervision"]["restarts"] == 0 and seen["supervision"]["exits"] == []
    gate.set()
    await c.run(asyncio.gather(first, *queued), limit_s=10)
    idle = await m.inspect("w")
    assert idle["mailbox"] == 0 and idle["handling"] == [] and idle["handling_for_ms"] is None
    assert idle["handled"] >= 4 and idle["replies_kept"] >= 1  # the call that changed the state

    # a big state is cut where the caller says; a crash shows in the supervisor's part
    await m.spawn("c", "counter")
    await m.call("c", {"op": "add", "n": 7})
    with pytest.raises(AgentCrashed):
        await m.call("c", {"op": "crash"})
    for _ in range(100):
        seen = await m.inspect("c", max_bytes=100)
        if seen["supervision"]["restarts"] == 1 and seen["node"]:
            break
        await c.run(asyncio.sleep(0.01), limit_s=1)
    assert json.loads(seen["state"]) == {"value": 7}
    (when, why), = seen["supervision"]["exits"]
    assert when > 0 and "asked to crash" in why  # when: the supervisor's wall clock (fake here)
    with pytest.raises(NoSuchAgent):
        await m.inspect("nobody")
    await c.close()


def test_a_state_json_cannot_sort_or_hold_is_shown_all_the_same():
    from mesh.introspect import preview
    assert preview({1: "a", "b": 2}, 100) == '{"1": "a", "b": 2}'  # int and str keys together
    assert preview({(1, 2): b"x"}, 100) == "{(1, 2): b'x'}"
    assert preview("x" * 500, 100).endswith("... (402 bytes more)")
