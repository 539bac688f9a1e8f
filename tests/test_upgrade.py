"""Hot code upgrade (mesh/upgrade.py): versions in snapshots, code_change when an agent
starts from an older snapshot, and live upgrades and rollbacks of a kind, node by node.

In-memory cluster (tests/harness.py): real LMDB, real nodes and supervisor, fake clock.
Each test writes its kind's versions to a module of its own, on disk, and rewrites the
file to "deploy" new code, as an operator would.
"""

import asyncio
import sys
import textwrap
import uuid

import msgpack
import pytest

import harness
from harness import Cluster
from mesh import config as config_mod
from mesh.errors import AgentDown, CallTimeout, Unavailable
from mesh.runner import AgentStatus
from mesh.store import FORMAT, Batch, Record, Store, decode_record
from mesh.wire import Kind

V1 = '''
import asyncio
from mesh import Agent, BadRequest

GATES = {}

class Box(Agent):
    """Version 1: counts in state["count"]."""

    def init(self, args, state):
        return state if state is not None else {"count": 0, "poison": bool(args.get("poison"))}

    async def handle_call(self, msg, ctx):
        if msg == "add":
            self.state["count"] += 1
            return ["v1", self.state["count"]]
        if msg == "get":
            return ["v1", self.state["count"]]
        if msg == "hold":  # an async handler in hand until the test releases it
            self.state["count"] += 1
            await GATES.setdefault("hold", asyncio.Event()).wait()
            return ["v1", self.state["count"]]
        raise BadRequest(msg)
'''

V1_DOWNGRADES = V1 + '''
    def code_change(self, old_vsn, state, extra):
        if old_vsn == 2:  # rollback: version 2's state, back to ours
            return {"count": state["total"], "poison": state["poison"]}
        return state
'''

V2 = '''
from mesh import Agent, BadRequest

class Box(Agent):
    """Version 2: the field is renamed to state["total"]."""

    vsn = 2

    def init(self, args, state):
        return state if state is not None else {"total": 0, "poison": bool(args.get("poison"))}

    def code_change(self, old_vsn, state, extra):
        if old_vsn == 1:
            if state["poison"]:
                raise ValueError("this one cannot be migrated")
            return {"total": state["count"] + (extra or {}).get("bonus", 0), "poison": state["poison"]}
        return state

    def handle_call(self, msg, ctx):
        if msg == "add":
            self.state["total"] += 1
            return ["v2", self.state["total"]]
        if msg == "get":
            return ["v2", self.state["total"]]
        raise BadRequest(msg)
'''

BROKEN = "from mesh import Agent\nclass Box(Agent):\n    vsn = 2\n    def handle_call(self, msg, ctx)\n"


@pytest.fixture
def kind(tmp_path):
    """A module of its own for this test's kind: returns (module name, write(source))."""
    moddir = tmp_path / "mods"
    moddir.mkdir()
    name = f"upbox_{uuid.uuid4().hex[:10]}"
    path = moddir / f"{name}.py"

    def write(source: str) -> None:
        path.write_text(textwrap.dedent(source))
    write(V1)
    sys.path.insert(0, str(moddir))
    yield name, write
    sys.path.remove(str(moddir))
    sys.modules.pop(name, None)


def box_config(tmp_path, module: str) -> config_mod.Config:
    base = harness.BASE.replace("[kinds]\n", f'[kinds]\nbox = "{module}:Box"\n', 1)
    path = tmp_path / "cluster.toml"
    path.write_text(textwrap.dedent(base.format(mailbox=100, limits="")))
    return config_mod.load(path)


@pytest.fixture
def box_cluster(tmp_path, kind):
    made = []

    async def make() -> Cluster:
        c = Cluster(box_config(tmp_path, kind[0]), tmp_path)
        made.append(c)
        await c.start()
        return c
    return make


def runner_of(c: Cluster, name: str):
    for node in c.nodes.values():
        r = node.runners.get(name)
        if r is not None and r.status == AgentStatus.RUNNING:
            return node, r
    raise AssertionError(f"{name} runs nowhere")


async def spawn_off_supervisor(c: Cluster, m) -> tuple[str, str]:
    """Spawn boxes until one lands on a node other than the supervisor's (one that can be
    killed while the supervisor moves its agents); returns (name, node)."""
    for i in range(len(c.cfg.nodes) + 1):
        placed = await m.spawn(f"b{i}", "box")
        if placed["node"] != c.cfg.supervisor_node:
            return placed["name"], placed["node"]
    raise AssertionError("every box landed on the supervisor's node")


