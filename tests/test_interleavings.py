"""The guarantees under the interleavings that broke them: each test forces one order of
events on the in-memory network and fake clock, and fails on the commit before its fix."""

import asyncio

import msgpack
import pytest

from harness import GatedCommitter
from mesh.errors import AgentCrashed, CallError, Moved, NoSuchAgent
from mesh.wire import Kind


def hold(node, kind, target=None):
    """Park every message of `kind` (to `target`, if given) that reaches `node` until the
    test lets it go."""
    held, real = [], node.handlers[kind]

    def park(msg, origin):
        if target is None or msg.target == target:
            held.append((msg, origin))
        else:
            real(msg, origin)
    node.handlers[kind] = park

    def release():
        node.handlers[kind] = real
        for msg, origin in held:
            try:
                real(msg, origin)
            except CallError as err:  # answered as the node's intake would
                node.respond_error(origin, msg.id, err)
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


async def test_a_commit_group_larger_than_the_window_keeps_every_reply_it_records(cluster_factory):
    """Before: with more changing calls in one commit group than dedup_window (8 here),
    the group trimmed its own replies before they were committed, and the callers'
    retries ran again (113 values appended twice in a run with the shipped window of 32)."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("l1", "ledger")
    node = c.nodes[placed["node"]]
    held = node.committer = GatedCommitter(node.store)
    calls = [asyncio.ensure_future(m.call("l1", {"op": "append", "value": i}, request_id=f"r{i}"))
             for i in range(20)]
    await c.settle()
    held.release()
    await c.settle()
    held.submit = lambda batch, done: done(node.store.write(batch))  # commits at once from now on
    assert sorted(await asyncio.gather(*calls)) == list(range(20))
    retries = [await m.call("l1", {"op": "append", "value": i}, request_id=f"r{i}") for i in range(20)]
    assert sorted(retries) == list(range(20))
    assert len(await m.call("l1", {"op": "read"})) == 20
    await c.close()


async def test_a_reply_window_survives_a_move_to_a_host_whose_clock_is_ahead(cluster_factory):
    """Before: replies were stamped with the wall clock of the host that ran the agent, so
    after a move to a host ten minutes ahead a retry of a recent id ran again."""
    c = await cluster_factory(limits="dedup_s = 300")
    m = c.client()
    placed = await m.spawn("l1", "ledger")
    assert await m.call("l1", {"op": "append", "value": "once"}, request_id="pay-1") == 0
    import time
    for n in c.nodes.values():
        n.clock.wall = lambda: time.time() + 600      # every clock but the one that recorded it
    await c.restart(placed["node"])  # kill -9, and the launcher starts it again at once
    assert await c.run(m.call("l1", {"op": "append", "value": "next"}, request_id="pay-2")) == 1
    assert await m.call("l1", {"op": "append", "value": "once"}, request_id="pay-1") == 0
    assert await m.call("l1", {"op": "read"}) == ["once", "next"]
    await c.close()


async def test_one_request_id_for_two_different_requests_is_refused(cluster_factory):
    """Before: two callers who chose the same id for different requests got each other's
    reply, and the second write, acknowledged, never happened."""
    from mesh.errors import BadRequest
    c = await cluster_factory()
    m = c.client()
    await m.spawn("l1", "ledger")
    assert await m.call("l1", {"op": "append", "value": "alice"}, request_id="same") == 0
    with pytest.raises(BadRequest, match="different request"):
        await m.call("l1", {"op": "append", "value": "bob"}, request_id="same")
    assert await m.call("l1", {"op": "append", "value": "alice"}, request_id="same") == 0
    assert await m.call("l1", {"op": "read"}) == ["alice"]
    await c.close()


async def test_calls_that_two_agents_make_for_requests_of_one_id_do_not_collide(cluster_factory):
    """Before: agents derived the ids of their own calls from the request's (`outer>n`),
    so two relays handling requests that happened to share an id made one call twice."""
    c = await cluster_factory()
    m = c.client()
    for name in ("a", "b"):
        await m.spawn(name, "relay")
    await m.spawn("c1", "counter")
    await m.call("a", {"to": "c1", "msg": {"op": "add", "n": 1}}, request_id="shared")
    await m.call("b", {"to": "c1", "msg": {"op": "add", "n": 1}}, request_id="shared")
    assert await m.call("c1", {"op": "get"}) == 2
    await c.close()


async def test_a_spawn_right_after_a_stop_starts_from_nothing(cluster_factory):
    """The stop's delete may still be on its way when a spawn of the same name comes:
    the spawn waits for it, so it never starts from the stopped agent's state."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("s", "counter")
    await m.call("s", {"op": "add", "n": 5})
    held, release = hold(c.nodes[placed["node"]], Kind.TERMINATE)
    stop = asyncio.ensure_future(m.stop("s"))
    await c.run(_until(lambda: held))
    spawn = asyncio.ensure_future(m.spawn("s", "counter"))
    await c.settle()
    assert not spawn.done()        # it waits for the stop
    release()
    assert (await stop)["stopped"] is True
    await spawn
    assert await m.call("s", {"op": "get"}) == 0
    await c.close()


