"""`mesh restart NODE` on a real mesh (`mesh up`, the CLI): a rolling restart of every
node under calls loses no call, and each node comes back as a new interpreter running
the code on disk, not a fork of the code its launcher imported when it began."""

import asyncio
import json
from pathlib import Path

import pytest

import mesh
from procs import mesh_cmd


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.async_timeout(150)
async def test_a_rolling_restart_under_calls_loses_no_call_and_runs_new_interpreters(local_mesh):
    cfg, run = local_mesh
    async with mesh.connect(cfg) as m:
        names = [f"c{i}" for i in range(6)]
        for name in names:
            await m.spawn(name, "counter")
        replies = {n: [] for n in names}
        failures = []
        stop = asyncio.Event()

        async def caller(name):
            i = 0
            while not stop.is_set():
                i += 1
                try:  # a request id makes a retried call run once
                    replies[name].append(await m.call(name, {"op": "add", "n": 1}, timeout=30,
                                                      request_id=f"{name}-{i}"))
                except Exception as exc:  # every failure is counted, none expected
                    failures.append((name, repr(exc)))
        callers = [asyncio.ensure_future(caller(n)) for n in names]
        try:
            while min(len(r) for r in replies.values()) < 3:
                await asyncio.sleep(0.01)
            results = []
            for node in ("n2", "n3", "n1"):  # the supervisor's node last, as an operator would
                done = await asyncio.to_thread(mesh_cmd, "restart", "-c", str(cfg), node, timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr
                results.append(json.loads(done.stdout))
                seen = {n: len(r) for n, r in replies.items()}
                while any(len(replies[n]) < seen[n] + 2 for n in names):  # calls flow again
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert failures == []
        for name in names:  # each call ran exactly once, on the state the one before left
            assert replies[name] == list(range(1, len(replies[name]) + 1)), name
        for node, result in zip(("n2", "n3", "n1"), results):
            assert result["node"] == node and result["restarted"] is True and result["failed"] == []
            assert result["pid"] != result["old_pid"]
            # a new interpreter (exec), not a fork of the launcher that imported the code at start
            assert "mesh.fresh" in _cmdline(result["pid"]), _cmdline(result["pid"])
        run.wait_for(r"node n1 restarted as a new process, as asked", 5)
        st = await m.status()
        assert {n["name"]: (n["alive"], bool(n.get("draining"))) for n in st["nodes"]} == {
            "n1": (True, False), "n2": (True, False), "n3": (True, False)}
        for name in names:
            assert await m.call(name, {"op": "get"}, timeout=30) == replies[name][-1]


def test_restart_of_a_node_that_is_not_in_the_config_is_a_usage_error(local_mesh):
    cfg, _ = local_mesh
    done = mesh_cmd("restart", "-c", str(cfg), "n9")
    assert done.returncode == 2 and "no node 'n9'" in done.stderr and "Traceback" not in done.stderr
