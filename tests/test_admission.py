"""Backpressure for spawn bursts (mesh/admission.py, issue 22): a spawn that would not
start before its caller stops waiting is refused at once with Busy and a retry hint; one
whose turn comes after its caller gave up does nothing; the client waits out the hint.
In-memory network, fake clock, real nodes and LMDB; the supervisor's start slots are
held by the test, so the queue is as long as the test says."""

import asyncio

import pytest

from harness import Cluster, make_config
from mesh.admission import Slots, SpawnQueue
from mesh.clock import FakeClock
from mesh.errors import Busy, CallTimeout
from mesh.wire import Kind


def test_the_queue_refuses_only_what_would_not_start_in_time():
    clock = FakeClock()
    q = SpawnQueue(clock, capacity=2)
    assert q.refusal(1.0) is None  # nothing waits
    for _ in range(4):  # 4 starts finished within the window: 2 a second
        q.begin()
        q.end()
    for _ in range(3):
        q.begin()
    assert q.refusal(1.0) is None        # the 4th waits about (3 - 2 + 1) / 2 = 1 s: in time
    q.begin()
    refused = q.refusal(1.0)              # the 5th: 1.5 s
    assert isinstance(refused, Busy) and refused.retryable and refused.data["retry_after_ms"] == 500
    assert q.refusal(None) is None        # a caller with no deadline waits as long as it takes
    clock.advance(3.0)                    # nothing finished lately: no estimate, no refusal
    assert q.refusal(1.0) is None


async def _slots_held(tmp_path, slots: int):
    """A mesh whose supervisor has `slots` start slots, after 4 spawns (a rate to estimate
    from: 4 starts in the last 2 s), with every slot then taken by the test."""
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    role = c.nodes[c.cfg.supervisor_node].supervisor
    role._start_slots, role.spawns.capacity = asyncio.Semaphore(slots), slots
    for i in range(4):
        await m.spawn(f"warm{i}", "counter")
    for _ in range(slots):
        await role._start_slots.acquire()
    return c, m, role


async def test_a_burst_is_refused_early_and_a_late_turn_does_nothing(tmp_path):
    c, m, role = await _slots_held(tmp_path, 2)
    node = c.cfg.supervisor_node

    def spawn(name: str, rid: str):
        return asyncio.ensure_future(m.caller.request(node, Kind.SPAWN, None, {"name": name, "kind": "counter"},
                                                      1.0, rid=rid))
    admitted = [spawn(f"q{i}", f"rid-q{i}") for i in range(4)]  # wait about 0.5, 1.0 s: taken
    await c.settle()
    assert role.spawns.waiting == 4
    with pytest.raises(Busy) as err:  # would wait 1.5 s, more than its caller's 1 s
        await spawn("late", "rid-late")
    assert err.value.retryable and 0 < err.value.data["retry_after_ms"] <= 5000
    assert "late" not in role.children  # refused before anything was done for it
    # their callers give up; the slots come free after: the late turns do no work
    await c.advance(1.5)
    for call in admitted:
        with pytest.raises(CallTimeout):
            await call
    role._start_slots.release()
    role._start_slots.release()
    await c.advance(0.5)
    assert role.spawns.waiting == 0
    assert not any(f"q{i}" in role.children for i in range(4))
    st = await m.status()
    assert not any(a["name"].startswith("q") for a in st["agents"])
    # the same request sent again acts: a Busy answer is not kept for its id
    assert (await c.run(m.caller.request(node, Kind.SPAWN, None, {"name": "q0", "kind": "counter"}, 5,
                                         rid="rid-q0")))["name"] == "q0"
    await c.close()


async def test_the_client_waits_out_the_hint_and_spawns(tmp_path):
    c, m, role = await _slots_held(tmp_path, 1)
    refused = []
    refusal = role.spawns.refusal
    role.spawns.refusal = lambda ttl_s: refused.append(refusal(ttl_s)) or refused[-1]
    waiting = [asyncio.ensure_future(m.spawn(f"w{i}", "counter", timeout=2.0)) for i in range(6)]
    await c.settle()
    # 5 were taken (the 6th would have waited 2.5 s, more than its 2 s: it waits out its
    # hint); 5 wait at 2 a second: this one would wait about 2.5 s, more than its 2.2 s
    retried = asyncio.ensure_future(m.spawn("patient", "counter", timeout=2.2))
    await c.settle()
    assert isinstance(refused[-1], Busy) and not retried.done()
    await c.advance(0.3)
    role._start_slots.release()  # the queue drains; the refused spawn is sent again after its hint
    placed = await c.run(retried, limit_s=10)
    assert placed["name"] == "patient" and refused[-1] is None  # taken the second time
    await c.run(asyncio.gather(*waiting), limit_s=10)  # the others were taken and started too
    await c.close()


async def test_slots_serve_waiters_in_order_skip_those_that_gave_up_and_pass_on_a_late_handover():
    slots, order, gates = Slots(2), [], {i: asyncio.Event() for i in range(6)}

    async def hold(i: int):
        async with slots:
            order.append(i)
            await gates[i].wait()
    tasks = [asyncio.ensure_future(hold(i)) for i in range(6)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == [0, 1] and slots.free == 0 and slots.waiting() == 4
    tasks[2].cancel()                        # gave up while waiting: skipped at its turn
    await asyncio.sleep(0)
    gates[0].set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == [0, 1, 3]
    gates[1].set()
    await asyncio.sleep(0)                   # 1 leaves: its slot is handed to 4 ...
    tasks[4].cancel()                        # ... which is cancelled before it runs: passed on to 5
    for _ in range(4):
        await asyncio.sleep(0)
    assert order == [0, 1, 3, 5]
    gates[3].set()
    gates[5].set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert slots.free == 2 and slots.waiting() == 0
    async with slots:                        # free again at once, no queue left behind
        assert slots.free == 1


async def test_slots_serve_a_crowd_in_arrival_order():
    """50,000 waiters (a dead node's agents waiting to start again), each served once, in order."""
    slots, served = Slots(8), []

    async def one(i: int):
        async with slots:
            served.append(i)
            await asyncio.sleep(0)
    await asyncio.gather(*(one(i) for i in range(50_000)))
    assert served == list(range(50_000)) and slots.free == 8