async def test_two_incarnations_copies_arriving_in_one_turn_leave_no_orphaned_reply(cluster_factory):
    """Seen in a three-host chaos run: a replica host got, in one loop turn, an older
    incarnation's copy (an append whose reply was never sent, with its recorded reply) and
    the newer incarnation's first record. Merged into one batch, the older record lost to
    the newer and its reply stayed: a later incarnation read a state without the append and
    a window with its reply, and answered a retry of that id with another value's index."""
    from mesh import wire
    from mesh.store import Batch
    c = await cluster_factory()
    node = c.nodes["n2"]
    fence = Batch()
    fence.add_fence("x", 5)          # the newer incarnation read its state here
    node.store.write(fence)
    answers = {}
    node.respond = lambda origin, rid, body: answers.__setitem__(rid, body)
    older = wire.Msg(Kind.REPLICATE, "rep-old", None, "node:n3", None, {
        "puts": [["x", 4, 11, msgpack.packb(["a", "b", "x"])]],
        "replies": [["x", "append-x", b"R\x02", 1.0, 61.0, None]]})
    newer = wire.Msg(Kind.REPLICATE, "rep-new", None, "node:n3", None, {
        "claims": [["x", 5, 10, msgpack.packb(["a", "b"])]]})
    node.replication.on_replicate(older, None)
    node.replication.on_replicate(newer, None)  # the same loop turn
    await c.run(_until(lambda: len(answers) == 2, 2000))
    assert node.store.replies("x") == []
    assert answers["rep-old"]["fenced"] == {"x": 5}     # its sender learns it did not land
    assert msgpack.unpackb(node.store.get("x").state) == ["a", "b"]
    await c.close()


async def test_a_handler_run_again_gets_its_nested_calls_recorded_reply_even_if_it_asks_otherwise(cluster_factory):
    """A handler need not be deterministic: run again after a crash, it may make its
    nested call with another body. That call's derived id still gets the recorded reply
    (the nested effect happens once), not the 'different request' refusal a client gets."""
    import kinds
    c = await cluster_factory()
    m = c.client()
    await m.spawn("l1", "ledger")
    await m.spawn("s1", "stamper")
    with pytest.raises(AgentCrashed):
        await m.call("s1", {"to": "l1"}, request_id="stamp-1")
    assert await m.call("s1", {"to": "l1"}, request_id="stamp-1") == 0
    assert len(await m.call("l1", {"op": "read"})) == 1
    kinds.RUNS.clear()
    await c.close()


