"""Nodes of two adjacent releases in one mesh (docs/protocol.md, Versions): a node of the
previous release (its code taken from git) beside nodes of this one, sharing the host's
store; agents move both ways between them with their state, and the old node is then
replaced by a new one, as a rolling upgrade of the runtime does."""

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import tarfile

import pytest

import mesh
import procs
from mesh.errors import NotAllowed
from procs import ROOT, mesh_cmd
from meshrun import MeshRun

PREVIOUS_RELEASE = "fa93c77"  # the release before records carried their code's version


def _previous_release(dest) -> None:
    """The previous release's files, from this repository's history."""
    have = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                          capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} (the previous release) is not in this clone: "
                    f"git fetch --unshallow to run the mixed-version test")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "mesh", "nodes"],
                             capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def _node(cfg, name, code_root) -> MeshRun:
    """`mesh node NAME` running the code under `code_root` (this checkout, or the old one)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code_root), str(procs.TESTS)])}
    return MeshRun("node", "-c", str(cfg), name, env=env, cwd=code_root)


@contextlib.contextmanager
def _mixed_mesh(tmp_path, old_nodes: set[str]):
    """n1, n2, n3 each under its own `mesh node`, those in `old_nodes` on the previous
    release's code; yields (config, {node: run}, the old code's folder). Ended by pid."""
    old = tmp_path / "previous"
    old.mkdir()
    _previous_release(old)
    cfg = procs.write_config(tmp_path)
    runs = {}
    try:
        for name in ("n2", "n3", "n1"):  # n1, the supervisor's, last
            code = old if name in old_nodes else ROOT
            runs[name] = _node(cfg, name, code).start(wait_for="mesh ready" if name == "n1" else f"node {name} ready",
                                                      timeout=60)
        yield cfg, runs, old
    finally:
        for run in runs.values():
            run.stop()


@pytest.mark.timeout(180)
def test_a_node_of_the_previous_release_serves_beside_new_ones_and_agents_move_both_ways(tmp_path):
    with _mixed_mesh(tmp_path, {"n3"}) as (cfg, runs, old):
        async def check(values: dict[str, int]) -> None:
            async with mesh.connect(cfg) as m:
                for name, value in values.items():
                    assert await m.call(name, {"op": "add", "n": 1}, timeout=30, request_id=f"{name}-{value}") \
                        == value + 1, name
                    values[name] = value + 1

        async def spawn() -> dict[str, int]:
            async with mesh.connect(cfg) as m:
                placed = {f"c{i}": (await m.spawn(f"c{i}", "counter"))["node"] for i in range(9)}
            assert "n3" in placed.values(), placed  # placement spreads them: some run on the old node
            return {name: 0 for name in placed}
        values = asyncio.run(spawn())
        asyncio.run(check(values))
        for victim in ("n3", "n2"):  # off the old node (records it wrote), then onto it (records new ones wrote)
            drained = json.loads(mesh_cmd("drain", "-c", str(cfg), victim, timeout=60).stdout)
            assert drained["failed"] == [], drained
            asyncio.run(check(values))
            assert mesh_cmd("undrain", "-c", str(cfg), victim).returncode == 0
        st = json.loads(mesh_cmd("status", "-c", str(cfg), "--json").stdout)
        assert any(a["node"] == "n3" for a in st["agents"] if a["name"] in values), st["agents"]
        top = mesh_cmd("top", "-c", str(cfg), "--plain")  # the old node refuses INVENTORY {top}: asked again without
        assert top.returncode == 0, top.stderr
        assert [line.split()[:2] for line in top.stdout.splitlines()[1:4]] == [["n1", "yes"], ["n2", "yes"], ["n3", "yes"]]

        # the old node replaced by a new one: drained, stopped, started on this release's code
        assert mesh_cmd("drain", "-c", str(cfg), "n3", timeout=60).returncode == 0
        assert runs.pop("n3").stop() == 0
        runs["n3"] = _node(cfg, "n3", ROOT).start(wait_for="node n3 ready", timeout=60)
        assert mesh_cmd("undrain", "-c", str(cfg), "n3").returncode == 0
        asyncio.run(check(values))


@pytest.mark.timeout(180)
def test_a_supervisor_of_the_previous_release_runs_nodes_of_this_one(tmp_path):
    """The supervisor's node (n1) on the old code, n2 and n3 on this release's: spawns,
    calls, a node killed and started again by its launcher, `mesh status` (this release's
    CLI asks for counts; the old supervisor lists every agent)."""
    with _mixed_mesh(tmp_path, {"n1"}) as (cfg, runs, _):
        async def spawn_and_add() -> dict[str, str]:
            async with mesh.connect(cfg) as m:
                placed = {f"c{i}": (await m.spawn(f"c{i}", "counter"))["node"] for i in range(6)}
                for name in placed:
                    assert await m.call(name, {"op": "add", "n": 5}, request_id=f"{name}-a") == 5
                for later in (m.call_group("pool", {"op": "get"}), m.spawn_group("pool", "counter", 2)):
                    with pytest.raises(NotAllowed, match="without process groups"):  # a later release's
                        await later
            return placed
        placed = asyncio.run(spawn_and_add())
        victim = next(node for node in ("n2", "n3") if node in placed.values())
        mark = runs[victim].mark()
        runs[victim].kill_node(victim, signal.SIGKILL)
        runs[victim].wait_for(f"node {victim} ready", timeout=60, start=mark)

        async def read_all() -> None:
            async with mesh.connect(cfg) as m:
                for name in placed:
                    assert await m.call(name, {"op": "get"}, timeout=30) == 5, name
        asyncio.run(read_all())
        shown = mesh_cmd("status", "-c", str(cfg))
        assert shown.returncode == 0 and all(name in shown.stdout for name in placed), shown.stdout + shown.stderr
