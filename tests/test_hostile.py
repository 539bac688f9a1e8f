"""What one hostile or careless caller can do to the others: nothing (G5).

Each test here names the attack it replays; each failed before the mesh bounded it."""

import asyncio

import msgpack
import pytest

from harness import GatedCommitter
from mesh import wire
from mesh.errors import BadRequest, ProtocolError, StoreError, Unavailable
from mesh.store import Batch, Outcome, Record, Store


EMOJI_ID = "\U0001F600" * 128  # 128 characters, 512 bytes of UTF-8


# --- one call's bad record must not fail the commit group ------------------------------------

def test_request_id_and_target_limits_count_bytes_not_characters():
    frame = wire.encode(wire.Kind.CALL, EMOJI_ID, "c1", None, 1000, {"op": "get"})
    with pytest.raises(ProtocolError, match="1..128 bytes"):
        wire.decode(frame)
    ok = wire.decode(wire.encode(wire.Kind.CALL, "a" * 128, "c1", None, 1000, None))
    assert ok.id == "a" * 128
    with pytest.raises(ProtocolError, match="target name"):
        wire.decode(wire.encode(wire.Kind.CALL, "r1", "\u00e9" * 101, None, 1000, None))


def test_a_record_the_store_cannot_key_fails_alone(tmp_path):
    """Before: the LMDB key limit (511 bytes) failed the whole transaction."""
    store = Store(str(tmp_path / "s"), map_size_mb=1)
    try:
        b = Batch()
        b.add_put("good", Record(1, 1, msgpack.packb("kept")))
        b.add_replies("good", [("r1", b"R\xc0", 1.0, 61.0, None)], [])
        b.add_put("bad", Record(1, 1, msgpack.packb("refused")))
        b.add_replies("bad", [("x" * 600, b"R\xc0", 1.0, 61.0, None)], [])
        out = store.write(b)
        assert out.error is None
        assert set(out.failed) == {"bad"} and "exceeds" in out.failed["bad"]
        assert msgpack.unpackb(store.get("good").state) == "kept"
        assert store.get("bad") is None
        assert [r[0] for r in store.replies("good")] == ["r1"]
    finally:
        store.close()


async def test_an_oversized_request_id_is_refused_at_once_and_harms_no_one(cluster_factory):
    """Before: 128 emoji as a request id crashed every agent of its commit group, over
    and over, until the root supervisor gave up."""
    c = await cluster_factory()
    m = c.client()
    await m.spawn("a", "counter")
    await m.spawn("b", "counter")
    other = asyncio.ensure_future(m.call("b", {"op": "add", "n": 1}, request_id="honest-1"))
    with pytest.raises(BadRequest, match="bytes"):
        await m.call("a", {"op": "add", "n": 1}, request_id=EMOJI_ID)
    assert await other == 1
    assert await m.call("a", {"op": "get"}) == 0
    assert sum(n.stats["crashes"] for n in c.nodes.values()) == 0
    await c.close()


class FailingCommitter:
    """Commits for real, except the batches the test marks to fail as a full disk would."""

    def __init__(self, store, loop):
        self.store, self.loop, self.fail = store, loop, 0

    def submit(self, batch, done):
        if self.fail and (batch.puts or batch.claims):
            self.fail -= 1
            err = StoreError("commit failed: disk full (No space left on device)")
            err.disk_full = True
            self.loop.call_soon(done, Outcome(error=err))
        else:
            self.loop.call_soon(done, self.store.write(batch))

    def close(self):
        pass


async def test_a_failed_commit_rolls_the_agent_back_without_a_crash(cluster_factory):
    """Before: every agent of a failed commit crashed and counted against its supervisor's
    intensity (306 crashes for 20 appends on a full disk); the caller saw CallTimeout."""
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("c1", "counter")
    await m.call("c1", {"op": "add", "n": 5}, request_id="first")
    node = c.nodes[placed["node"]]
    node.committer = FailingCommitter(node.store, asyncio.get_running_loop())
    node.committer.fail = 1
    with pytest.raises(Unavailable, match="disk full") as failed:
        await m.call("c1", {"op": "add", "n": 7}, request_id="lost", timeout=0.5)
    assert failed.value.data.get("disk_full") is True
    assert node.stats["rollbacks"] == 1 and node.stats["crashes"] == 0
    runner = node.runners["c1"]
    assert runner.incarnation == placed["incarnation"] and runner.restarts == 0
    assert await m.call("c1", {"op": "get"}) == 5                    # back to the committed state
    assert await m.call("c1", {"op": "add", "n": 7}, request_id="lost") == 12  # the retry runs once
    assert await m.call("c1", {"op": "add", "n": 7}, request_id="lost") == 12
    assert msgpack.unpackb(node.store.get("c1").state) == {"value": 12}
    await c.close()