async def test_a_state_with_integer_keys_survives_a_restart(cluster_factory):
    """Before: a state such as {1: "a"} committed, then failed to unpack when the agent
    started again (message decoding's string-keys rule was applied to its own state)."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("w", "intkeys")
    assert c.nodes[placed["node"]].runners["w"].agent.state == {1: "one"}
    await c.restart(placed["node"])

    async def running_again():
        while True:
            for node in c.nodes.values():
                runner = node.runners.get("w")
                if runner is not None and runner.status == "running" and runner.incarnation > placed["incarnation"]:
                    return runner.agent.state
            await asyncio.sleep(0)
    assert await c.run(running_again()) == {1: "one"}
    await c.close()


async def test_a_stop_that_could_not_be_committed_can_be_repeated_and_leaves_nothing(cluster_factory):
    """Found by the chaos workload (a stop while the store's disk was full): the supervisor
    forgot the name before the node had carried the stop out; the node could not commit the
    delete and the stop was answered Unavailable ("stop it again"), but stopping again
    said NoSuchAgent, and the state stayed in the store for a later spawn of the name."""
    from mesh.errors import CallTimeout, Unavailable
    from mesh.store import Outcome, StoreError
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("s", "counter")
    assert await m.call("s", {"op": "add", "n": 5}) == 5
    node = c.nodes[placed["node"]]
    real = node.committer.submit
    node.committer.submit = lambda batch, done: done(Outcome(error=StoreError("commit failed: disk full")))
    with pytest.raises((Unavailable, CallTimeout)):
        await c.run(m.stop("s", timeout=1))
    node.committer.submit = real                           # the disk has room again
    with pytest.raises((Unavailable, CallTimeout)):        # not a new name yet: its stop is not done
        await c.run(m.spawn("s", "counter", timeout=1))
    assert (await c.run(m.stop("s")))["stopped"] is True   # the stop, again: now it is done
    await m.spawn("s", "counter")
    assert await m.call("s", {"op": "get"}) == 0           # a name that is gone is gone
    await c.close()


async def test_a_name_spawned_again_ignores_a_copy_its_stop_never_reached(cluster_factory):
    """Found by the chaos workload on three hosts: a host that was down while a name was
    stopped kept its copy of the stopped agent's state (the stop deleted what it could
    reach and answered stopped); the name, spawned again and placed on that host, started
    from the old copy. A record older than the spawn is an earlier agent's, never state."""
    from mesh.store import Batch
    c = await cluster_factory()
    m = c.client()
    await m.spawn("s", "counter")
    assert await m.call("s", {"op": "add", "n": 5}) == 5
    left = {name: n.store.get("s") for name, n in c.nodes.items() if n.store.get("s") is not None}
    assert left
    assert (await m.stop("s"))["stopped"] is True
    for name, record in left.items():  # as if this host had been down during the stop
        store = c.nodes[name].store
        with store.env.begin(write=True) as txn:  # neither the delete nor the stop's fence came
            txn.delete(b"s", db=store.fences_db)
        batch = Batch()
        batch.claims["s"] = record
        store.write(batch)
        assert store.get("s") is not None
    await m.spawn("s", "counter")
    assert await m.call("s", {"op": "get"}) == 0
    await c.close()


async def test_a_call_held_while_its_node_was_down_is_not_sent_after_its_caller_gave_up():
    """Found by the chaos workload: a frame queued while its node was down went out when
    the node came back, after its caller had given up (or been answered elsewhere), and ran
    there as a new call (a re-spawned counter took 24 adds meant for the stopped one)."""
    import zmq
    from mesh import transport
    from mesh.demo import free_ports
    port = free_ports(1)[0]
    ctx = zmq.Context()
    got: list[bytes] = []
    link = transport.Link(ctx, f"tcp://127.0.0.1:{port}", lambda frame: None, None, 1 << 20)
    listener = None
    try:
        link.send(b"late", ttl=0.05)          # nobody listens yet: held
        link.send(b"no deadline")
        await asyncio.sleep(0.1)              # the first one's caller gives up
        loop = asyncio.get_running_loop()

        def on_request(route, frame):
            got.append(bytes(frame))
            return 1
        listener = transport.Listener(ctx, f"tcp://127.0.0.1:{port}", on_request, 1 << 20)
        until = loop.time() + 10
        while not got and loop.time() < until:
            await asyncio.sleep(0.01)         # waiting for a reconnect, bounded
        assert got == [b"no deadline"] and link.expired == 1
    finally:
        link.close()
        if listener is not None:
            listener.close()
        ctx.term()


