"""Failover on three namespaced hosts: how fast a dead, hung or cut-off node is noticed,
and how fast its agents answer again, with their state, from another node.

    sudo python3 scripts/bench/failover.py               # 20 trials of each fault
    sudo python3 scripts/bench/failover.py --trials 5    # a short run
    sudo python3 scripts/bench/failover.py --write       # also rewrite its section of docs/benchmarks.md

The mesh is scripts/netcluster.py's (one node per host, CURVE on, replicas = 1) with the
default timing: heartbeat 250 ms, liveness 4, lease 750 ms. Each trial spawns fresh
counters until three run on the victim (n2 or n3, in turn), adds 1 to each, injects
the fault and, at once, calls every one of them (the client retries by itself) until it
answers with its value. Faults:

- kill: SIGKILL of the victim node; its launcher restarts it at once.
- stop: SIGSTOP of the victim node; SIGCONT after its agents answered elsewhere.
- cut:  the victim's host cut off from the bridge; healed after its agents answered.

"detect" runs from the fault until the supervisor's log line that acts on it (its
timestamp): "restarted" for kill, "silent ... declared dead" for the others. Then the
script waits until the victim serves again before the next trial. Root only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(HERE)]

from core import machine, pct, say, write_section  # noqa: E402
from netcluster import NetCluster, available  # noqa: E402

BEGIN, END = "<!-- failover:begin (written by scripts/bench/failover.py --write) -->", "<!-- failover:end -->"
SCRIPT = "sudo python3 scripts/bench/failover.py"
FAULTS = ("kill", "stop", "cut")
PER_TRIAL = 3
HOST = {"n2": "h2", "n3": "h3"}
DETECTED = {"kill": r"supervisor: node {node} restarted", "stop": r"supervisor: node {node} silent for",
            "cut": r"supervisor: node {node} silent for"}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line: str) -> float:
    """The wall-clock time of a log line (the mesh logs local time with milliseconds)."""
    m = LOG_TIME.match(line)
    if not m:
        raise ValueError(f"no timestamp in log line {line!r}")
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Bench:
    def __init__(self, cluster: NetCluster, m):
        self.c, self.m = cluster, m
        self.serial = 0

    async def agents_on(self, victim: str) -> tuple[list[str], list[str]]:
        """Fresh counters, each with value 1, until PER_TRIAL of them run on `victim`:
        (those, every one spawned)."""
        mine, spawned = [], []
        for _ in range(PER_TRIAL * 10):
            self.serial += 1
            placed = await self.m.spawn(f"f{self.serial}", "counter")
            spawned.append(placed["name"])
            await self.m.call(placed["name"], {"op": "add", "n": 1})
            if placed["node"] == victim:
                mine.append(placed["name"])
                if len(mine) == PER_TRIAL:
                    return mine, spawned
        raise RuntimeError(f"placement put only {len(mine)} of {len(spawned)} new agents on {victim}")

    async def trial(self, fault: str, victim: str) -> dict:
        names, spawned = await self.agents_on(victim)
        sup = self.c.runs["n1"]
        mark, vmark = sup.mark(), self.c.runs[victim].mark()
        t0 = time.time()
        if fault == "kill":
            os.kill(self.c.pid(victim), signal.SIGKILL)
        elif fault == "stop":
            os.kill(self.c.pid(victim), signal.SIGSTOP)
        else:
            self.c.hosts.cut(HOST[victim])

        async def answer(name: str) -> float:
            value = await self.m.call(name, {"op": "get"}, timeout=30)
            if value != 1:
                raise RuntimeError(f"{name} answered {value!r} after the {fault}, not its value 1")
            return time.time() - t0
        try:
            answered = await asyncio.gather(*(answer(n) for n in names))
            found = await asyncio.to_thread(sup.wait_for, DETECTED[fault].format(node=victim), 30, mark)
            detect = log_time(found.string) - t0
        finally:
            if fault == "stop":
                os.kill(self.c.pid(victim), signal.SIGCONT)
            elif fault == "cut":
                self.c.hosts.heal(HOST[victim])
        if fault == "kill":
            await asyncio.to_thread(self.c.runs[victim].wait_for, rf"node {victim} ready \(pid", 30, vmark)
        else:
            await asyncio.to_thread(sup.wait_for, rf"supervisor: node {victim} dropped its agents", 30, mark)
        await self.until_alive(victim)
        for name in spawned:  # an empty mesh again, so that placement is even for the next trial
            await self.m.stop(name)
        return {"detect": detect, "first": min(answered), "all": max(answered)}

    async def until_alive(self, node: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await self.m.status()
            if all(n["alive"] for n in st["nodes"]):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"node {node} did not come back within {timeout:g}s")


async def run(cluster: NetCluster, faults: tuple[str, ...], trials: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {f: [] for f in faults}
    async with cluster.client() as m:
        bench = Bench(cluster, m)
        for fault in faults:
            for i in range(trials):
                victim = ("n2", "n3")[i % 2]
                r = await bench.trial(fault, victim)
                say(f"{fault} {i + 1}/{trials} on {victim}: detect {r['detect'] * 1000:.0f} ms, "
                    f"first answer {r['first'] * 1000:.0f} ms, all {r['all'] * 1000:.0f} ms")
                results[fault].append(r)
    return results


GOALS = {  # (figure, percentile, goal in seconds) per fault, from the cluster issue
    "kill": [("all", 0.5, 0.100)],
    "stop": [("detect", 0.99, 1.0), ("all", 0.99, 1.5)],
    "cut": [("detect", 0.99, 1.0), ("all", 0.99, 1.5)],
}
WHAT = {"kill": "kill -9 of a node (its launcher restarts it)", "stop": "SIGSTOP of a node (hung)",
        "cut": "a host cut off from the others"}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| fault | detected, p50 / p99 | first agent answers, p50 / p99 | all its agents answer, p50 / p99 | goal | |",
             "| --- | --- | --- | --- | --- | --- |"]
    for fault, runs in results.items():
        if not runs:
            continue
        cols = [f"{ms(pct([r[k] for r in runs], 0.5))} / {ms(pct([r[k] for r in runs], 0.99))}"
                for k in ("detect", "first", "all")]
        goals, verdicts = [], []
        for key, q, goal in GOALS[fault]:
            value = pct([r[key] for r in runs], q)
            name = {"detect": "detected", "all": "answers again"}[key]
            goals.append(f"{name} ≤ {ms(goal)} p{int(q * 100)}")
            verdicts.append("met" if value <= goal else f"**missed** by {(value - goal) * 1000:.1f} ms")
        lines.append(f"| {WHAT[fault]}, {len(runs)} trials | " + " | ".join(cols) + " | "
                     + "; ".join(goals) + " | " + "; ".join(verdicts) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per fault (default 20)")
    ap.add_argument("--only", action="append", choices=FAULTS, help="this fault only (repeatable)")
    ap.add_argument("--write", action="store_true", help="rewrite the failover section of docs/benchmarks.md")
    args = ap.parse_args()
    why = available()
    if why:
        print(f"failover: needs network namespaces: {why}", file=sys.stderr)
        return 2
    if args.write and (args.only or args.trials < 20):
        ap.error("--write is for a run of every fault with at least 20 trials")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cluster is removed
    load, t = os.getloadavg()[0], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mesh-failover-") as folder:
        env = {**os.environ, "MESH_LOG": "INFO"}
        # each node is killed a dozen times or more: its launcher must not give up on it
        launcher = "[launcher]\nmax_restarts = 1000\n"
        with NetCluster(Path(folder), replicas=1, heartbeat_ms=250, liveness=4, lease_ms=750, env=env,
                        extra=launcher) as c:
            results = asyncio.run(run(c, tuple(args.only or FAULTS), args.trials))
    text = "\n".join([
        f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {(time.monotonic() - t) / 60:.1f} min in all; "
        f"{PER_TRIAL} agents on the victim per trial.", "",
        *[f"- {line}" for line in machine(load)], "",
        table(results),
    ])
    print(text)
    if args.write:
        write_section(BEGIN, END, text, "## Failover")
    return 0


if __name__ == "__main__":
    sys.exit(main())
