"""`mesh upgrade` on a real mesh: `mesh up` process trees, the CLI, kill -9 of a node
forked again by a launcher that imported the old code before the upgrade."""

import asyncio
import json
import textwrap

import pytest

import mesh
import procs
from procs import TESTS, mesh_cmd, meshrun
from test_upgrade import V1, V2

V3_FAILS = V2.replace("vsn = 2", "vsn = 3").replace(
    "        if old_vsn == 1:", "        if old_vsn == 2:\n            raise RuntimeError('no way to version 3')\n        if old_vsn == 1:")


@pytest.fixture
def box_mesh(tmp_path):
    """A three-node mesh whose allow-list names `box`, a module in a folder of the test's
    own; returns (config path, write(source), the run). Ended by pid at the end."""
    moddir = tmp_path / "mods"
    moddir.mkdir()
    module = moddir / "upbox_procs.py"

    def write(source: str) -> None:
        module.write_text(textwrap.dedent(source))
    write(V1)
    cfg = procs.write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[kinds]\n", '[kinds]\nbox = "upbox_procs:Box"\n', 1))
    run = meshrun.MeshRun("up", "-c", str(cfg), env=meshrun.env([str(TESTS), str(moddir)]))
    try:
        run.start(wait_for="mesh ready")
        yield cfg, write, run
    finally:
        run.stop()


def cli(cfg, *args, timeout=60):
    return mesh_cmd(args[0], "-c", str(cfg), *args[1:], timeout=timeout)


@pytest.mark.async_timeout(120)
async def test_mesh_upgrade_under_calls_then_a_forked_node_runs_the_new_code(box_mesh):
    cfg, write, run = box_mesh
    async with mesh.connect(cfg) as m:
        names = [f"b{i}" for i in range(4)]
        placed = {n: (await m.spawn(n, "box"))["node"] for n in names}
        failures, replies = [], {n: [] for n in names}
        stop = asyncio.Event()

        async def caller(name):
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    replies[name].append(await m.call(name, "add", timeout=10, request_id=f"{name}-{i}"))
                except Exception as exc:  # every failure is counted, none expected
                    failures.append((name, repr(exc)))
        callers = [asyncio.ensure_future(caller(n)) for n in names]
        while min(len(r) for r in replies.values()) < 3:
            await asyncio.sleep(0.01)
        write(V2)
        up = await asyncio.to_thread(cli, cfg, "upgrade", "box", "--extra", '{"bonus": 100}')
        seen_after = {n: len(r) for n, r in replies.items()}
        while any(len(replies[n]) < seen_after[n] + 3 for n in names):
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*callers)
        assert up.returncode == 0, up.stdout + up.stderr
        result = json.loads(up.stdout)
        assert result == {"kind": "box", "from_vsn": 1, "to_vsn": 2, "nodes": ["n1", "n2", "n3"],
                          "agents": 4, "migrated": 4, "failed": []}
        assert failures == []
        for name in names:  # each call ran once: v1's count went on as v2's total (+ the bonus)
            counts = [n if v == "v1" else n - 100 for v, n in replies[name]]
            assert counts == list(range(1, len(counts) + 1)) and replies[name][-1][0] == "v2"

        st = json.loads(cli(cfg, "status", "--json").stdout)
        assert {a["name"]: a["vsn"] for a in st["agents"] if a["name"] in names} == {n: 2 for n in names}
        table = cli(cfg, "status").stdout.splitlines()
        header = next(line for line in table if line.startswith("AGENT"))
        assert header.split() == ["AGENT", "KIND", "NODE", "INCARNATION", "VSN", "RESTARTS", "MAILBOX", "STATUS"]
        assert all(line.split()[4] == "2" for line in table if line.split()[:1] in ([n] for n in names))

        # kill -9 of a node: its launcher forks it again from a parent that imported
        # version 1 before the upgrade; what it starts runs version 2 all the same
        victim = next((node for node in placed.values() if node != "n1"), "n1")
        moved = [n for n, node in placed.items() if node == victim]
        mark = run.mark()
        old_pid = run.kill_node(victim)
        run.wait_for(rf"node {victim} restarted", start=mark)
        for name in moved:  # moved, to the restarted node or another, with their state
            reply = await m.call(name, "get", timeout=15)
            assert reply[0] == "v2" and reply[1] == len(replies[name]) + 100
        assert run.pids[victim] != old_pid
        for i in range(8):  # and what starts on the restarted node itself runs version 2
            if (await m.spawn(f"new{i}", "box"))["node"] == victim:
                assert await m.call(f"new{i}", "add") == ["v2", 1]
                break
        else:
            pytest.fail(f"no new agent was placed on the restarted {victim}")

        # a code_change that raises: exit 1, the agent named, every agent on version 2
        write(V3_FAILS)
        bad = await asyncio.to_thread(cli, cfg, "upgrade", "box")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        result = json.loads(bad.stdout)
        assert result["failed"] and result["failed"][0]["agent"] in names
        assert "no way to version 3" in result["failed"][0]["error"]
        for name in names:
            assert (await m.call(name, "get"))[0] == "v2"


@pytest.mark.async_timeout(90)
async def test_mesh_drain_and_undrain_under_calls(box_mesh):
    cfg, _write, run = box_mesh
    async with mesh.connect(cfg) as m:
        names = [f"d{i}" for i in range(6)]
        placed = {n: (await m.spawn(n, "box"))["node"] for n in names}
        victim = next(node for node in ("n2", "n3", "n1") if node in placed.values())
        failures, replies = [], {n: [] for n in names}
        stop = asyncio.Event()

        async def caller(name):
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    replies[name].append(await m.call(name, "add", timeout=10, request_id=f"{name}-{i}"))
                except Exception as exc:
                    failures.append((name, repr(exc)))
        callers = [asyncio.ensure_future(caller(n)) for n in names]
        drained = await asyncio.to_thread(cli, cfg, "drain", victim)
        stop.set()
        await asyncio.gather(*callers)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        result = json.loads(drained.stdout)
        assert result["draining"] is True and result["failed"] == []
        assert {n for n in names if placed[n] == victim} <= set(result["moved"])  # and the config's agents there
        assert failures == []
        for name in names:  # each call ran once
            assert [n for _, n in replies[name]] == list(range(1, len(replies[name]) + 1))
        st = json.loads(cli(cfg, "status", "--json").stdout)
        assert all(a["node"] != victim for a in st["agents"])
        assert [n["draining"] for n in st["nodes"] if n["name"] == victim] == [True]
        assert "draining" in cli(cfg, "status").stdout
        undrained = cli(cfg, "undrain", victim)
        assert undrained.returncode == 0 and json.loads(undrained.stdout) == {"node": victim, "draining": False}
    assert run.proc.poll() is None  # the mesh runs on