async def test_a_reconnect_keeps_the_calls_that_waited_on_the_old_connection(tmp_path):
    """After a kill -9, every call that found its agent running again on the same node
    reconnected to it; each reconnect closed the connection the calls before it had just
    queued on, so their requests were lost and they waited out their deadlines (15 s of
    no answers from agents that ran again within ms)."""
    from mesh import transport
    from mesh.client import Client
    from mesh.config import load
    from procs import write_config
    cfg = load(write_config(tmp_path))
    client = Client(cfg)
    got: list[bytes] = []
    listener = None
    try:
        client._send("n2", b"call of the first caller", 5.0)    # n2 is down: held
        client._reconnect("n2")                                   # a second caller reconnects
        client._send("n2", b"call of the second caller", 5.0)
        client._reconnect("n2")                                   # and a third

        def on_request(route, frame):
            got.append(bytes(frame))
            return 1
        listener = transport.Listener(client._network.ctx, cfg.nodes["n2"].endpoint, on_request, 1 << 20)
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while len(got) < 2 and loop.time() < until:
            await asyncio.sleep(0.01)   # waiting for the connection, bounded
        assert got == [b"call of the first caller", b"call of the second caller"]
    finally:
        if listener is not None:
            listener.close()
        await client.close(drain_s=0)


async def test_a_handshake_that_breaks_off_is_no_refusal():
    """Before: a handshake that broke off (a node killed mid-way, or a peer speaking
    another mechanism) was taken for a refused key, and calls failed with NotAllowed ("this
    process's key was refused") on a mesh without CURVE. Only the authenticator's no is."""
    import socket
    import threading
    import zmq
    from zmq.utils.monitor import parse_monitor_message
    from mesh import transport
    from mesh.demo import free_ports
    port = free_ports(1)[0]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\x01" + b"\0" * 31

    def other_mechanism():  # a ZMTP peer that speaks CURVE to a link without it
        conn, _ = server.accept()
        conn.sendall(greeting)
        conn.recv(64)
        conn.close()
        server.close()
    threading.Thread(target=other_mechanism, daemon=True).start()
    ctx = zmq.Context()
    states: list = []
    events: list = []
    link = transport.Link(ctx, f"tcp://127.0.0.1:{port}", lambda frame: None, states.append, 1 << 20)
    seen = link._event
    link._event = lambda parts: (events.append(parse_monitor_message(parts)["event"]), seen(parts))
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL not in events and loop.time() < until:
            await asyncio.sleep(0.01)  # waiting for the handshake to fail, bounded
        assert zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL in events
        assert None not in states and not link.refused
    finally:
        link.close()
        ctx.term()


async def test_a_name_spawned_again_takes_nothing_that_waited_for_its_earlier_agent(cluster_factory):
    """Seen in the 30-minute soak: a counter spawned again started from 24, one burst of
    its first life's adds. Its node still held the first life's crashed incarnation with
    those calls queued for its restart, and the new agent took them over (a restart keeps
    its callers' places, but a new life is not a restart)."""
    from mesh import wire
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c", "counter")
    node = c.nodes[placed["node"]]
    held, _ = hold(node, Kind.START)                # its restart does not come
    with pytest.raises(AgentCrashed):
        await m.call("c", {"op": "crash"})
    await c.run(_until(lambda: held))
    queued = asyncio.ensure_future(m.call("c", {"op": "add", "n": 24}, request_id="first-life", timeout=3))
    await c.settle()
    assert node.runners["c"].depth() == 1            # waiting for the first life's restart
    newer = placed["incarnation"] + 1000
    node.handlers[Kind.START] = node.incarnations.on_start      # the first life's restart never comes
    start = wire.Msg(Kind.START, "new-life", "c", "node:n1", None,
                     {"kind": "counter", "incarnation": newer, "since": newer})
    node.incarnations.on_start(start, None)                      # a spawn of the name anew lands here
    await c.run(_until(lambda: "c" in node.runners and node.runners["c"].incarnation == newer
                       and node.runners["c"].status == "running", 2000))
    assert node.runners["c"].agent.state == {"value": 0}
    with pytest.raises(NoSuchAgent):
        await queued
    await c.close()