async def test_a_rollback_cancels_the_handler_that_built_on_the_lost_state(cluster_factory):
    """A handler that started on top of a change whose commit then failed ends with the
    same error; the agent's state is its last committed one, and it serves on."""
    import kinds
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("w", "waiter")
    node = c.nodes[placed["node"]]
    held = node.committer = GatedCommitter(node.store)
    kinds.GATES["open"] = asyncio.Event()
    kinds.GATES["open"].set()
    first = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "open"}, request_id="one"))
    await c.settle()
    second = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "shut"}, request_id="two"))
    await c.settle()
    assert len(held.held) == 1 and not first.done() and not second.done()
    held.release(fail=True)
    for call in (first, second):
        with pytest.raises(Unavailable, match="disk full"):
            await call
    node.committer = FailingCommitter(node.store, asyncio.get_running_loop())
    assert await m.call("w", {"op": "get"}) is None
    assert node.runners["w"].status == "running" and node.stats["crashes"] == 0
    kinds.GATES.clear()
    kinds.RUNS.clear()
    await c.close()


async def test_a_rollback_in_the_turn_a_handler_was_started_leaves_the_agent_serving(cluster_factory):
    """A handler started and then cancelled by a rollback in the same loop turn never runs
    a line (Python throws a cancellation into a task before its first step): the runner
    must still end it, answer its caller and serve on. Before: the runner kept the dead
    task as its handler in hand and answered nothing again (the chaos suite's talk-0,
    silent for the rest of a run after a disk-full rollback)."""
    import kinds
    c = await cluster_factory()
    m = c.client()
    placed = await m.spawn("w", "waiter")
    node = c.nodes[placed["node"]]
    held = node.committer = GatedCommitter(node.store)
    kinds.GATES["open"] = asyncio.Event()
    kinds.GATES["open"].set()
    first = asyncio.ensure_future(m.call("w", {"op": "wait", "key": "open"}, request_id="one"))
    await c.settle()
    assert len(held.held) == 1 and not first.done()  # its change waits for its commit
    # one loop turn: a call that starts an async handler, then the failure of that commit
    loop = asyncio.get_running_loop()
    node.send(node.name, wire.encode(wire.Kind.CALL, "two", "w", "node:test", 5000, {"op": "wait", "key": "open"},
                          {"inc": placed["incarnation"]}))
    loop.call_soon(held.release, True)
    with pytest.raises(Unavailable, match="disk full"):
        await first
    node.committer = FailingCommitter(node.store, loop)  # commits from here on
    assert await asyncio.wait_for(m.call("w", {"op": "get"}), 5) is None  # back to its committed state
    assert await asyncio.wait_for(m.call("w", {"op": "wait", "key": "open"}), 5) == "released open"
    assert node.runners["w"].status == "running" and node.stats["crashes"] == 0
    kinds.GATES.clear()
    kinds.RUNS.clear()
    await c.close()


# --- identities: from the authenticated key, on every message --------------------------------

async def test_an_agent_sees_the_authenticated_sender_not_the_claimed_one(cluster_factory):
    """Before: ctx.sender was whatever the peer wrote ("node:n1" from a client key)."""
    c = await cluster_factory()
    m = c.client()
    await m.spawn("who", "whoami")
    placed = await m.whereis("who")
    for node in c.nodes.values():
        node.secure = True
    c.net.identities[m.links[placed["node"]].route] = "client:alice"
    m.caller.sender = "node:n1"  # a lie
    assert await m.call("who", {}) == {"sender": "client:alice", "claimed": "node:n1"}
    await c.close()


LIMITS = """
peer_rate = 1
peer_burst = 5
"""


