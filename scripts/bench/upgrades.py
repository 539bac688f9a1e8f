"""Upgrading a running mesh: a rolling restart of every node under a steady load of
calls, and new code for a kind with 10,000 agents on one node, both under calls.

    python3 scripts/bench/upgrades.py            # both figures, once
    python3 scripts/bench/upgrades.py --write    # also rewrite its section of docs/benchmarks.md

Rolling restart: `mesh up` of three nodes (configs like configs/local.toml, through
core.py's Mesh: every pid it showed is ended on exit), `--counters` counters, calls at
`--rate` per second (each with a request id, 60 s timeout), then `Client.restart` of
n2, n3 and n1 in turn (`mesh restart`). Counted: calls that failed, effects lost or
doubled (each counter's acknowledged adds must be 1..k, each once, and its final value
k), the worst and p99 call latency while the roll ran, and how long each restart took.

Kind upgrade: one node, `--agents` agents of a kind at version 1, 16 callers calling
random agents (request ids) while version 2 (a renamed field, migrated by
`code_change`) is loaded as `Client.upgrade` does (the check, then the roll; UPGRADE
sent to the node directly, for its `pause_ms`). Counted: the upgrade's time in all,
each agent's pause (p50, p99, max), failed calls, and the call latency while it ran.

The machine is small and shared: read the figures as what this run saw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import core  # noqa: E402  (its Mesh starts and ends a real mesh)

import mesh  # noqa: E402
from mesh import wire  # noqa: E402

BEGIN, END = "<!-- upgrades:begin (written by scripts/bench/upgrades.py --write) -->", "<!-- upgrades:end -->"

BOX_V1 = """
from mesh import Agent

class Box(Agent):
    def init(self, args, state):
        return state if state is not None else {"n": 0}

    def handle_call(self, msg, ctx):
        self.state["n"] += 1
        return self.state["n"]
"""

BOX_V2 = """
from mesh import Agent

class Box(Agent):
    vsn = 2

    def init(self, args, state):
        return state if state is not None else {"count": 0}

    def code_change(self, old_vsn, state, extra):
        if old_vsn == 1:
            return {"count": state["n"]}
        return super().code_change(old_vsn, state, extra)

    def handle_call(self, msg, ctx):
        self.state["count"] += 1
        return self.state["count"]