async def test_a_request_under_an_id_in_hand_waits_for_the_first_instead_of_being_refused(cluster_factory):
    """Seen in the 30-minute soak: a request was refused as a reused id, yet its value was
    appended. The refusal rested on a first request still in hand, which then recorded
    nothing (it crashed); a later copy of the refused request (an attempt that had waited
    on a link) then ran. A refusal now rests only on a recorded, committed reply: while the
    first is in hand the other waits, and runs if the first leaves nothing under the id."""
    from mesh.errors import BadRequest
    c = await cluster_factory()
    m = c.client()
    await m.spawn("r", "relay")
    placed = await m.spawn("c1", "counter")
    held, release = hold(c.nodes[placed["node"]], Kind.CALL, "c1")
    first = asyncio.ensure_future(m.call(
        "r", {"to": "c1", "msg": {"op": "add", "n": 1}, "then_crash": True}, request_id="same"))
    await c.run(_until(lambda: held))                  # the first is in the relay's hands
    other = {"to": "c1", "msg": {"op": "add", "n": 10}}
    second = asyncio.ensure_future(c.client().call("r", other, request_id="same"))  # another caller
    await c.settle()
    release()
    with pytest.raises(AgentCrashed):
        await first                                    # it recorded nothing under "same"
    assert await second == 11                          # so the second ran, once
    assert await m.call("r", other, request_id="same") == 11    # a late copy gets its reply
    with pytest.raises(BadRequest, match="different request"):  # and a third body is refused
        await m.call("r", {"to": "c1", "msg": {"op": "get"}}, request_id="same")
    assert await m.call("c1", {"op": "get"}) == 11
    await c.close()


async def test_a_spawn_retried_with_its_request_id_gets_that_spawns_outcome(cluster_factory):
    """Seen in the soak: a spawn whose answer was lost was sent again with its request id
    while the first was under way; the retry was told AlreadyExists, then the first failed
    and the name was gone. A retry of a spawn now joins it, or gets its answer."""
    from mesh.errors import BadRequest
    c = await cluster_factory()
    sup = c.cfg.supervisor_node
    body = {"name": "s", "kind": "counter", "args": {}, "restart": "permanent"}
    held = [hold(n, Kind.START) for n in c.nodes.values()]
    first = asyncio.ensure_future(c.client().caller.request(sup, Kind.SPAWN, None, body, 5, rid="sp-1"))
    await c.run(_until(lambda: any(h for h, _ in held)))  # its start is under way
    retry = asyncio.ensure_future(c.client().caller.request(sup, Kind.SPAWN, None, body, 5, rid="sp-1"))
    await c.settle()
    for _, release in held:
        release()
    placed = await first
    assert await retry == placed
    late = await c.client().caller.request(sup, Kind.SPAWN, None, body, 5, rid="sp-1")
    assert late == placed                                  # after the fact too
    other = dict(body, kind="ledger")
    with pytest.raises(BadRequest, match="different request"):
        await c.client().caller.request(sup, Kind.SPAWN, None, other, 5, rid="sp-1")
    await c.close()


async def test_a_late_copy_of_a_stop_or_a_spawn_does_not_act_again(cluster_factory):
    """Seen in the 30-minute soak: a copy of one era's STOP, passed on by another node,
    reached the supervisor after the name was spawned again, and stopped the new era's
    agent in the middle of its work. A copy of a control request gets the answer of the
    first and acts no more: not a late stop, nor a late spawn of a name stopped since."""
    c = await cluster_factory()
    sup, m = c.cfg.supervisor_node, c.client()
    ask = c.client().caller.request
    spawn = {"name": "s", "kind": "counter", "args": {}, "restart": "permanent"}
    await ask(sup, Kind.SPAWN, None, spawn, 5, rid="spawn-1")
    assert (await ask(sup, Kind.STOP, "s", None, 5, rid="stop-1"))["stopped"] is True
    placed = await m.spawn("s", "counter")                       # the next era
    assert await m.call("s", {"op": "add", "n": 2}) == 2
    assert (await ask(sup, Kind.STOP, "s", None, 5, rid="stop-1"))["stopped"] is True  # the late copy
    other = next(n for n in c.nodes if n != sup)                 # and one passed on by another node
    assert (await ask(other, Kind.STOP, "s", None, 5, rid="stop-1"))["stopped"] is True
    assert await m.call("s", {"op": "get"}) == 2                  # the new era serves on
    assert (await m.stop("s"))["stopped"] is True
    await ask(sup, Kind.SPAWN, None, spawn, 5, rid="spawn-1")    # a late copy of the first spawn
    with pytest.raises(NoSuchAgent):
        await m.call("s", {"op": "get"})                          # brings nothing back
    assert placed["name"] == "s"
    await c.close()