async def test_limits_belong_to_the_key_not_the_connection(cluster_factory):
    """Before: ten connections with one key got ten bursts."""
    c = await cluster_factory(limits=LIMITS)
    admin = c.client()
    named = {"inc": (await admin.spawn("c1", "counter"))["incarnation"]}
    node = c.nodes[(await admin.whereis("c1"))["node"]]
    node.secure = True
    clients = [c.client() for _ in range(4)]
    for cl in clients:  # connect each (as an unlimited peer), then name them all mallory
        await cl.caller.request(node.name, wire.Kind.WHEREIS, "c1", {}, 1.0)
        c.net.identities[cl.links[node.name].route] = "client:mallory"
    answered = busy = 0
    for _ in range(3):
        for cl in clients:
            try:
                await cl.caller.request(node.name, wire.Kind.CALL, "c1", {"op": "get"}, 1.0, meta=named)
                answered += 1
            except Exception as exc:
                assert type(exc).__name__ == "Busy"
                busy += 1
    assert answered <= 5 and busy >= 7
    await c.close()


# --- a peer's share of a loop turn ---------------------------------------------------------

def _record_calls(node) -> list[str]:
    """The request ids of the calls `node` hands on, in the order it does."""
    order, handle = [], node.handlers[wire.Kind.CALL]

    def recording(msg, origin):
        order.append(msg.id)
        handle(msg, origin)
    node.handlers[wire.Kind.CALL] = recording
    return order


@pytest.mark.parametrize("framing", ["one batch", "many frames"])
async def test_a_flood_from_one_peer_delays_another_peers_call_by_one_round_not_the_flood(cluster_factory, framing):
    """Before: requests were handled first come first served, so a call that came after
    another peer's 500 waited for all 500 (issue 11, item 7)."""
    c = await cluster_factory()
    admin = c.client()
    busy = (await admin.spawn("busy", "counter"))["incarnation"]
    node = c.nodes[(await admin.whereis("busy"))["node"]]
    for i in range(10):  # another agent on the same node
        quiet = f"quiet{i}"
        placed = await admin.spawn(quiet, "counter")
        if placed["node"] == node.name:
            break
    else:
        pytest.fail("no second agent on the node of the first")
    flooder, honest = c.client(), c.client()
    for cl in (flooder, honest):  # connect both first
        await cl.caller.request(node.name, wire.Kind.WHEREIS, "busy", {}, 1.0)
    await c.settle()
    order = _record_calls(node)
    flood = [wire.encode(wire.Kind.CALL, f"flood-{i}", "busy", None, 5000, {"op": "add", "n": 1}, {"inc": busy})
             for i in range(500)]
    if framing == "one batch":
        flooder._send(node.name, wire.batch_frame(flood))
    else:
        for frame in flood:
            flooder._send(node.name, frame)
    honest._send(node.name, wire.encode(wire.Kind.CALL, "honest-1", quiet, None, 5000, {"op": "get"},
                                        {"inc": placed["incarnation"]}))
    await c.settle()
    assert len(order) == 501
    honest_at = next(i for i, rid in enumerate(order) if not rid.startswith("flood-"))
    assert honest_at <= 2, f"the honest call was handled {honest_at + 1}th"
    # and the flood kept its order: a peer's requests are handled first in, first out
    assert [rid for rid in order if rid.startswith("flood-")] == [f"flood-{i}" for i in range(500)]
    assert await admin.call("busy", {"op": "get"}) == 500
    await c.close()


def test_the_fair_queue_serves_round_robin_first_in_first_out_per_peer_within_its_bounds():
    import math
    from mesh.limits import FairQueue
    q = FairQueue()
    q.extend("a", [("a", i) for i in range(5)])
    q.put("b", ("b", 0))
    q.put("c", ("c", 0))
    q.put("b", ("b", 1))
    seen, emptied = [], []
    assert q.serve(lambda who, i: seen.append((who, i)), 4, math.inf, emptied.append) == 4
    assert seen == [("a", 0), ("b", 0), ("c", 0), ("a", 1)] and emptied == [("c", 0)]
    assert q.items == 4
    assert q.serve(lambda who, i: seen.append((who, i)), 100, math.inf, emptied.append) == 4
    assert seen[4:] == [("b", 1), ("a", 2), ("a", 3), ("a", 4)]  # alone, a takes the rest at once
    assert emptied == [("c", 0), ("b", 1), ("a", 4)] and q.items == 0 and not q.queues and not q.ready
    # a turn out of time still serves one, and a handler that raises loses nobody's place
    q.extend("a", [("a", 5), ("a", 6)])
    assert q.serve(lambda who, i: None, 100, 0.0) == 1 and q.items == 1

    def boom(who, i):
        raise RuntimeError("handler bug")
    with pytest.raises(RuntimeError):
        q.serve(boom, 100, math.inf)
    assert q.items == 0 and not q.queues and not q.ready


