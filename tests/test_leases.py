"""Leases (G3): a node serves only while its lease holds, and its own view lapses first.

Timing in these configs: heartbeat 100 ms, liveness 4 (dead after 400 ms), lease 300 ms.
"""

import asyncio

import pytest

from harness import Cluster, make_config
from mesh.store import Committer
from harness import GatedCommitter


async def cluster(tmp_path) -> Cluster:
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    return c


async def spawn_on_victim(c, m, n=6):
    placed = [await m.spawn(f"c{i}", "counter") for i in range(n)]
    victim = next(p["node"] for p in placed if p["node"] != c.cfg.supervisor_node)
    for p in placed:
        await m.call(p["name"], {"op": "add", "n": 5})
    return placed, victim


async def test_a_frozen_node_is_declared_dead_and_serves_nothing_stale_after(tmp_path):
    from mesh.errors import AgentDown
    from mesh.wire import Kind
    c = await cluster(tmp_path)
    m, direct = c.client(), c.client()
    placed, victim = await spawn_on_victim(c, m)
    mine = [p for p in placed if p["node"] == victim]
    c.freeze(victim)
    # a request that can only be answered by the frozen node, once it wakes up
    stale = asyncio.ensure_future(direct.caller.request(victim, Kind.CALL, mine[0]["name"], {"op": "get"}, 30,
                                                        meta={"inc": mine[0]["incarnation"]}))
    # and a call that must not get stuck on it
    moving = asyncio.ensure_future(m.call(mine[0]["name"], {"op": "add", "n": 1}, timeout=5, request_id="add-1"))
    await c.advance(0.3)
    assert c.role.nodes[victim].alive          # 0.3 s of silence: not yet
    await c.advance(0.15)
    assert not c.role.nodes[victim].alive      # 0.45 s: declared dead, its agents moved
    assert await c.run(moving) == 6            # answered by the new incarnation, once
    for p in mine[1:]:
        assert await c.run(m.call(p["name"], {"op": "get"})) == 5
    moved = {a["name"]: a for a in (await m.status())["agents"]}
    assert all(moved[p["name"]]["node"] != victim for p in mine)
    c.thaw(victim)                             # SIGCONT: it finds its lease lapsed first
    await c.settle()
    node = c.nodes[victim]
    assert node.stats["lease_lapses"] == 1 and not node.runners
    with pytest.raises(AgentDown):             # Moved or AgentDown: never a stale answer
        await stale
    assert await m.call(mine[0]["name"], {"op": "add", "n": 1}, request_id="add-1") == 6
    await c.advance(0.3)                       # it rejoins, empty, and may host agents again
    assert c.role.nodes[victim].alive
    await c.close()


async def test_a_reply_committed_after_the_lease_lapsed_is_not_sent(tmp_path):
    c = await cluster(tmp_path)
    m = c.client()
    placed, victim = await spawn_on_victim(c, m)
    name = next(p["name"] for p in placed if p["node"] == victim)
    node = c.nodes[victim]
    gate = node.committer = GatedCommitter(node.store)
    call = asyncio.ensure_future(m.call(name, {"op": "add", "n": 1}, timeout=5, request_id="r-1"))
    await c.settle()
    node.pause()  # the node stops renewing (it is cut off from the supervisor)
    await c.advance(0.35)       # past its lease, not yet past the supervisor's patience
    node.committer = Committer(node.store, inline=True)
    gate.release()              # the commit lands, but the reply must not leave
    await c.settle()
    assert not call.done()
    # declared dead; the agent restarts elsewhere from the store, and the caller's retry
    # gets the recorded reply: the add happened exactly once
    assert await c.run(call) == 6
    assert await m.call(name, {"op": "get"}) == 6
    await c.close()


async def test_nodes_stop_serving_when_the_supervisor_is_gone_longer_than_a_lease(tmp_path):
    c = await cluster(tmp_path)
    m = c.client()
    placed, _ = await spawn_on_victim(c, m)
    previous = c.kill(c.cfg.supervisor_node)
    await c.advance(0.4)
    others = [n for n in c.nodes.values()]
    assert all(not n.runners for n in others)            # no lease, no serving
    assert all(n.stats["lease_lapses"] == 1 for n in others)
    await c.start_node(c.cfg.supervisor_node, previous)
    await c.role.ready_event.wait()
    await c.advance(0.5)
    for p in placed:
        assert await m.call(p["name"], {"op": "get"}, timeout=5) == 5
    await c.close()


def test_lease_runs_from_the_send_time():
    from mesh.clock import FakeClock
    from mesh.lease import Lease
    clock = FakeClock()
    lease = Lease(clock, 0.75)
    assert not lease.valid()
    sent = clock.now()
    clock.advance(0.2)          # the grant arrives 200 ms later
    lease.granted(sent)
    assert lease.valid() and abs(lease.remaining() - 0.55) < 1e-9
    clock.advance(0.56)
    assert not lease.valid()