def stored(c: Cluster, name: str) -> Record:
    return c.stores["h1"].get(name)


# --- snapshots record the version that wrote them ------------------------------------------

def test_a_record_keeps_its_version_and_an_old_record_reads_as_version_1(tmp_path):
    store = Store(str(tmp_path / "s"), sync=False)
    batch = Batch()
    batch.add_claim("new", Record(1, 1, msgpack.packb({"total": 1}), vsn=3))
    assert not store.write(batch).fenced
    assert store.get("new") == Record(1, 1, msgpack.packb({"total": 1}), 3)
    assert msgpack.unpackb(store.env.begin().get(b"new", db=store.agents))[0] == FORMAT
    # a record written before kinds had versions: [2, incarnation, seq, state]
    with store.env.begin(write=True) as txn:
        txn.put(b"old", msgpack.packb([2, 5, 7, msgpack.packb({"count": 2})]), db=store.agents)
    assert store.get("old") == Record(5, 7, msgpack.packb({"count": 2}), 1)
    # version 1's state is written as before versions: the previous release reads it too
    batch = Batch()
    batch.add_claim("v1", Record(1, 1, msgpack.packb({"total": 1})))
    assert not store.write(batch).fenced
    assert msgpack.unpackb(store.env.begin().get(b"v1", db=store.agents)) == [2, 1, 1, msgpack.packb({"total": 1})]
    assert store.get("v1") == Record(1, 1, msgpack.packb({"total": 1}), 1)
    store.close()
    # and the same on the wire: four fields are version 1, five carry it
    assert Record(1, 2, b"x").to_wire("a") == ["a", 1, 2, b"x"] and Record(1, 2, b"x", 4).to_wire("a")[4] == 4
    assert Record.from_wire(["a", 1, 2, b"x"]) == ("a", Record(1, 2, b"x", 1))
    assert Record.from_wire(["a", 1, 2, b"x", 4]) == ("a", Record(1, 2, b"x", 4))
    for bad in (["a", 1, 2, b"x", 0], ["a", 1, 2, b"x", "2"], ["a", 1, 2, b"x", 2, 3]):
        with pytest.raises(ValueError):
            Record.from_wire(bad)
    with pytest.raises(Exception, match="unknown record layout"):
        decode_record("x", msgpack.packb([3, 1, 1, b"", 1, "extra"]))


async def test_every_commit_records_the_version_of_its_code(box_cluster):
    c = await box_cluster()
    m = c.client()
    await m.spawn("b1", "box")
    assert await m.call("b1", "add") == ["v1", 1]
    assert stored(c, "b1").vsn == 1
    st = await m.status()
    assert [a["vsn"] for a in st["agents"] if a["name"] == "b1"] == [1]
    await c.close()


# --- live upgrade ---------------------------------------------------------------------------