# --- decoding work is bounded per message and per peer --------------------------------------

def test_a_huge_map_from_an_untrusted_peer_is_refused_before_it_is_built():
    body = {f"k{i}": 1 for i in range(200_000)}
    frame = wire.encode(wire.Kind.CALL, "r1", "c1", None, 1000, body)
    with pytest.raises(ProtocolError, match="max_map_len"):
        wire.decode(frame, max_elements=100_000)
    assert len(wire.decode(frame).body) == 200_000  # a node's own traffic is not bounded so


def test_the_timestamp_extension_is_refused_like_every_other():
    import datetime
    body = {"when": msgpack.Timestamp.from_datetime(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))}
    frame = msgpack.packb([wire.PROTOCOL_VERSION, 1, "r1", "c1", None, 1000, body, None])
    with pytest.raises(ProtocolError, match="timestamp"):
        wire.decode(frame)
    # the same bytes inside a string are no extension
    wire.decode(wire.encode(wire.Kind.CALL, "r1", "c1", None, 1000, {"s": "\xd7\xff"}))



async def test_a_peer_that_costs_too_much_decoding_is_dropped_unread_and_others_are_not(cluster_factory):
    """Before: 45 frames that each took a second to decode froze a node for 33 s."""
    c = await cluster_factory()
    admin = c.client()
    named = {"inc": (await admin.spawn("c1", "counter"))["incarnation"]}
    node = c.nodes[(await admin.whereis("c1"))["node"]]
    greedy, polite = c.client(), c.client()
    for n in c.nodes.values():
        n.secure = True
    for who, cl in (("greedy", greedy), ("polite", polite)):
        await cl.caller.request(node.name, wire.Kind.WHEREIS, "c1", {}, 1.0)  # connects, as a node would
        c.net.identities[cl.links[node.name].route] = f"client:{who}"
    node.intake.peer_limits.decode_share = node.intake.peer_limits.decode_burst = 1e-6  # one message's worth
    await greedy.caller.request(node.name, wire.Kind.CALL, "c1", {"op": "get"}, 1.0, meta=named)  # its budget is spent
    late = asyncio.ensure_future(greedy.caller.request(node.name, wire.Kind.CALL, "c1", {"op": "get"}, 1.0, meta=named))
    assert await polite.caller.request(node.name, wire.Kind.CALL, "c1", {"op": "get"}, 1.0, meta=named) == 0
    await c.settle()
    assert not late.done() and node.stats["over_decode_budget"] >= 1
    late.cancel()
    await c.close()


async def test_refusals_are_logged_in_summary_not_one_line_each(cluster_factory, caplog):
    """Before: ten frames of refused messages wrote 40,960 log lines. (Decoding them
    may take seconds on a loaded machine: the decoding budget is not what is tested.)"""
    c = await cluster_factory(limits="peer_decode_burst_s = 600")
    m = c.client()
    node = c.nodes[c.cfg.supervisor_node]
    await m.spawn("x", "counter")  # connects to the supervisor's node
    for n in c.nodes.values():
        n.secure = True
    c.net.identities[m.links[node.name].route] = "client:alice"
    spawn = [wire.encode(wire.Kind.SPAWN, f"s{i}", None, None, 1000, {"name": f"a{i}", "kind": "counter"})
             for i in range(wire.MAX_BATCH)]
    caplog.clear()
    for _ in range(10):
        m._send(node.name, wire.batch_frame(spawn))
    await c.settle()
    assert node.stats["not_allowed"] == 10 * wire.MAX_BATCH
    lines = [r for r in caplog.records if "may not send" in r.getMessage()]
    assert 1 <= len(lines) <= 2
    await c.close()