async def test_a_dropped_runner_acknowledges_nothing_even_if_its_commit_lands_later(tmp_path):
    """The lease lapses while a commit is in flight; the node gets a new lease at once and
    the agent restarts from the store, which lacks that commit. When the old commit lands,
    its reply must not go out as a success (the new incarnation does not have it)."""
    from mesh.errors import CallError
    from test_replication import three_hosts
    c = await three_hosts(tmp_path, replicas=0)  # a store per host: no shared store to fence it
    m = c.client()
    placed, victim = await spawn_on_victim(c, m)
    name, inc = next((p["name"], p["incarnation"]) for p in placed if p["node"] == victim)
    node = c.nodes[victim]
    gate = node.committer = GatedCommitter(node.store)
    first = asyncio.ensure_future(m.caller.request(victim, __import__("mesh").wire.Kind.CALL, name,
                                                   {"op": "add", "n": 1}, 30, rid="in-flight", meta={"inc": inc}))
    await c.settle()
    assert len(gate.held) == 1
    node.pause()
    c.clock.advance(0.35)
    assert not node.serving() and name not in node.runners   # lapsed: dropped
    node.resume()                                             # renewals again: it rejoins
    await c.advance(0.2)
    assert node.lease.valid()
    node.committer = Committer(node.store, inline=True)
    gate.release()                                            # the old commit lands now ...
    with pytest.raises(CallError):                            # ... and its reply is no success
        await first
    assert await c.run(m.call(name, {"op": "add", "n": 1}, request_id="in-flight")) == 6
    assert await m.call(name, {"op": "get"}) == 6
    await c.close()


async def test_a_start_that_overtakes_the_lease_waits_for_it(tmp_path):
    """The supervisor grants a lease in its answer to a HELLO and then sends STARTs on
    another connection: a START may arrive first. It waits for the lease instead of
    starting an agent the node would drop at once."""
    from mesh.errors import Unavailable
    from mesh.wire import Kind
    c = await cluster(tmp_path)
    node = next(n for name, n in c.nodes.items() if name != c.cfg.supervisor_node)
    node.lease.revoke()
    node.hello_sent()                     # as if its HELLO's answer were still on its way
    body = {"kind": "counter", "incarnation": 7_000_000_001, "replicas": [], "sources": []}
    start = asyncio.ensure_future(c.role.node.caller.request(node.name, Kind.START, "early", body, 5))
    await c.settle()
    assert not start.done() and "early" not in node.runners
    node.lease.granted(c.clock.now())     # the answer arrives: lease granted
    node.hello_answered()
    assert (await c.run(start))["incarnation"] == 7_000_000_001
    assert node.serving() and "early" in node.runners

    node.lease.revoke()                   # no lease and no HELLO under way: refused at once
    body["incarnation"] += 1
    with pytest.raises(Unavailable, match="no lease"):
        await c.run(c.role.node.caller.request(node.name, Kind.START, "late", body, 5))
    node.lease.granted(c.clock.now())
    await c.close()


async def test_an_agent_gone_from_its_node_without_a_word_is_started_again(tmp_path):
    """Its exit never reached the supervisor (sent while it was down, say): the node's
    renewals count fewer agents than the supervisor's view, and an audit finds which."""
    from mesh.errors import AgentDown
    c = await cluster(tmp_path)
    m = c.client()
    placed, victim = await spawn_on_victim(c, m)
    name = next(p["name"] for p in placed if p["node"] == victim)
    node = c.nodes[victim]
    node.incarnations.drop(node.runners[name], lambda: AgentDown("gone"))   # silently: no EXIT
    await c.advance(1.5)                                        # a few renewals, then the audit
    assert await c.run(m.call(name, {"op": "get"})) == 5
    assert c.role.children[name].status == "running" and name in c.nodes[c.role.children[name].node].runners
    await c.close()


async def test_hellos_repeated_while_the_supervisor_was_away_move_each_agent_once(tmp_path):
    """The supervisor's node stops (SIGSTOP): every other node's lease lapses, and their
    hellos, retried meanwhile, all arrive at once when it wakes. A drop counts once, and
    a start under way is not disowned: every agent ends up running in one place, where
    the supervisor believes it runs."""
    c = await cluster(tmp_path)
    m = c.client()
    placed, _ = await spawn_on_victim(c, m, n=9)
    sup = c.cfg.supervisor_node
    c.freeze(sup)
    await c.advance(1.0)                        # leases lapse; hellos pile up
    assert all(not n.runners for name, n in c.nodes.items() if name != sup)
    c.thaw(sup)
    for _ in range(10):
        await c.advance(0.1)
    for p in placed:
        assert await c.run(m.call(p["name"], {"op": "get"})) == 5
        child = c.role.children[p["name"]]
        hosts = [name for name, n in c.nodes.items() if p["name"] in n.runners]
        assert hosts == [child.node], (p["name"], hosts, child.node)
        assert c.nodes[child.node].runners[p["name"]].incarnation == child.incarnation
    await c.close()


async def test_a_silent_node_is_declared_dead_when_its_window_ends(tmp_path):
    """Not up to a polling interval later: the supervisor wakes when the window ends."""
    c = await cluster(tmp_path)
    victim = next(n for n in c.nodes if n != c.cfg.supervisor_node)
    view = c.role.nodes[victim]
    await c.advance(0.13)                       # some way into a heartbeat
    c.freeze(victim)
    end = view.last_heard + c.cfg.timing.dead_after_s
    await c.advance(end - c.clock.now() - 0.002)
    assert view.alive
    await c.advance(0.004)
    assert not view.alive
    c.thaw(victim)
    await c.close()