async def test_upgrade_migrates_a_renamed_field_under_continuous_calls(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    names = [f"b{i}" for i in range(6)]
    for name in names:
        await m.spawn(name, "box")
    kind[1](V2)
    answers: dict[str, list] = {name: [] for name in names}
    upgrading = asyncio.ensure_future(m.upgrade("box", extra={"bonus": 100}))
    calls = []
    # calls keep arriving, one wave per loop turn, while the upgrade goes on (as many as
    # the mailboxes take: a paused agent's calls wait there)
    while not upgrading.done() and len(calls) < 60 * len(names):
        calls += [asyncio.ensure_future(m.call(name, "add", request_id=f"{name}-{len(calls)}")) for name in names]
        await asyncio.sleep(0)
    assert not upgrading.done() or len(calls) > len(names)  # calls were in flight during the roll
    result = await upgrading
    calls += [asyncio.ensure_future(m.call(name, "add")) for name in names]
    replies = await asyncio.gather(*calls)  # none failed: gather raises on the first error
    for i, reply in enumerate(replies):
        answers[names[i % len(names)]].append(reply)
    assert result["failed"] == [] and result["from_vsn"] == 1 and result["to_vsn"] == 2
    assert result["agents"] == result["migrated"] == 6 and result["nodes"] == ["n1", "n2", "n3"]
    for name in names:
        seen = answers[name]
        # every call ran once, on one version or the other, and v1's count went on as v2's
        # total (+ the bonus the upgrade's extra gave): nothing lost, nothing doubled
        v1 = [n for v, n in seen if v == "v1"]
        v2 = [n - 100 for v, n in seen if v == "v2"]
        assert v1 + v2 == list(range(1, len(seen) + 1)), (name, seen)
        assert v2 and seen[-1][0] == "v2"
        record = stored(c, name)
        assert record.vsn == 2 and msgpack.unpackb(record.state) == {"total": len(seen) + 100, "poison": False}
    st = await m.status()
    assert {a["vsn"] for a in st["agents"]} == {2}
    assert [n["kinds"]["box"] for n in st["nodes"]] == [2, 2, 2]  # which code each node runs
    # a new spawn, and a restart, run the new code
    await m.spawn("fresh", "box")
    assert await m.call("fresh", "add") == ["v2", 1]
    # a node says how long it paused its agents (each for its slice's time); one with none, nil
    kind[1](V2.replace("vsn = 2", "vsn = 3"))
    answers = [await m.caller.request(node, Kind.UPGRADE, None, {"kind": "box"}, 10) for node in c.cfg.nodes]
    for answer in answers:
        pause = answer["pause_ms"]
        assert answer["failed"] == [] and (pause is None) == (answer["agents"] == 0)
        assert pause is None or 0 <= pause["p50"] <= pause["p99"] <= pause["max"]
    await c.close()


async def test_a_call_that_arrives_while_paused_waits_and_runs_on_the_new_code(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    placed = await m.spawn("b1", "box")
    node = c.nodes[placed["node"]]
    module = sys.modules[kind[0]]
    held = asyncio.ensure_future(m.call("b1", "hold"))
    await c.settle()
    kind[1](V2)
    upgrading = asyncio.ensure_future(node.upgrades.upgrade("box"))
    await c.settle()
    queued = asyncio.ensure_future(m.call("b1", "add"))
    await c.settle()
    # the handler in hand is never cut: the upgrade waits for it, and the call behind it waits
    assert not upgrading.done() and not held.done() and not queued.done()
    _, r = runner_of(c, "b1")
    assert r.paused and r.vsn == 1 and len(r.mailbox) == 1
    module.GATES["hold"].set()
    assert await held == ["v1", 1]
    result = await upgrading
    assert result["migrated"] == 1 and result["failed"] == []
    assert await queued == ["v2", 2]
    assert stored(c, "b1").vsn == 2
    await c.close()


async def test_a_failing_code_change_leaves_every_agent_of_the_node_on_its_old_code(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    await m.spawn("good", "box")
    bad = await m.spawn("bad", "box", {"poison": True})
    for name in ("good", "bad"):
        await m.call(name, "add")
    before = {name: stored(c, name) for name in ("good", "bad")}
    kind[1](V2)
    result = await m.upgrade("box")
    assert [f["agent"] for f in result["failed"]] == ["bad"]
    assert result["failed"][0]["node"] == bad["node"]
    assert "cannot be migrated" in result["failed"][0]["error"]
    # every node checked first: no node moved, nothing was written
    assert result["nodes"] == [] and result["migrated"] == 0
    assert await m.call("bad", "add") == ["v1", 2] and await m.call("good", "add") == ["v1", 2]
    assert stored(c, "bad").vsn == 1 and msgpack.unpackb(stored(c, "bad").state)["count"] == 2
    assert all(node.upgrades.vsn_of("box") in (1, None) for node in c.nodes.values())
    # the node's own step is all or none too (per slice of agents): asked directly, it migrates neither
    node = c.nodes[bad["node"]]
    good_node, _ = runner_of(c, "good")
    result = await node.upgrades.upgrade("box")
    assert [f["agent"] for f in result["failed"]] == ["bad"] and result["migrated"] == 0
    assert node.upgrades.vsn_of("box") == 1
    if good_node is node:
        assert stored(c, "good").vsn == 1 and runner_of(c, "good")[1].vsn == 1
    assert await m.call("bad", "get") == ["v1", 2]
    assert before["bad"].vsn == 1
    await c.close()


async def test_a_module_that_fails_to_import_changes_nothing(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    await m.spawn("b1", "box")
    module = sys.modules[kind[0]]
    kind[1](BROKEN)
    result = await m.upgrade("box")
    assert result["nodes"] == [] and len(result["failed"]) == 1
    assert result["failed"][0]["agent"] is None and "SyntaxError" in result["failed"][0]["error"]
    assert sys.modules[kind[0]] is module  # the old module is untouched
    assert await m.call("b1", "add") == ["v1", 1] and stored(c, "b1").vsn == 1
    await c.close()


async def test_rollback_runs_the_previous_code_with_a_downgraded_state(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    await m.spawn("b1", "box")
    await m.call("b1", "add")
    kind[1](V2)
    assert (await m.upgrade("box"))["failed"] == []
    assert await m.call("b1", "add") == ["v2", 2]
    # version 1 as it ran defines no downgrade: refused, the agent stays on version 2
    refused = await m.upgrade("box", rollback=True)
    assert refused["failed"] and "no downgrade" in refused["failed"][0]["error"]
    assert await m.call("b1", "get") == ["v2", 2] and stored(c, "b1").vsn == 2
    await c.close()


async def test_rollback_with_a_downgrade(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    await m.spawn("b1", "box")
    kind[1](V1_DOWNGRADES)
    assert (await m.upgrade("box"))["failed"] == []  # same version, code that can downgrade
    kind[1](V2)
    assert (await m.upgrade("box"))["to_vsn"] == 2
    assert await m.call("b1", "add") == ["v2", 1]
    back = await m.upgrade("box", rollback=True)
    assert back["failed"] == [] and back["from_vsn"] == 2 and back["to_vsn"] == 1 and back["migrated"] == 1
    assert await m.call("b1", "add") == ["v1", 2]
    assert stored(c, "b1").vsn == 1 and msgpack.unpackb(stored(c, "b1").state) == {"count": 2, "poison": False}
    await c.close()


# --- starts from a snapshot of another version -----------------------------------------------

async def test_a_node_started_after_the_upgrade_loads_the_new_code_not_the_imported_one(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    placed = await m.spawn("b1", "box")
    old_module = sys.modules[kind[0]]
    kind[1](V2)
    assert (await m.upgrade("box"))["failed"] == []
    # a process forked from a parent that imported version 1 long ago
    sys.modules[kind[0]] = old_module
    node = await c.restart(placed["node"])
    assert node.upgrades.kind_class("box").vsn == 2
    assert (await c.run(m.call("b1", "add")))[0] == "v2"
    await c.close()


async def test_an_agent_restarted_after_the_upgrade_migrates_its_old_snapshot(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    b, home = await spawn_off_supervisor(c, m)
    assert await m.call(b, "add") == ["v1", 1]
    c.kill(home)  # down with its version 1 snapshot, before any upgrade
    kind[1](V2)
    for node in c.nodes.values():  # the others are upgraded while it is down
        assert (await node.upgrades.upgrade("box"))["failed"] == []
    # moved to an upgraded node: code_change runs on its old snapshot before init
    assert await c.run(m.call(b, "add"), limit_s=20) == ["v2", 2]
    assert stored(c, b).vsn == 2
    await c.close()


async def test_a_snapshot_of_newer_code_is_refused_where_the_code_is_older(box_cluster, kind, caplog):
    c = await box_cluster()
    m = c.client()
    b, home = await spawn_off_supervisor(c, m)
    for node in c.nodes.values():  # each runs version 1 (a node that never ran the kind would
        assert node.upgrades.kind_class("box").vsn == 1  # load what its host's store says)
    kind[1](V2)
    assert (await c.nodes[home].upgrades.upgrade("box"))["failed"] == []  # only its own node
    await m.call(b, "add")
    c.kill(home)
    # the others still run version 1: b's version 2 state is never handed to them
    with pytest.raises((AgentDown, CallTimeout, Unavailable)):
        await c.run(m.call(b, "get", timeout=3), limit_s=5)
    assert "written by version 2" in caplog.text
    assert all(b not in node.runners or node.runners[b].status != AgentStatus.RUNNING
               for node in c.nodes.values())
    assert stored(c, b).vsn == 2
    # once they are upgraded, it runs again
    for node in c.nodes.values():
        assert (await node.upgrades.upgrade("box"))["failed"] == []
    assert await c.run(m.call(b, "get"), limit_s=30) == ["v2", 1]
    await c.close()


async def test_an_upgrade_waits_out_a_crash_and_an_agent_crashed_meanwhile_starts_on_new_code(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    placed = await m.spawn("b1", "box")
    node = c.nodes[placed["node"]]
    held = asyncio.ensure_future(m.call("b1", "hold"))
    await c.settle()
    kind[1](V2)
    upgrading = asyncio.ensure_future(node.upgrades.upgrade("box"))
    await c.settle()
    _, r = runner_of(c, "b1")
    r.task.cancel()  # the handler in hand dies (cut by its deadline, as check_deadline does)
    result = await upgrading
    assert result["failed"] == []  # its crash is no failure of the upgrade
    with pytest.raises(Exception):
        await held
    # its restart (same node, from its last good state, written by version 1) runs version 2
    assert await c.run(m.call("b1", "get"), limit_s=10) == ["v2", 0]
    assert stored(c, "b1").vsn == 2
    await c.close()


async def test_a_commit_that_fails_puts_the_old_code_back(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    placed = await m.spawn("b1", "box")
    await m.call("b1", "add")
    node = c.nodes[placed["node"]]
    kind[1](V2)
    c.fill_disk("h1")
    result = await node.upgrades.upgrade("box")
    assert [f["agent"] for f in result["failed"]] == ["b1"] and "disk full" in result["failed"][0]["error"]
    c.free_disk("h1")
    assert node.upgrades.vsn_of("box") == 1
    assert await m.call("b1", "add") == ["v1", 2] and stored(c, "b1").vsn == 1
    await c.close()


@pytest.mark.async_timeout(60)
async def test_a_node_killed_mid_roll_leaves_every_agent_on_a_consistent_version(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    b, home = await spawn_off_supervisor(c, m)
    module = sys.modules[kind[0]]
    others = [(await m.spawn(f"o{i}", "box"))["name"] for i in range(3)]
    held = asyncio.ensure_future(m.call(b, "hold"))
    await c.settle()
    kind[1](V2)
    upgrading = asyncio.ensure_future(m.upgrade("box"))
    await c.settle()
    _, r = runner_of(c, b)
    assert r.paused and not upgrading.done()  # the roll reached b's node, and waits for its handler
    previous = c.kill(home)
    module.GATES.setdefault("hold", asyncio.Event()).set()  # a retry of the held call is not held again
    result = await c.run(upgrading, limit_s=60)
    assert result["failed"] and result["failed"][0]["node"] == home
    assert home not in result["nodes"]
    await asyncio.gather(held, return_exceptions=True)  # retried elsewhere: answered or failed
    # wherever each agent runs now, its code, its record and its node's code agree
    for name in [b, *others]:
        reply = await c.run(m.call(name, "get"), limit_s=20)
        node, r = runner_of(c, name)
        assert r.vsn == type(r.agent).vsn == node.upgrades.vsn_of("box") == stored(c, name).vsn
        assert reply[0] == f"v{r.vsn}"
    # once the node is back (its launcher forks it again), the upgrade run again finishes the roll
    await c.start_node(home, previous)
    again = await c.run(m.upgrade("box"), limit_s=30)
    assert again["failed"] == [] and again["nodes"] == list(c.cfg.nodes)
    for name in [b, *others]:
        assert (await c.run(m.call(name, "get"), limit_s=20))[0] == "v2" and stored(c, name).vsn == 2
    await c.close()


async def test_upgrade_to_another_module_and_roll_back_after_a_node_restarted(box_cluster, kind, tmp_path):
    name, write = kind
    write(V1_DOWNGRADES)
    (tmp_path / "mods" / f"{name}_v2.py").write_text(textwrap.dedent(V2))
    try:
        c = await box_cluster()
        m = c.client()
        b, home = await spawn_off_supervisor(c, m)
        await m.call(b, "add")
        result = await m.upgrade("box", to=f"{name}_v2:Box")
        assert result["failed"] == [] and result["to_vsn"] == 2
        assert await m.call(b, "add") == ["v2", 2]
        # the node restarts: it runs what the store says (the --to module), and remembers
        # which code that replaced, so a rollback still finds the previous code
        await c.restart(home)
        assert c.nodes[home].upgrades.kind_class("box").__module__ == f"{name}_v2"
        back = await c.run(m.upgrade("box", rollback=True), limit_s=30)
        assert back["failed"] == [] and back["to_vsn"] == 1
        assert await c.run(m.call(b, "add"), limit_s=20) == ["v1", 3]
        assert stored(c, b).vsn == 1 and all(n.upgrades.vsn_of("box") in (1, None) for n in c.nodes.values())
        await c.close()
    finally:
        sys.modules.pop(f"{name}_v2", None)


async def test_only_an_admin_may_upgrade(box_cluster, kind):
    c = await box_cluster()
    m = c.client()
    await m.spawn("b1", "box")
    for node in c.nodes.values():
        node.secure = True
    for name in c.cfg.nodes:
        c.net.identities[m._link(name).route] = "client:alice"  # connected first, if not yet
    kind[1](V2)
    refused = await m.upgrade("box")
    assert refused["nodes"] == [] and "client:alice may not send UPGRADE" in refused["failed"][0]["error"]
    assert await m.call("b1", "get") == ["v1", 0]
    for name in c.cfg.nodes:
        c.net.identities[m.links[name].route] = "admin:ops"
    assert (await m.upgrade("box"))["failed"] == []
    assert await m.call("b1", "get") == ["v2", 0]
    await c.close()


async def test_with_replicas_a_live_upgrade_reaches_the_copies_and_a_promoted_copy_is_migrated(tmp_path, kind):
    from test_replication import HOSTS
    path = tmp_path / "hosts.toml"
    path.write_text(textwrap.dedent(HOSTS.format(replicas=1)).replace("[kinds]\n", f'[kinds]\nbox = "{kind[0]}:Box"\n'))
    c = Cluster(config_mod.load(path), tmp_path)
    await c.start()
    m = c.client()
    b, home = await spawn_off_supervisor(c, m)
    await m.call(b, "add")
    copies = [h for h in c.cfg.hosts if h != c.cfg.nodes[home].host and c.stores[h].get(b) is not None]
    assert copies and c.stores[copies[0]].get(b).vsn == 1
    kind[1](V2)
    for name, node in c.nodes.items():  # every node but its home
        if name != home:
            assert (await node.upgrades.upgrade("box"))["failed"] == []
    c.kill(home)  # its host is gone: the agent is promoted from its copy
    assert await c.run(m.call(b, "add"), limit_s=20) == ["v2", 2]  # code_change ran on the copy
    assert all(c.stores[h].get(b).vsn == 2 for h in c.cfg.hosts if h != c.cfg.nodes[home].host)
    for other in [n for node in c.nodes.values() for n in node.runners if n != b]:
        # an agent whose copy was on the lost host gets another replica host at its next commit
        await c.run(m.call(other, "add"), limit_s=20)
    # a live upgrade's commit reaches the replica hosts too, version and all
    v = "v-live"
    await m.spawn(v, "box")
    kind[1](V2.replace("vsn = 2", "vsn = 3"))
    for node in c.nodes.values():
        assert (await node.upgrades.upgrade("box"))["failed"] == []
    assert await m.call(v, "add") == ["v2", 1]  # version 3 answers as version 2 did
    holders = [h for h, store in c.stores.items() if h != c.cfg.nodes[home].host and store.get(v) is not None]
    assert len(holders) == 2 and all(c.stores[h].get(v).vsn == 3 for h in holders)
    await c.close()


async def test_slices_before_a_failing_one_keep_the_new_code(box_cluster, kind, monkeypatch):
    import mesh.upgrade
    monkeypatch.setattr(mesh.upgrade, "SLICE", 1)
    c = await box_cluster()
    m = c.client()
    for i in range(3):
        await m.spawn(f"g{i}", "box")
    bad = await m.spawn("bad", "box", {"poison": True})
    node = c.nodes[bad["node"]]
    good = [name for name in node.runners if name != "bad"]
    assert good and list(node.runners).index("bad") > list(node.runners).index(good[0])
    kind[1](V2)
    result = await node.upgrades.upgrade("box")
    assert [f["agent"] for f in result["failed"]] == ["bad"] and result["migrated"] == len(good)
    assert all(stored(c, name).vsn == 2 for name in good) and stored(c, "bad").vsn == 1
    assert await m.call(good[0], "get") == ["v2", 0] and await m.call("bad", "get") == ["v1", 0]
    await c.close()