async def test_a_message_over_the_size_limit_is_refused_at_once_not_timed_out(cluster_factory):
    """Before: 9 MiB of spawn args ended in CallTimeout."""
    c = await cluster_factory()
    m = c.client()
    with pytest.raises(BadRequest, match="too big"):
        await m.spawn("big", "counter", {"x": "y" * (9 << 20)})
    await m.spawn("ledger", "ledger")
    big = "z" * (5 << 20)
    await m.call("ledger", {"op": "append", "value": big})
    await m.call("ledger", {"op": "append", "value": big})
    with pytest.raises(BadRequest, match="over the limit"):  # a reply nobody could take
        await m.call("ledger", {"op": "read"})
    await c.close()


def test_the_cli_prints_json_as_the_standard_defines_it(capsys):
    """Before: `mesh call` printed [NaN], which is not JSON."""
    import json
    from mesh.cli import _to_json
    out = _to_json([float("nan"), float("inf"), {"x": -float("inf")}, 1.5])
    assert json.loads(out) == ["NaN", "Infinity", {"x": "-Infinity"}, 1.5]
    assert "NaN or Infinity" in capsys.readouterr().err


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_a_peer_that_never_reads_its_answers_cannot_grow_the_node():
    """Before: 300 reads of a 1 MB ledger, never read back, grew a node by 287 MiB
    (ZeroMQ bounds its queues in messages, not bytes)."""
    import zmq
    from mesh import transport
    from mesh.demo import free_ports
    port = free_ports(1)[0]
    ctx = zmq.Context()
    answer = b"x" * (1 << 20)
    seen = {"requests": 0}

    def on_request(route, frame):
        seen["requests"] += 1
        listener.send(route, answer)
        return 1
    listener = transport.Listener(ctx, f"tcp://127.0.0.1:{port}", on_request, 8 << 20, out_limit=8 << 20)
    slow = ctx.socket(zmq.DEALER)
    honest = ctx.socket(zmq.DEALER)
    try:
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.setsockopt(zmq.RCVBUF, 4096)
        slow.linger = honest.linger = 0
        slow.connect(f"tcp://127.0.0.1:{port}")
        honest.connect(f"tcp://127.0.0.1:{port}")
        before = _rss()
        for _ in range(300):
            slow.send(b"read")
        loop = asyncio.get_running_loop()
        until = loop.time() + 20
        while seen["requests"] + listener.unread_dropped < 300 and loop.time() < until:
            await asyncio.sleep(0.01)  # the listener works in this loop: give it turns
        assert listener.unread_dropped > 0
        assert _rss() - before < 96 << 20       # not 300 MiB
        for _ in range(5):                      # another peer is served in full meanwhile
            honest.send(b"read")
        got = 0
        while got < 5 and loop.time() < until:
            if honest.poll(0):
                honest.recv()
                got += 1
            else:
                await asyncio.sleep(0.01)
        assert got == 5
    finally:
        listener.close()
        slow.close(0)
        honest.close(0)
        ctx.term()


def _raw_zmtp_peer(port: int):
    """A peer that speaks ZMTP 3.0 itself (NULL mechanism), so it can send frames with
    "more" set and never the last one: libzmq's own sockets hold such frames back."""
    import socket
    import struct
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + b"\0" * 31)
    greeting = b""
    while len(greeting) < 64:
        greeting += s.recv(64 - len(greeting))
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return s


async def test_a_message_that_never_ends_costs_its_peer_the_connection():
    """Before: 200 frames of 1 MiB with "more" set and no last frame grew a node by
    191 MiB and on (ZMQ_MAXMSGSIZE bounds one frame, not a message)."""
    import struct
    import zmq
    from mesh import transport
    from mesh.demo import free_ports
    port = free_ports(1)[0]
    ctx = zmq.Context()
    listener = transport.Listener(ctx, f"tcp://127.0.0.1:{port}", lambda route, frame: 1, 1 << 20)
    listener.partial_limit = 8 << 20
    raw = _raw_zmtp_peer(port)
    try:
        frame = b"\x03" + struct.pack(">Q", 1 << 20) + b"x" * (1 << 20)
        loop = asyncio.get_running_loop()
        until = loop.time() + 20
        sent = 0
        raw.settimeout(5)
        while listener.cut == 0 and loop.time() < until and sent < 64:
            try:
                raw.sendall(frame)  # one more unfinished megabyte (ZeroMQ reads it at once)
                sent += 1
            except OSError:
                break
            listener.check_partial()
            await asyncio.sleep(0.01)
        assert listener.cut == 1 and sent < 64
    finally:
        raw.close()
        listener.close()
        ctx.term()
