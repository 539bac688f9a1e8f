"""`mesh top` (mesh/top.py): rates from two samples, the plain tables of a real mesh under
load, and the live view drawn in an 80x24 pseudo-terminal, sorted and quit by keys."""

import asyncio
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

import mesh
import procs
from mesh import top
from procs import mesh_cmd


def _status(nodes, top_agents, total=3):
    return {"nodes": nodes, "top": top_agents, "total": total}


def test_rates_come_from_two_samples():
    n = lambda stats, rss: {"name": "n1", "alive": True, "agents": 3, "stats": stats, "rss": rss}
    a = lambda name, handled, mailbox=0, inc=1, ms=None: {"name": name, "kind": "counter", "node": "n1", "mailbox": mailbox,
                                                          "handled": handled, "handling_ms": ms, "restarts": 0,
                                                          "incarnation": inc}
    first = (10.0, _status([n({"in": 100, "commits": 10, "commit_records": 20, "commit_us": 10_000}, 2 ** 21)],
                           [a("x", 50), a("y", 5), a("z", 7)]))
    second = (12.0, _status([n({"in": 300, "commits": 30, "commit_records": 80, "commit_us": 50_000}, 2 ** 21)],
                            [a("x", 150), a("y", 5, mailbox=4, ms=12.5), a("z", 3, inc=2)]))
    assert top.node_rows(first, second) == [["n1", "yes", 3, "100", "10", "3.0", "2.00", "2"]]
    rows = top.agent_rows(first, second)
    assert [r[0] for r in rows] == ["y", "x", "z"]  # the most waiting first
    assert rows[1][4] == "50" and rows[0][4] == "0" and rows[2][4] == "-"  # z restarted: no rate yet
    assert [r[0] for r in top.agent_rows(first, second, "msg/s")][0] == "x"
    assert [r[0] for r in top.agent_rows(first, second, "in hand")][0] == "y"
    assert top.node_rows(None, second)[0][3] == "-"


async def _under_load(cfg, body):
    async with mesh.connect(cfg) as m:
        for i in range(3):
            await m.spawn(f"hot{i}", "counter")
        stop = asyncio.Event()

        async def load(i):
            while not stop.is_set():
                await m.call(f"hot{i % 3}", {"op": "add", "n": 1})
        tasks = [asyncio.ensure_future(load(i)) for i in range(6)]
        try:
            return await asyncio.to_thread(body)
        finally:
            stop.set()
            await asyncio.gather(*tasks)


@pytest.mark.async_timeout(60)
async def test_plain_tables_when_stdout_is_not_a_terminal(local_mesh):
    cfg, _ = local_mesh
    done = await _under_load(cfg, lambda: mesh_cmd("top", "-c", str(cfg)))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NODE", "UP", "AGENTS", "MSG/S", "COMMITS/S", "GROUP", "COMMIT", "MS", "RSS", "MB"]
    assert [line.split()[0] for line in lines[1:4]] == ["n1", "n2", "n3"]
    hot = [line.split() for line in lines if line.startswith("hot")]
    assert len(hot) == 3 and all(float(row[4].replace(",", "")) > 0 for row in hot)  # msg/s


def _live_in_a_pty(cfg, keys: list[tuple[float, bytes]], limit_s: float = 30) -> tuple[int, str, bool]:
    """Run `mesh top` in an 80x24 pseudo-terminal, typing `keys` at their times; returns
    its exit code, what it drew, and whether it left the terminal's modes as it found them."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    modes = termios.tcgetattr(follower)
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "top", "-c", str(cfg)], stdin=follower,
                            stdout=follower, stderr=follower, env={**procs.env(), "TERM": "xterm-256color"},
                            cwd=procs.ROOT, start_new_session=True)
    os.close(follower)
    out, start, pending = b"", time.monotonic(), list(keys)
    try:
        while proc.poll() is None and time.monotonic() - start < limit_s:
            if pending and time.monotonic() - start >= pending[0][0]:
                os.write(leader, pending.pop(0)[1])
            if select.select([leader], [], [], 0.1)[0]:
                try:
                    out += os.read(leader, 65536)
                except OSError:
                    break
        code = proc.wait(5)
        return code, out.decode(errors="replace"), termios.tcgetattr(leader) == modes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        os.close(leader)


@pytest.mark.async_timeout(90)
async def test_the_live_view_fits_80x24_and_answers_keys(local_mesh):
    cfg, _ = local_mesh
    code, shown, restored = await _under_load(cfg, lambda: _live_in_a_pty(cfg, [(2.5, b"s"), (4.0, b"q")]))
    assert code == 0, shown[-2000:]
    assert restored  # echo and line mode back as they were
    assert "mesh top" in shown and "sort: mailbox" in shown and "sort: msg/s" in shown
    assert "hot0" in shown and "COMMITS/S" in shown