async def test_a_late_copy_of_a_call_to_a_stopped_agent_does_not_run_on_the_next_agent_of_its_name(cluster_factory):
    """Seen in the 30-minute soak (seed 3023): a lifecycle ledger spawned again started
    with the last burst of its earlier life. Copies of those calls (sent again to a
    restarted incarnation, and held on a link while it was down) arrived after the name
    was stopped and spawned anew, and ran on the new agent, whose reply window is its own.
    A call says which incarnation it was sent to; one sent to an earlier life of the name
    is refused (NoSuchAgent: that agent was stopped)."""
    c = await cluster_factory()
    m = c.client()
    first = await m.spawn("s", "counter")
    assert await m.call("s", {"op": "add", "n": 1}, request_id="late-1") == 1
    await m.stop("s")
    second = await m.spawn("s", "counter")
    assert second["incarnation"] > first["incarnation"]
    with pytest.raises(NoSuchAgent, match="stopped"):
        await m.caller.request(second["node"], Kind.CALL, "s", {"op": "add", "n": 1}, 5, rid="late-1",
                               meta={"inc": first["incarnation"]})
    assert await m.call("s", {"op": "get"}) == 0
    for odd in ("x", None, True, [1]):        # a peer's odd incarnation: told which runs there, no crash
        with pytest.raises(Moved) as moved:
            await m.caller.request(second["node"], Kind.CALL, "s", {"op": "get"}, 5, rid=f"odd-{odd}",
                                   meta={"inc": odd})
        assert moved.value.data == {"node": second["node"], "incarnation": second["incarnation"]}
    stale = c.client()                        # a caller that knew only the earlier agent's place
    stale.resolver.learn("s", second["node"], first["incarnation"])
    assert await stale.call("s", {"op": "add", "n": 5}) == 5   # a new call: it goes to the new agent
    await c.close()


async def test_a_stop_is_answered_only_once_the_supervisor_has_forgotten_the_name_for_good(cluster_factory):
    """Seen in a 10-minute three-host run (seed 3026): a stop was answered stopped, the
    supervisor's node was killed at once, and the next supervisor still found the name's
    spawn record in its store: it started the stopped agent again, with its state, and
    the name's next spawn was told it exists. The stop is answered only once the
    supervisor's forgetting of the name is committed."""
    from mesh.store import Committer
    c = await cluster_factory()
    m = c.client()
    sup = c.cfg.supervisor_node
    placed = [await m.spawn(f"s{i}", "counter") for i in range(4)]
    name = next(p["name"] for p in placed if p["node"] != sup)
    node = c.nodes[sup]
    gate = node.committer = GatedCommitter(node.store)
    stop = asyncio.ensure_future(m.stop(name))
    await c.run(_until(lambda: gate.held, 2000))   # the forgetting waits for its commit ...
    await c.settle()
    assert not stop.done()                         # ... and so does the answer
    node.committer = Committer(node.store, inline=True)
    gate.release()
    assert (await c.run(stop))["stopped"] is True
    await c.close()


async def test_a_late_call_that_named_no_incarnation_does_not_run_on_the_next_agent(cluster_factory):
    """Seen in the 30-minute three-host soak (seed 3028): a lifecycle ledger spawned again
    held three appends its earlier life was sent (and never acknowledged), and a counter
    one increment too many. The caller knew the agent's node but not its incarnation, so
    the call named none, and a copy held on a link while the node was away ran on the
    next agent of the name. A call that names no incarnation is now answered with where
    the agent runs and as which incarnation (Moved), never run; the caller sends it again
    naming it."""
    c = await cluster_factory()
    m = c.client()
    first = await m.spawn("s", "counter")
    node = c.nodes[first["node"]]
    late = c.client()
    late.resolver.learn("s", first["node"], -1)         # it knows where, not which incarnation
    held, release = hold(node, Kind.CALL, "s")
    call = asyncio.ensure_future(late.caller.request(first["node"], Kind.CALL, "s", {"op": "add", "n": 1}, 5,
                                                     rid="late-2"))
    await c.run(_until(lambda: held))                   # held, as on a link that is down
    await m.stop("s")
    second = await m.spawn("s", "counter")
    assert second["node"] == first["node"] and second["incarnation"] > first["incarnation"]
    release()                                           # the copy arrives in the next life
    with pytest.raises(CallError):
        await c.run(call)
    assert await m.call("s", {"op": "get"}) == 0        # it did not run there
    assert await late.call("s", {"op": "add", "n": 2}) == 2   # a caller that names none is told, then runs
    await c.close()