"""


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def rolling_restart(rate: float, counters: int) -> dict:
    with core.Mesh(3, label="rolling") as run:
        async with mesh.connect(run.config) as m:
            names = [f"c{i}" for i in range(counters)]
            for name in names:
                await m.spawn(name, "counter")
            acked: dict[str, list[int]] = {n: [] for n in names}
            failed: list[str] = []
            latencies: list[tuple[float, float]] = []  # (sent at, seconds)
            pending: set[asyncio.Task] = set()

            async def one(name: str, i: int) -> None:
                t0 = time.perf_counter()
                try:
                    acked[name].append(await m.call(name, {"op": "add", "n": 1}, timeout=60, request_id=f"{name}-{i}"))
                except Exception as exc:  # counted: none is expected
                    failed.append(f"{name}: {exc!r}")
                    return
                latencies.append((t0, time.perf_counter() - t0))

            issuing = True

            async def issue() -> None:
                i, step, due = 0, 1 / rate, time.perf_counter()
                while issuing:
                    i += 1
                    task = asyncio.ensure_future(one(names[i % counters], i))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    due += step
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
            issuer = asyncio.ensure_future(issue())
            await asyncio.sleep(2)  # a steady load first
            roll_start = time.perf_counter()
            restarts = []
            for node in ("n2", "n3", "n1"):
                t0 = time.perf_counter()
                result = await m.restart(node)
                restarts.append({"node": node, "s": time.perf_counter() - t0, "moved": len(result["moved"]),
                                 "restarted": result["restarted"]})
            roll_end = time.perf_counter()
            await asyncio.sleep(2)
            issuing = False
            await issuer
            if pending:
                await asyncio.wait(set(pending))
            lost = doubled = 0  # each counter's acknowledged adds must be exactly 1..final
            for name in names:
                got, final = acked[name], await m.call(name, {"op": "get"}, timeout=60)
                lost += sum(1 for v in set(got) if v > final)  # acknowledged, then gone from the state
                doubled += (len(got) - len(set(got))) + max(0, final - len(got))
            during = [s for t, s in latencies if roll_start <= t <= roll_end]
            return {"calls": sum(len(v) for v in acked.values()), "failed": failed, "lost": lost, "doubled": doubled,
                    "rate": rate, "counters": counters, "roll_s": roll_end - roll_start, "restarts": restarts,
                    "worst_ms": max(during, default=0) * 1000, "p99_ms": _pct(during, 0.99) * 1000,
                    "p50_ms": _pct(during, 0.5) * 1000, "calls_during": len(during)}


async def kind_upgrade(agents: int) -> dict:
    mods = Path(tempfile.mkdtemp(prefix="mesh-bench-mods-"))
    (mods / "benchbox.py").write_text(textwrap.dedent(BOX_V1))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(mods), os.environ.get("PYTHONPATH", "")) if p)
    with core.Mesh(1, kinds={"box": "benchbox:Box"}, label="upgrade") as run:
        async with mesh.connect(run.config) as m:
            names = [f"b{i}" for i in range(agents)]
            queue = list(names)
            t0 = time.perf_counter()

            async def spawner() -> None:
                while queue:
                    await m.spawn(queue.pop(), "box", timeout=60)
            await asyncio.gather(*(spawner() for _ in range(200)))
            spawn_s = time.perf_counter() - t0
            failed: list[str] = []
            latencies: list[tuple[float, float]] = []
            stop = asyncio.Event()
            rng = random.Random(7)

            async def caller(k: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    t = time.perf_counter()
                    try:
                        await m.call(rng.choice(names), "add", timeout=60, request_id=f"{k}-{i}")
                    except Exception as exc:  # counted: none is expected
                        failed.append(repr(exc))
                        continue
                    latencies.append((t, time.perf_counter() - t))
            callers = [asyncio.ensure_future(caller(k)) for k in range(16)]
            await asyncio.sleep(1)
            (mods / "benchbox.py").write_text(textwrap.dedent(BOX_V2))
            t0 = time.perf_counter()
            for check in (True, False):  # as Client.upgrade does, asking the one node directly: its pauses
                result = await m.caller.request("n1", wire.Kind.UPGRADE, None, {"kind": "box", "check": check}, 60)
            took = time.perf_counter() - t0
            t1 = time.perf_counter()
            await asyncio.sleep(1)
            stop.set()
            await asyncio.gather(*callers)
            during = [s for t, s in latencies if t0 <= t <= t1]
            before = [s for t, s in latencies if t < t0]
            return {"agents": agents, "spawn_s": spawn_s, "upgrade_s": took, "migrated": result["migrated"],
                    "pause_ms": result["pause_ms"],
                    "upgrade_failed": result["failed"], "failed": failed, "calls_during": len(during),
                    "worst_ms": max(during, default=0) * 1000, "p99_ms": _pct(during, 0.99) * 1000,
                    "p50_before_ms": statistics.median(before) * 1000 if before else 0.0}


def report(roll: dict, up: dict, load_at_start: float) -> str:
    restarts = ", ".join(f"{r['node']} {r['s']:.1f} s ({r['moved']} moved)" for r in roll["restarts"])
    lines = [
        "Run: `python3 scripts/bench/upgrades.py`",
        "",
        *[f"- {line}" for line in core.machine(load_at_start)],
        "",
        "| figure | this run | goal |",
        "| --- | --- | --- |",
        f"| rolling `mesh restart` of n2, n3, n1 (3 nodes, {roll['counters']} counters, {roll['rate']:.0f} calls/s "
        f"with request ids) | {roll['roll_s']:.1f} s in all: {restarts}; {roll['calls']:,} calls acknowledged, "
        f"{len(roll['failed'])} failed, {roll['lost']} lost, {roll['doubled']} doubled; during the roll "
        f"({roll['calls_during']:,} calls) p50 {roll['p50_ms']:.0f} ms, p99 {roll['p99_ms']:,.0f} ms, worst "
        f"{roll['worst_ms']:,.0f} ms | 0 failed, 0 lost or doubled; worst latency reported |",
        f"| `mesh upgrade` of a kind with {up['agents']:,} agents on one node, 16 callers | "
        f"{up['upgrade_s'] * 1000:,.0f} ms in all, {up['migrated']:,} migrated, {len(up['upgrade_failed'])} "
        f"not; each agent paused p50 {up['pause_ms']['p50']:.1f} ms, p99 {up['pause_ms']['p99']:.1f} ms, max "
        f"{up['pause_ms']['max']:.1f} ms; {len(up['failed'])} calls failed; calls during it ({up['calls_during']:,}): p99 "
        f"{up['p99_ms']:,.0f} ms, worst {up['worst_ms']:,.0f} ms (before it: p50 {up['p50_before_ms']:.1f} ms) | "
        f"≤ 1,000 ms in all; each agent paused ≤ 5 ms p99; 0 failed |",
        "",
        "An agent's pause is its slice's (up to 128 agents paused, migrated, committed and resumed",
        "together), as the node reports it (`pause_ms` of UPGRADE). A call's latency during the",
        "upgrade also includes waiting behind the check (`code_change` on a copy of every state)",
        "that runs first, which pauses nothing. Without `[control]`, restarting n1 restarts the supervisor:",
        "when it is gone longer than the other nodes' lease (`lease_ms`, 750 by default), they",
        "drop their agents and the new supervisor starts them again from their state, calls",
        "waiting meanwhile (the roll's p99 and worst call show whether that happened).",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500, help="calls per second during the rolling restart")
    ap.add_argument("--counters", type=int, default=30)
    ap.add_argument("--agents", type=int, default=10_000, help="agents of the upgraded kind")
    ap.add_argument("--write", action="store_true", help="rewrite the upgrades section of docs/benchmarks.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    roll = asyncio.run(rolling_restart(args.rate, args.counters))
    up = asyncio.run(kind_upgrade(args.agents))
    text = report(roll, up, load)
    print(text)
    for what, result in (("rolling restart", roll), ("upgrade", up)):
        for failure in result["failed"][:5]:
            print(f"{what}: failed call: {failure}", file=sys.stderr)
    if args.write:
        core.write_section(BEGIN, END, text, "## Upgrades and rolling restarts")
    ok = not roll["failed"] and not roll["lost"] and not roll["doubled"] and not up["failed"] and not up["upgrade_failed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
