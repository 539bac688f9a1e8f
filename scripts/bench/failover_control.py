"""Failover with the control plane ([control]) on three namespaced hosts: the faults that
take the supervisor or etcd away, and today's node faults for comparison.

    sudo python3 scripts/bench/failover_control.py               # 20 trials of each fault
    sudo python3 scripts/bench/failover_control.py --trials 5    # a short run
    sudo python3 scripts/bench/failover_control.py --write       # also rewrite its section of docs/benchmarks.md

The mesh is scripts/netcluster.py's with `control=True`: one node per host, each host
an etcd member (TLS), every node a candidate, replicas = 1, node leases of 1 s in etcd.
Each trial spawns fresh counters until three run on the victim's node and three on the
others, adds 1 to each, injects the fault and at once calls every one: the victim's
until each answers with its value ("all"), the others over and over for 4 s, keeping
the slowest single call ("others, slowest call"). Faults:

- leaderhost: every process of the leader's host (its node, launcher and etcd member)
  killed; started again once its agents answered elsewhere.
- leadercut:  the leader's host cut off from the others; healed once its agents answered.
- etcdkill:   kill -9 of one etcd member (the hosts in turn); its launcher restarts it.
              No victim's agents: every agent is an "other".
- kill, stop, cut: of a node that does not lead, as in scripts/bench/failover.py.

"leader" is the time from the fault to the new leader's "leads" line (leaderhost,
leadercut). Root only.
"""

from __future__ import annotations

import argparse
import asyncio
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
from failover import log_time  # noqa: E402
from netcluster import NODES, NetCluster, available  # noqa: E402

BEGIN = "<!-- failover-control:begin (written by scripts/bench/failover_control.py --write) -->"
END = "<!-- failover-control:end -->"
SCRIPT = "sudo python3 scripts/bench/failover_control.py"
FAULTS = ("leaderhost", "leadercut", "etcdkill", "kill", "stop", "cut")
PER_TRIAL = 3
OTHERS_FOR_S = 4.0
ETCD_PID = re.compile(r"etcd: member (\S+)(?::)? (?:started|exited .*restarted) \(pid (\d+)\)")


class Bench:
    def __init__(self, cluster: NetCluster, m):
        self.c, self.m = cluster, m
        self.serial = 0
        self.turn = 0

    async def agents(self, victim: str | None) -> tuple[list[str], list[str], list[str]]:
        """Fresh counters with value 1: PER_TRIAL on `victim` and PER_TRIAL elsewhere
        (all elsewhere when None); returns (victim's, others, every one spawned)."""
        mine, others, spawned = [], [], []
        want_mine = PER_TRIAL if victim else 0
        for _ in range(PER_TRIAL * 20):
            self.serial += 1
            placed = await self.m.spawn(f"f{self.serial}", "counter")
            spawned.append(placed["name"])
            await self.m.call(placed["name"], {"op": "add", "n": 1})
            (mine if placed["node"] == victim else others).append(placed["name"])
            if len(mine) >= want_mine and len(others) >= PER_TRIAL:
                return mine, others, spawned
        raise RuntimeError(f"placement put {len(mine)} of {len(spawned)} new agents on {victim}")

    def etcd_pid(self, node: str) -> int:
        pids = [int(m.group(2)) for line in list(self.c.runs[node].lines) if (m := ETCD_PID.search(line))]
        if not pids:
            raise RuntimeError(f"no etcd member pid in {node}'s output")
        return pids[-1]

    async def trial(self, fault: str) -> dict:
        leader = self.c.leader()
        followers = [n for n in NODES if n != leader]
        victim = {"leaderhost": leader, "leadercut": leader, "etcdkill": None}.get(fault, followers[self.turn % 2])
        self.turn += 1
        mine, others, spawned = await self.agents(victim)
        marks = self.c.marks()
        vrun = self.c.runs[victim] if victim else None
        vmark = vrun.mark() if vrun else 0
        t0 = time.time()
        if fault == "leaderhost":
            self.c.runs[leader].kill_all()
        elif fault in ("leadercut", "cut"):
            self.c.hosts.cut(NODES[victim])
        elif fault == "etcdkill":
            os.kill(self.etcd_pid(list(NODES)[self.turn % 3]), signal.SIGKILL)
        elif fault == "kill":
            os.kill(self.c.pid(victim), signal.SIGKILL)
        elif fault == "stop":
            os.kill(self.c.pid(victim), signal.SIGSTOP)

        async def answer(name: str) -> float:
            value = await self.m.call(name, {"op": "get"}, timeout=30)
            if value != 1:
                raise RuntimeError(f"{name} answered {value!r} after the {fault}, not its value 1")
            return time.time() - t0

        async def slowest(name: str) -> float:
            worst = 0.0
            while time.time() - t0 < OTHERS_FOR_S:
                began = time.time()
                await answer(name)
                worst = max(worst, time.time() - began)
                await asyncio.sleep(0.01)
            return worst
        try:
            answered, worst = await asyncio.gather(asyncio.gather(*(answer(n) for n in mine)),
                                                   asyncio.gather(*(slowest(n) for n in others)))
            result = {"all": max(answered) if answered else 0.0, "others": max(worst)}
            if fault in ("leaderhost", "leadercut"):
                found = await asyncio.to_thread(self.c.wait_any, r"leadership: (\S+) leads", 30, marks)
                result["leader"] = log_time(found.string) - t0
        finally:
            if fault == "stop":
                os.kill(self.c.pid(victim), signal.SIGCONT)
            elif fault in ("leadercut", "cut"):
                self.c.hosts.heal(NODES[victim])
        if fault == "leaderhost":
            await asyncio.to_thread(self.c.start_node, leader)
        elif fault == "kill":
            await asyncio.to_thread(vrun.wait_for, rf"node {victim} ready \(pid", 30, vmark)
        elif fault == "leadercut":   # its term ended: it stopped, and its launcher starts it again
            await asyncio.to_thread(vrun.wait_for, rf"node {victim} ready \(pid", 30, vmark)
        await self.until_alive()
        for name in spawned:  # an empty mesh again, so that placement is even for the next trial
            await self.m.stop(name)
        return result

    async def until_alive(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = await self.m.status(timeout=5)
                if all(n["alive"] for n in st["nodes"]):
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"not every node alive again within {timeout:g}s")


