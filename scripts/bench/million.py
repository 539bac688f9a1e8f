"""A million agents over three namespaced hosts: spawned, each one called, status, kill -9.

    sudo python3 scripts/bench/million.py                         # 1,000,000 agents
    sudo python3 scripts/bench/million.py --agents 30000          # a short run

scripts/netcluster.py's mesh (one node per host, CURVE on, the given replicas) with
heartbeat 250 ms. In order, each timed:

1. spawn: `--agents` fresh counters, `--outstanding` spawns in flight; spawns per second
   in each tenth of the run, and the failures (a spawn that did not answer in 120 s);
2. memory: each node's resident memory (from `mesh status`), and per agent;
3. status: the default view (`Client.status(agents=False)`, counts by kind and state),
   the median of five;
4. call: a `get` to every agent (`--outstanding` in flight); which ones answered;
5. kill -9 of the node (not the supervisor's) holding the most agents (its launcher
   restarts it); then a `get`
   to each of its agents at once until every one has answered with its state: the
   times at which 10%, 50%, 90% and all of them had.

Root only. Whatever it starts it ends, by pid, also on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(HERE)]

from core import machine, say  # noqa: E402
from netcluster import NetCluster, available  # noqa: E402

import mesh  # noqa: E402


async def spawn_all(m, n: int, outstanding: int) -> tuple[list[float], dict[str, str], int]:
    """Spawn a0..a{n-1}; returns the time each answered, where each runs, and failures."""
    names = iter(range(n))
    done: list[float] = []
    where: dict[str, str] = {}
    failed = 0

    async def worker():
        nonlocal failed
        for i in names:
            try:
                placed = await m.spawn(f"a{i}", "counter", timeout=120)
                where[placed["name"]] = placed["node"]
            except mesh.CallError as exc:
                failed += 1
                if failed <= 5:
                    say(f"spawn a{i}: {type(exc).__name__}: {exc}")
            done.append(time.monotonic())
            if len(done) % 50_000 == 0:
                say(f"spawned {len(done):,}")
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    return done, where, failed


async def call_all(m, names: list[str], outstanding: int, began: float) -> tuple[list[float], Counter]:
    """A `get` to each of `names`; the times (since `began`) each answered with 0."""
    todo = iter(names)
    times: list[float] = []
    errors: Counter = Counter()

    async def worker():
        for name in todo:
            try:
                value = await m.call(name, {"op": "get"}, timeout=120)
                if value == 0:
                    times.append(time.monotonic() - began)
                else:
                    errors[f"answered {value!r}"] += 1
            except mesh.CallError as exc:
                errors[type(exc).__name__] += 1
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    return times, errors


def tenths(done: list[float], began: float) -> list[float]:
    """Spawns per second in each tenth of the run (by count)."""
    n = len(done)
    cuts = [began] + [done[min(n - 1, (k * n) // 10 - 1)] for k in range(1, 11)]
    return [(n / 10) / max(1e-9, b - a) for a, b in zip(cuts, cuts[1:])]


async def run(c: NetCluster, agents: int, outstanding: int, kill: bool = True) -> None:
    async with c.client() as m:
        began = time.monotonic()
        done, where, failed = await spawn_all(m, agents, outstanding)
        took = time.monotonic() - began
        rates = tenths(sorted(done), began)
        say(f"spawn: {agents:,} in {took:.1f} s ({agents / took:,.0f}/s), {failed} failed; per tenth: "
            + ", ".join(f"{r:,.0f}" for r in rates) + f"; last/first {rates[-1] / rates[0]:.2f}")
        st = await m.status(agents=False)
        say("lease lapses (each drops the node's agents): " + ", ".join(
            f"{n['name']} {n['stats'].get('lease_lapses', 0)}" for n in st["nodes"]))
        for node in st["nodes"]:
            here = sum(1 for n in where.values() if n == node["name"])
            rss = node.get("rss") or 0
            say(f"memory: {node['name']} ({node['host']}): {node['agents']:,} agents, RSS {rss / 2**20:,.0f} MB"
                f"{f', {rss / here / 1024:.2f} KB per agent (with its registry replica of all names)' if here else ''}")
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            st = await m.status(agents=False)
            times.append(time.monotonic() - t0)
        say(f"status: default view at {st['total']:,} agents: median {statistics.median(times) * 1000:.0f} ms "
            f"(of 5: {', '.join(f'{t * 1000:.0f}' for t in times)})")
        t0 = time.monotonic()
        answered, errors = await call_all(m, sorted(where), outstanding, t0)
        took = time.monotonic() - t0
        say(f"call: {len(answered):,} of {len(where):,} answered in {took:.1f} s ({len(where) / took:,.0f}/s); "
            f"errors {dict(errors) or 0}")
        if not kill:
            return
        victim = Counter(n for n in where.values() if n != "n1").most_common(1)[0][0]  # not the supervisor's
        names = [n for n, node in where.items() if node == victim]
        pid = c.pid(victim)
        say(f"kill: -9 of {victim} (pid {pid}), holding {len(names):,} agents")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        back, errors = await call_all(m, names, outstanding, t0)
        back.sort()
        at = {p: back[min(len(back) - 1, int(len(back) * p / 100) - 1)] for p in (10, 50, 90, 100)} if back else {}
        say(f"kill: {len(back):,} of {len(names):,} answered with their state; "
            + ", ".join(f"{p}% by {t:.1f} s" for p, t in at.items()) + f"; errors {dict(errors) or 0}")


def log_summary(text: str, top: int = 8) -> list[str]:
    """The nodes' most frequent warnings and errors, names and numbers blanked out."""
    seen: Counter = Counter()
    for line in text.splitlines():
        if " WARNING " in line or " ERROR " in line:
            shape = re.sub(r"\b[a-z]+\d+\b|\d+(\.\d+)?", "#", line.split(" WARNING ", 1)[-1].split(" ERROR ", 1)[-1])
            seen[shape[:160]] += 1
    return [f"log: {n:,} x {shape}" for shape, n in seen.most_common(top)] or ["log: no warnings"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--outstanding", type=int, default=500)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--no-kill", action="store_true", help="leave out step 5 (kill -9 of a node)")
    ap.add_argument("--logs", type=Path, help="write the nodes' whole logs to this file at the end (also when stopped)")
    a = ap.parse_args()
    why = available()
    if why:
        say(f"cannot run: {why}")
        return 2
    load = os.getloadavg()[0]
    for line in machine(load):
        say(line)
    say(f"run: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="mesh-million-") as folder:
        c = NetCluster(Path(folder), replicas=a.replicas, heartbeat_ms=250, liveness=4, lease_ms=750,
                       env={**os.environ, "MESH_LOG": "WARNING"})
        text = c.config.read_text()  # room for a million records a host, and no served log (chaos's)
        c.config.write_text(text.replace("[store]\n", "[store]\nmap_size_mb = 16384\n", 1)
                            .replace("served_log = true\n", "served_log = false\n", 1))
        with c:
            try:
                asyncio.run(run(c, a.agents, a.outstanding, not a.no_kill))
            finally:
                text = c.logs()
                if a.logs:
                    a.logs.write_text(text)
                for line in log_summary(text):
                    say(line)
    say(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