async def test_a_late_copy_of_a_stop_does_not_stop_the_agent_spawned_since(cluster_factory):
    """Seen in the 30-minute three-host soak (seed 3029): a lifecycle counter spawned again
    answered NoSuchAgent from then on. A stop of its earlier life, held on a link (its
    first node went away), reached the supervisor after the new spawn and stopped the new
    agent. A stop names the incarnation it was sent for, and one for an earlier life is
    refused."""
    c = await cluster_factory()
    m = c.client()
    first = await m.spawn("s", "counter")
    sup = c.nodes[c.cfg.supervisor_node]
    held, release = hold(sup, Kind.STOP, "s")
    late = asyncio.ensure_future(m.caller.request(sup.name, Kind.STOP, "s", {"incarnation": first["incarnation"]},
                                                  10, rid="stop-late"))
    await c.run(_until(lambda: held))                       # held, as on a link that is down
    parked = held.pop()
    release()                                               # later stops go through
    assert (await m.stop("s"))["stopped"] is True
    second = await m.spawn("s", "counter")
    assert await m.call("s", {"op": "add", "n": 1}) == 1
    try:                                                    # the first stop arrives now
        sup.handlers[Kind.STOP](*parked)
    except CallError as err:
        sup.respond_error(parked[1], parked[0].id, err)
    with pytest.raises(NoSuchAgent, match="stopped already"):
        await c.run(late)
    assert await m.call("s", {"op": "get"}) == 1            # the new agent runs on
    assert second["incarnation"] > first["incarnation"]
    await c.close()


async def test_a_stop_waits_for_a_new_supervisor_to_learn_what_runs_where(cluster_factory):
    """Seen in a three-host run with [control] (seed 4001): a stop that reached a supervisor
    elected a moment before, still reading its records, was answered NoSuchAgent for a
    name that ran; the next spawn of the name found the old agent, with its state. A stop,
    like a spawn, is answered Unavailable (and retried) until the supervisor is ready."""
    c = await cluster_factory()
    m = c.client()
    sup = c.cfg.supervisor_node
    placed = [await m.spawn(f"s{i}", "counter") for i in range(4)]
    name = next(p["name"] for p in placed if p["node"] != sup)
    assert await m.call(name, {"op": "add", "n": 5}) == 5
    silent = next(n for n in c.nodes if n not in (sup, placed[[p["name"] for p in placed].index(name)]["node"]))
    c.freeze(silent)  # the new supervisor waits for its inventory up to the liveness window
    await c.restart(sup)
    role = c.role
    stop = asyncio.ensure_future(m.stop(name))
    await c.settle()
    assert not role.ready and not stop.done()  # not answered before the supervisor knows
    assert (await c.run(stop))["stopped"] is True and role.ready
    c.thaw(silent)
    with pytest.raises(NoSuchAgent):
        await c.run(m.call(name, {"op": "get"}))
    await m.spawn(name, "counter")
    assert await c.run(m.call(name, {"op": "get"})) == 0  # from nothing
    await c.close()


async def test_a_stop_that_names_no_known_incarnation_stops_the_agent(cluster_factory):
    """Seen in the 30-minute three-host soak (seed 3030): after a supervisor restart the
    registry listed a lifecycle counter with incarnation 0 (not yet known); the stop that
    named it was refused as meant for an earlier life, the workload spawned the name again
    and got the old agent, with its state. Incarnation 0 names no agent: it is no
    earlier life."""
    c = await cluster_factory()
    m = c.client()
    await m.spawn("s", "counter")
    assert await m.call("s", {"op": "add", "n": 3}) == 3
    sup = c.cfg.supervisor_node
    answer = await m.caller.request(sup, Kind.STOP, "s", {"incarnation": 0}, 10, rid="stop-0")
    assert answer["stopped"] is True
    await m.spawn("s", "counter")
    assert await m.call("s", {"op": "get"}) == 0
    await c.close()