async def run(cluster: NetCluster, faults: tuple[str, ...], trials: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {f: [] for f in faults}
    async with cluster.client() as m:
        bench = Bench(cluster, m)
        for fault in faults:
            for i in range(trials):
                r = await bench.trial(fault)
                say(f"{fault} {i + 1}/{trials}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.items()))
                results[fault].append(r)
    return results


GOALS = {  # (figure, percentile, goal in seconds), from the control-plane issue
    "leaderhost": [("others", 1.0, 1.0), ("all", 0.99, 3.0)],
    "leadercut": [("leader", 0.99, 2.0)],
    "etcdkill": [("others", 1.0, 1.0)],
    "kill": [("all", 0.5, 0.100)],
    "stop": [("all", 0.5, 0.9)],
    "cut": [("all", 0.5, 0.9)],
}
WHAT = {"leaderhost": "the supervisor's host killed", "leadercut": "the leader's host cut off",
        "etcdkill": "kill -9 of one etcd member", "kill": "kill -9 of a node", "stop": "SIGSTOP of a node",
        "cut": "a host (not the leader's) cut off"}
NAMES = {"all": "its agents answer again", "others": "others' slowest call", "leader": "new leader"}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| fault | victim's agents answer again, p50 / p99 | others' slowest call, p50 / max | "
             "new leader, p50 / p99 | goal | |", "| --- | --- | --- | --- | --- | --- |"]
    for fault, runs in results.items():
        if not runs:
            continue

        def col(key: str, high: float) -> str:
            values = [r[key] for r in runs if key in r]
            return f"{ms(pct(values, 0.5))} / {ms(pct(values, high))}" if values else "–"
        goals, verdicts = [], []
        for key, q, goal in GOALS[fault]:
            value = pct([r[key] for r in runs], q)
            goals.append(f"{NAMES[key]} ≤ {ms(goal)} {'max' if q == 1.0 else f'p{int(q * 100)}'}")
            verdicts.append("met" if value <= goal else f"**missed** by {(value - goal) * 1000:.0f} ms")
        victim = col("all", 0.99) if fault != "etcdkill" else "–"
        lines.append(f"| {WHAT[fault]}, {len(runs)} trials | {victim} | {col('others', 1.0)} | "
                     f"{col('leader', 0.99)} | " + "; ".join(goals) + " | " + "; ".join(verdicts) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per fault (default 20)")
    ap.add_argument("--only", action="append", choices=FAULTS, help="this fault only (repeatable)")
    ap.add_argument("--write", action="store_true", help="rewrite its section of docs/benchmarks.md")
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
        launcher = "[launcher]\nmax_restarts = 1000\n"  # each node is killed many times
        with NetCluster(Path(folder), replicas=1, heartbeat_ms=250, liveness=4, env=env, extra=launcher,
                        control=True) as c:
            results = asyncio.run(run(c, tuple(args.only or FAULTS), args.trials))
    text = "\n".join([
        f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {(time.monotonic() - t) / 60:.1f} min in all; "
        f"{PER_TRIAL} agents on the victim and {PER_TRIAL} on the others per trial.", "",
        *[f"- {line}" for line in machine(load)], "",
        table(results),
    ])
    print(text)
    if args.write:
        write_section(BEGIN, END, text, "## Failover with the control plane")
    return 0


if __name__ == "__main__":
    sys.exit(main())
