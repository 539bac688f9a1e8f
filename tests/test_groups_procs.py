"""A process group on a real mesh (`mesh up`, three node processes): kill -9 of a member's
node while callers keep calling the group. Idempotent calls see no error at all; others
see LinkDown only for the calls that were in flight on the killed node, and the rest
are served by the other members at once."""

import asyncio
import time

import pytest

import mesh
from mesh.errors import CallError, LinkDown

CALLERS = 8


async def _kill_under_calls(m, run, idempotent: bool) -> tuple[list, list, float]:
    """Callers call the group; once each has been answered, the node of a member (not
    the supervisor's) is killed; returns (answers after the kill, failures, seconds from
    the kill to 100 answers)."""
    members = await m.members("pool")
    victim = next(x["node"] for x in members if x["node"] and x["node"] != "n1")
    after: list = []
    failures: list = []
    stop, warm, served = asyncio.Event(), asyncio.Event(), asyncio.Event()
    answered = [0] * CALLERS
    killed_at = [0.0]

    async def caller(i: int) -> None:
        while not stop.is_set():
            try:
                value = await m.call_group("pool", {"op": "get"}, timeout=10, idempotent=idempotent)
            except CallError as exc:
                failures.append(exc)
                continue
            answered[i] += 1
            if min(answered):
                warm.set()
            if killed_at[0]:
                after.append(value)
                if len(after) >= 100:
                    served.set()
    tasks = [asyncio.ensure_future(caller(i)) for i in range(CALLERS)]
    try:
        await asyncio.wait_for(warm.wait(), 20)
        mark = run.mark()
        killed_at[0] = time.monotonic()
        run.kill_node(victim)
        await asyncio.wait_for(served.wait(), 10)
        took = time.monotonic() - killed_at[0]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await asyncio.to_thread(run.wait_for, f"node {victim} ready", 60, mark)
    return after, failures, took


async def _all_running(m) -> None:
    for _ in range(200):  # the killed member is started again (elsewhere, or on its restarted node)
        if all(x["status"] == "running" for x in await m.members("pool")):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the pool did not run whole again: {await m.members('pool')}")


@pytest.mark.async_timeout(150)
async def test_kill_9_of_a_members_node_under_group_calls(local_mesh):
    cfg, run = local_mesh
    async with mesh.connect(cfg) as m:
        pool = await m.spawn_group("pool", "counter", 3)
        assert len({p["node"] for p in pool}) == 3
        for p in pool:
            assert await m.call(p["name"], {"op": "add", "n": 1}) == 1

        after, failures, took = await _kill_under_calls(m, run, idempotent=True)
        assert failures == [] and set(after) == {1}
        assert took < 5, f"100 answers took {took:.2f}s after the kill"
        await _all_running(m)

        after, failures, took = await _kill_under_calls(m, run, idempotent=False)
        assert all(isinstance(f, LinkDown) for f in failures), failures
        assert len(failures) <= CALLERS  # at most the calls in flight there when it died
        assert set(after) == {1} and took < 5
