"""How the mesh's cost grows: with agents per node, nodes, payload, state size and load.

    python3 scripts/bench/scaling.py                  # full run (under about 20 minutes)
    python3 scripts/bench/scaling.py --quick          # smaller sizes, shorter runs (about 3 minutes)
    python3 scripts/bench/scaling.py --only payload   # one dimension (agents, nodes, payload,
                                                      #   snapshot, restart, memory, group)
    python3 scripts/bench/scaling.py --only payload --at 1000000   # one point of it
    python3 scripts/bench/scaling.py --write          # also rewrite its section of docs/benchmarks.md

Every mesh is core.py's: a real `mesh up` of a generated config (loopback, data in a temp
dir, fsync on, default timing), driven through `mesh.connect` from this process, and
ended by pid, also on an error or Ctrl-C. Each dimension is one small function that
returns one row per point; figures taken several times are given as the median with the
range over runs. With matplotlib importable, --write also draws docs/bench-NAME.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from core import DOC, ROOT, Mesh, bench_idle, machine, pct, proc_status, say, summary, write_section  # noqa: E402

import mesh  # noqa: E402

BEGIN, END = "<!-- scaling:begin (written by scripts/bench/scaling.py --write) -->", "<!-- scaling:end -->"
HEADING = "## How cost grows"
SCRIPT = "python3 scripts/bench/scaling.py"

GET, ADD = {"op": "get"}, {"op": "add", "n": 1}
LEDGER = {"ledger": "nodes.ledger:Ledger"}
SPAWN_OUTSTANDING = 500  # as core.py spawns
LOAD_OUTSTANDING = 200   # durable calls in flight in the agents and nodes dimensions
CALL_TIMEOUT = 60
SPREAD_AGENTS = 300      # counters spread over the nodes (divides by 1, 2, 3 and 6)
GROUP_AGENTS = 1000      # counters the group-commit load is spread over
SNAPSHOT_OUTSTANDING = 20
NOTEWORTHY = ("lease_lapses", "crashes", "commit_errors", "mailbox_full", "over_limit", "expired", "fenced",
              "casts_dropped", "init_failures", "bad_messages")

# Sizes of a full run and of a --quick one. Budgets are seconds of spawning at most.
SIZES = {
    False: dict(runs=5, seconds=3.0, calls=1000, call_cap_s=4.0, agents=(1, 100, 10_000, 100_000),
                spawn_budget=240, nodes=(1, 2, 3, 6), payload=(100, 10_000, 100_000, 1_000_000),
                state=(1_000, 100_000, 1_000_000, 10_000_000), trials=5, idle=(1_000, 10_000, 100_000),
                idle_budget=180, group=(1, 10, 100, 500)),
    True: dict(runs=3, seconds=1.0, calls=300, call_cap_s=1.5, agents=(1, 100, 10_000),
               spawn_budget=45, nodes=(1, 2, 3, 6), payload=(100, 10_000, 100_000, 1_000_000),
               state=(1_000, 100_000, 1_000_000, 10_000_000), trials=2, idle=(1_000, 10_000),
               idle_budget=30, group=(1, 10, 100, 500)),
}
POINTS = {"agents": "agents", "nodes": "nodes", "payload": "payload", "snapshot": "state", "restart": "state",
          "memory": "idle", "group": "group"}


# --- driving a mesh -------------------------------------------------------------------------------

async def spawn_many(m, names: list[str], kind: str = "counter", stop_at: float = float("inf"),
                     outstanding: int = SPAWN_OUTSTANDING) -> dict[str, str]:
    """Spawn `names`, `outstanding` at a time, until done or `stop_at` (perf_counter);
    returns the node of each name spawned."""
    nodes: dict[str, str] = {}

    async def worker(w: int):
        for i in range(w, len(names), outstanding):
            if time.perf_counter() > stop_at:
                return
            nodes[names[i]] = (await m.spawn(names[i], kind, timeout=CALL_TIMEOUT))["node"]
    await asyncio.gather(*(worker(w) for w in range(min(outstanding, len(names)))))
    return nodes


async def timed_calls(m, pick: Callable[[], str], msg: Any, n: int, cap_s: float) -> list[float]:
    """Round trips of sequential calls to pick()'s agent: n of them, or fewer if they take
    longer than cap_s (at least 5, so that a slow point still gets a figure)."""
    times: list[float] = []
    stop = time.perf_counter() + cap_s
    while len(times) < n and (len(times) < 5 or time.perf_counter() < stop):
        t = time.perf_counter()
        await m.call(pick(), msg, timeout=CALL_TIMEOUT)
        times.append(time.perf_counter() - t)
    return times


async def load(seconds: float, outstanding: int, call: Callable[[], Any]) -> tuple[float, list[float]]:
    """`outstanding` workers calling call() back to back for `seconds`: (calls/s, round trips).
    Calls still in flight at the end are waited for and counted."""
    times: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            times.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(outstanding)))
    return len(times) / (time.perf_counter() - t0), times


def random_adds(m, names: list[str], counts: Counter) -> Callable[[], Any]:
    """A durable `add` to a random one of `names`, counted in `counts` once acknowledged."""
    async def call():
        name = random.choice(names)
        await m.call(name, ADD, timeout=CALL_TIMEOUT)
        counts[name] += 1
    return call


async def check_counts(m, counts: Counter, sample: int = 50) -> None:
    """Every acknowledged add must be there: read back a sample of the counters."""
    for name in random.sample(sorted(counts), min(sample, len(counts))):
        value = await m.call(name, GET, timeout=CALL_TIMEOUT)
        if value != counts[name]:
            raise AssertionError(f"{name} holds {value}, but {counts[name]} adds were acknowledged")


async def node_stats(m) -> dict[str, Counter]:
    """Each node's counters (commits, lease_lapses, crashes, ...), as the mesh reports them."""
    st = await m.status(timeout=CALL_TIMEOUT, agents=False)  # counts only: bounded at any population
    return {n["name"]: Counter(n.get("stats") or {}) for n in st["nodes"]}


def stats_delta(before: dict[str, Counter], after: dict[str, Counter]) -> Counter:
    total = Counter()
    for node, stats in after.items():
        total.update({k: v - before.get(node, Counter()).get(k, 0) for k, v in stats.items()})
    return total


def noteworthy(stats: dict[str, Counter]) -> list[str]:
    """Counters of trouble a healthy run keeps at zero."""
    return [f"{node}: {key} = {stats[node][key]:,}" for node in sorted(stats) for key in NOTEWORTHY
            if stats[node].get(key)]


def mesh_warnings(mh: Mesh, expected: str | None = None) -> list[str]:
    """What the mesh logged at WARNING and above, but for lines matching `expected`: each
    distinct message once (numbers and ids aside), with how often, so that a run's
    oddities reach its report."""
    seen: Counter = Counter()
    first: dict[str, str] = {}
    with mh.cond:
        lines = list(mh.lines)
    for line in lines:
        if not any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
            continue
        if expected and re.search(expected, line):
            continue
        text = line.split("]: ", 1)[-1][:200]
        key = re.sub(r"[0-9a-f]{8,}|\d+", "#", text)
        seen[key] += 1
        first.setdefault(key, text)
    return [f"mesh log: {first[key]!r}" + (f" (and {n - 1:,} more like it)" if n > 1 else "")
            for key, n in seen.most_common(6)]


async def spawn_on(m, node: str, name: str, kind: str) -> str:
    """Spawn `name` on `node`. Placement takes the least loaded node, so while it lands
    elsewhere it is stopped and an idle counter is put there instead; returns the name used."""
    for attempt in range(20):
        candidate = f"{name}-{attempt}"
        placed = await m.spawn(candidate, kind, timeout=CALL_TIMEOUT)
        if placed["node"] == node:
            return candidate
        await m.stop(candidate, timeout=CALL_TIMEOUT)
        await m.spawn(f"filler-{name}-{attempt}", "counter", timeout=CALL_TIMEOUT)
    raise RuntimeError(f"placement never put {name} on {node}")


async def grow_ledger(m, name: str, size: int) -> int:
    """Append bytes to ledger `name` until its state holds `size` bytes of values
    (chunks of at most 1 MB); returns how many values it holds."""
    chunk = min(size, 1_000_000)
    for i in range(size // chunk):
        await m.call(name, {"op": "append", "value": random.randbytes(chunk)}, timeout=CALL_TIMEOUT)
    return size // chunk


def mesh_run(nodes: int, go, **mesh_kw) -> None:
    """asyncio.run(go(mh, m)) against a fresh mesh of `nodes` nodes, with a client."""
    async def main(mh: Mesh):
        async with mesh.connect(mh.config) as m:
            await go(mh, m)
    with Mesh(nodes, **{"label": "bench-scaling", **mesh_kw}) as mh:
        asyncio.run(main(mh))


# --- the dimensions ---------------------------------------------------------------------------------
# Each returns {"rows": [one dict per point], "notes": [what a reader should know]}.

def bench_agents(size: dict, points: tuple[int, ...]) -> dict:
    """One node with K counters (K grows in place): `get` round trip to a random one, and
    durable `add` calls/s with LOAD_OUTSTANDING in flight spread over all of them. The node's
    RSS is read at each K too. Spawning has a time budget; a point it cuts short is measured
    at the K it reached, and the notes say so."""
    out: dict = {"rows": [], "notes": []}

    async def go(mh: Mesh, m):
        pid, names, counts = mh.pids["n1"], [], Counter()
        budget_left = size["spawn_budget"]  # seconds of spawning, measurements aside
        for k in sorted(points):
            t = time.perf_counter()
            names += list(await spawn_many(m, [f"a{i}" for i in range(len(names), k)], stop_at=t + budget_left))
            spawn_s = time.perf_counter() - t
            budget_left -= spawn_s
            if len(names) < k:
                out["notes"].append(f"{k:,} agents asked for; {len(names):,} spawned within the "
                                    f"{size['spawn_budget']:g} s spawning budget, measured there, larger K skipped")
            await asyncio.sleep(0.5)
            rss = proc_status(pid)["VmRSS"]
            t = time.perf_counter()
            await m.status(agents=False, timeout=CALL_TIMEOUT)  # `mesh status`'s default view past 200 agents
            status_s = time.perf_counter() - t
            row = {"x": len(names), "asked": k, "spawn_s": spawn_s, "rss_mb": rss / 1024, "status_s": status_s,
                   "p50": [], "p99": [], "rate": []}
            for run in range(size["runs"]):
                times = await timed_calls(m, lambda: random.choice(names), GET, size["calls"], size["call_cap_s"])
                rate, _ = await load(size["seconds"], LOAD_OUTSTANDING, random_adds(m, names, counts))
                row["p50"].append(pct(times, 0.5) * 1e6)
                row["p99"].append(pct(times, 0.99) * 1e6)
                row["rate"].append(rate)
                say(f"agents: K={len(names):,} run {run + 1}: get p50 {row['p50'][-1]:.0f} µs p99 "
                    f"{row['p99'][-1]:.0f} µs; {rate:,.0f} adds/s; node RSS {rss / 1024:.0f} MB")
            await check_counts(m, counts)
            out["rows"].append(row)
            if len(names) < k:
                break
        out["notes"] += mesh_warnings(mh)

    # WARNING, not INFO: up to 100,000 spawns would log two lines each and slow the figures
    mesh_run(1, go, log="WARNING")
    return out


def bench_nodes(size: dict, points: tuple[int, ...]) -> dict:
    """N nodes on loopback, SPREAD_AGENTS counters placed over all of them, one client:
    aggregate durable `add` calls/s with LOAD_OUTSTANDING in flight."""
    out: dict = {"rows": [], "notes": []}
    for n in points:
        async def go(mh: Mesh, m, n=n):
            names, counts = [f"s{i}" for i in range(SPREAD_AGENTS)], Counter()
            # one at a time: concurrent spawns all choose the same node (the table's last column)
            spread = Counter((await spawn_many(m, names, outstanding=1)).values())
            before = await node_stats(m)
            row = {"x": n, "rate": [], "p50": [], "spread": spread}
            for run in range(size["runs"]):
                rate, times = await load(size["seconds"], LOAD_OUTSTANDING, random_adds(m, names, counts))
                row["rate"].append(rate)
                row["p50"].append(pct(times, 0.5) * 1e6)
                say(f"nodes: {n} run {run + 1}: {rate:,.0f} adds/s, p50 {row['p50'][-1] / 1000:.1f} ms")
            await check_counts(m, counts)
            after = await node_stats(m)
            commits = stats_delta(before, after)["commits"]
            row["per_commit"] = sum(counts.values()) / commits if commits else float("nan")
            # the same number again, all at once: how placement spreads concurrent spawns
            row["burst"] = Counter((await spawn_many(m, [f"b{i}" for i in range(SPREAD_AGENTS)])).values())
            out["rows"].append(row)
            out["notes"] += [f"{n} nodes: {line}" for line in noteworthy(after) + mesh_warnings(mh)]
        mesh_run(n, go)
    return out


def bench_payload(size: dict, points: tuple[int, ...]) -> dict:
    """Sequential calls carrying S bytes: one way (a counter's `get` with an S-byte `pad`,
    answered with a small number) and both ways (a ledger holding one S-byte value, `read`
    with an S-byte `pad`). Neither changes state, so no commit is waited for; the ledger
    packs its S-byte state after each call, as every agent does."""
    out: dict = {"rows": [], "notes": []}

    async def go(mh: Mesh, m):
        await m.spawn("echo-counter", "counter", timeout=CALL_TIMEOUT)
        for s in points:
            pad = random.randbytes(s)
            ledger = f"echo-ledger-{s}"
            await m.spawn(ledger, "ledger", timeout=CALL_TIMEOUT)
            await m.call(ledger, {"op": "append", "value": pad}, timeout=CALL_TIMEOUT)
            row = {"x": s, "one_p50": [], "one_p99": [], "both_p50": [], "both_p99": []}
            for run in range(size["runs"]):
                for key, name, msg in (("one", "echo-counter", {"op": "get", "pad": pad}),
                                       ("both", ledger, {"op": "read", "pad": pad})):
                    times = await timed_calls(m, lambda: name, msg, size["calls"], size["call_cap_s"])
                    row[f"{key}_p50"].append(pct(times, 0.5) * 1e6)
                    row[f"{key}_p99"].append(pct(times, 0.99) * 1e6)
                say(f"payload: {s:,} B run {run + 1}: one way p50 {row['one_p50'][-1]:,.0f} µs, "
                    f"both ways p50 {row['both_p50'][-1]:,.0f} µs")
            reply = await m.call(ledger, {"op": "read"}, timeout=CALL_TIMEOUT)
            assert reply == [pad], f"payload: the ledger of {s} bytes did not echo its value"
            out["rows"].append(row)
        out["notes"] += mesh_warnings(mh)

    mesh_run(1, go, kinds=LEDGER)
    return out


def bench_snapshot(size: dict, points: tuple[int, ...]) -> dict:
    """One ledger grown to S bytes of state in a one-node mesh: sequential durable appends of
    a small integer (p50), and appends/s with SNAPSHOT_OUTSTANDING in flight. Every append
    packs and commits the agent's whole state, so this is the cost of a snapshot of S bytes.
    Also the p50 of `len`, a read: the runner packs the state after every message, reads too,
    to see whether it changed."""
    out: dict = {"rows": [], "notes": []}

    async def go(mh: Mesh, m):
        for s in points:
            name = f"snap-{s}"
            await m.spawn(name, "ledger", timeout=CALL_TIMEOUT)
            t = time.perf_counter()
            held = await grow_ledger(m, name, s)
            row = {"x": s, "grow_s": time.perf_counter() - t, "p50": [], "rate": [], "read_p50": []}
            append = {"op": "append", "value": 0}  # one byte more per call: the state hardly grows
            for run in range(size["runs"]):
                reads = await timed_calls(m, lambda: name, {"op": "len"}, size["calls"] // 3, size["call_cap_s"])
                row["read_p50"].append(pct(reads, 0.5) * 1e6)
                times = await timed_calls(m, lambda: name, append, size["calls"] // 3, size["call_cap_s"])
                rate, more = await load(size["seconds"], SNAPSHOT_OUTSTANDING,
                                        lambda: m.call(name, append, timeout=CALL_TIMEOUT))
                held += len(times) + len(more)
                row["p50"].append(pct(times, 0.5) * 1e6)
                row["rate"].append(rate)
                say(f"snapshot: {s:,} B run {run + 1}: len p50 {row['read_p50'][-1] / 1000:,.1f} ms; "
                    f"append p50 {row['p50'][-1] / 1000:,.1f} ms; "
                    f"{rate:,.0f} appends/s with {SNAPSHOT_OUTSTANDING} outstanding")
            got = await m.call(name, {"op": "len"}, timeout=CALL_TIMEOUT)
            assert got == held, f"snapshot: ledger of {s} bytes holds {got} values, {held} were acknowledged"
            row["appended"] = held - s // min(s, 1_000_000)
            out["rows"].append(row)
        out["notes"] += mesh_warnings(mh)

    mesh_run(1, go, kinds=LEDGER)
    return out


def bench_restart(size: dict, points: tuple[int, ...]) -> dict:
    """Two nodes; a ledger of S bytes on n2 (not the supervisor's node). Each trial kills n2
    with SIGKILL, then calls the ledger's `len` at once (the client retries by itself)
    until it answers with the right count; the launcher restarts n2 at once. The next
    trial waits for n2's "ready" line."""
    out: dict = {"rows": [], "notes": []}

    async def go(mh: Mesh, m):
        for s in points:
            name = await spawn_on(m, "n2", f"big-{s}", "ledger")
            held = await grow_ledger(m, name, s)
            row = {"x": s, "ms": [], "victims": Counter()}
            for trial in range(size["trials"]):
                victim = (await m.whereis(name))["node"]
                mark, pid = mh.mark(), mh.pids[victim]
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                got = await m.call(name, {"op": "len"}, timeout=CALL_TIMEOUT)
                took = time.perf_counter() - t0
                assert got == held, f"restart: {name} came back with {got} values, not {held}"
                await asyncio.to_thread(mh.wait_for, rf"node {victim} ready \(pid", mark, 30)
                row["ms"].append(took * 1000)
                row["victims"][victim] += 1
                say(f"restart: {s:,} B trial {trial + 1}: killed {victim}; answered with its state after "
                    f"{took * 1000:,.0f} ms")
            await m.stop(name, timeout=CALL_TIMEOUT)
            if set(row["victims"]) != {"n2"}:
                out["notes"].append(f"{s:,} B: the ledger moved; kills per node: {dict(row['victims'])}")
            out["rows"].append(row)
        out["notes"] += mesh_warnings(mh, expected=r"supervisor: node n2 restarted")

    mesh_run(2, go, kinds=LEDGER)
    return out


def bench_memory(size: dict, points: tuple[int, ...]) -> dict:
    """core.bench_idle for each K: a fresh one-node mesh, K idle counters, the node's RSS
    before and one second after. It stops at its time budget; the row then says how many."""
    out: dict = {"rows": [], "notes": []}
    for k in points:
        r = bench_idle({"idle": k, "idle_budget": size["idle_budget"]})
        before, after, count = r["before"]["VmRSS"], r["after"]["VmRSS"], r["count"]
        out["rows"].append({"x": count, "asked": k, "before_mb": before / 1024, "after_mb": after / 1024,
                            "per_kb": (after - before) / count, "spawn_rate": r["spawn_rate"],
                            "first_rate": r["first_rate"], "last_rate": r["last_rate"]})
        if count < k:
            out["notes"].append(f"{k:,} asked for: {count:,} spawned within the {size['idle_budget']:g} s budget")
    return out


def bench_group(size: dict, points: tuple[int, ...]) -> dict:
    """One node, GROUP_AGENTS counters: durable `add` calls/s with 1 .. 500 calls in flight.
    A node commits whatever one loop turn produced as one fsync'd group, so more in
    flight should mean bigger groups; calls per commit come from the node's own counters."""
    out: dict = {"rows": [], "notes": []}

    async def go(mh: Mesh, m):
        names, counts = [f"g{i}" for i in range(GROUP_AGENTS)], Counter()
        await spawn_many(m, names)
        for o in points:
            row = {"x": o, "rate": [], "p50": [], "per_commit": []}
            for run in range(size["runs"]):
                before = await node_stats(m)
                done = sum(counts.values())
                rate, times = await load(size["seconds"], o, random_adds(m, names, counts))
                commits = stats_delta(before, await node_stats(m))["commits"]
                row["rate"].append(rate)
                row["p50"].append(pct(times, 0.5) * 1e6)
                row["per_commit"].append((sum(counts.values()) - done) / max(commits, 1))
                say(f"group: {o} outstanding run {run + 1}: {rate:,.0f} adds/s, p50 {row['p50'][-1] / 1000:.2f} ms, "
                    f"{row['per_commit'][-1]:.1f} calls per commit")
            out["rows"].append(row)
        await check_counts(m, counts)
        out["notes"] += noteworthy(await node_stats(m)) + mesh_warnings(mh)

    mesh_run(1, go)
    return out


# --- tables -------------------------------------------------------------------------------------------

def med(values: list[float], unit: str = "", scale: float = 1, digits: int = 0) -> str:
    """Median [range] of per-run values, or the value alone when there is one run."""
    m, lo, hi = (v * scale for v in summary(values))
    f = f"{{:,.{digits}f}}"
    return f"{f.format(m)}{unit}" if len(values) == 1 else f"{f.format(m)}{unit} [{f.format(lo)}–{f.format(hi)}]"


def us_or_ms(values: list[float]) -> str:
    """Microsecond figures, shown in ms from 1 ms on."""
    return med(values, " µs") if summary(values)[0] < 1000 else med(values, " ms", 1e-3, 1)


def size_label(n: int) -> str:
    for unit, div in (("MB", 1_000_000), ("KB", 1_000)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def per_node(counts: Counter, nodes: int) -> str:
    return " / ".join(str(counts[f"n{i + 1}"]) for i in range(nodes))


def spawn_rates(row: dict) -> str:
    """Spawn rate overall, and (when there are enough to tell) in the first and last tenth."""
    if row["x"] < 10 * SPAWN_OUTSTANDING:  # tenths shorter than the window of outstanding spawns say nothing
        return f"{row['spawn_rate']:,.0f}"
    return f"{row['spawn_rate']:,.0f} / {row['first_rate']:,.0f} / {row['last_rate']:,.0f}"


@dataclass(frozen=True)
class Dim:
    """How one dimension is run, shown and drawn."""
    title: str
    method: str                                  # one paragraph: how the figures are taken
    run: Callable[[dict, tuple], dict]
    columns: tuple[tuple[str, Callable[[dict], str]], ...]
    plot_x: str
    plot_y: str
    series: tuple[tuple[str, str], ...]         # (label, key of per-run values)
    log_x: bool = True
    log_y: bool = False
    y_scale: float = 1


DIMS: dict[str, Dim] = {
    "agents": Dim(
        "Agents in one node",
        f"One node; K counters spawned ({SPAWN_OUTSTANDING} outstanding), K growing in the same mesh. "
        f"Sequential `get` to a random one of them; durable `add` to random ones, {LOAD_OUTSTANDING} "
        "outstanding, for a fixed time per run; node RSS after spawning; the time of one `mesh status` in its default view (counts) at K.",
        bench_agents,
        (("agents", lambda r: f"{r['x']:,}" + ("" if r["x"] == r["asked"] else f" (of {r['asked']:,})")),
         ("spawning them", lambda r: f"{r['spawn_s']:.1f} s"),
         ("node RSS", lambda r: f"{r['rss_mb']:,.0f} MB"),
         ("`mesh status` (counts)", lambda r: f"{r.get('status_s', 0) * 1000:,.0f} ms"),
         ("`get` p50", lambda r: us_or_ms(r["p50"])),
         ("`get` p99", lambda r: us_or_ms(r["p99"])),
         (f"durable `add`, {LOAD_OUTSTANDING} outstanding", lambda r: med(r["rate"], " calls/s"))),
        "agents in the node", "durable add calls/s", (("add calls/s", "rate"),)),
    "nodes": Dim(
        "Nodes on one machine",
        f"N nodes on loopback (one host, one LMDB store), {SPREAD_AGENTS} counters spawned one at a time so "
        f"that placement spreads them evenly, one client process: durable `add` to random ones, "
        f"{LOAD_OUTSTANDING} outstanding. The machine has 2 cores: the nodes share them with the client. "
        f"Last column: where placement put {SPREAD_AGENTS} more counters spawned concurrently.",
        bench_nodes,
        (("nodes", lambda r: str(r["x"])),
         ("agents per node", lambda r: per_node(r["spread"], r["x"])),
         (f"durable `add`, {LOAD_OUTSTANDING} outstanding", lambda r: med(r["rate"], " calls/s")),
         ("round trip p50", lambda r: us_or_ms(r["p50"])),
         ("calls per commit", lambda r: f"{r['per_commit']:.1f}"),
         (f"then {SPREAD_AGENTS} more spawned all at once, per node", lambda r: per_node(r["burst"], r["x"]))),
        "nodes", "durable add calls/s", (("add calls/s", "rate"),), log_x=False),
    "payload": Dim(
        "Payload size",
        "One node; sequential calls. One way: a counter's `get` with an S-byte `pad` (the reply is a "
        "number). Both ways: a ledger holding one S-byte value, `read` with an S-byte `pad` (the reply "
        "is the value). Neither changes state, so neither waits for a commit. All fit the default "
        "message limit (`limits.max_message_bytes`, 8 MiB).",
        bench_payload,
        (("payload", lambda r: size_label(r["x"])),
         ("one way, p50", lambda r: us_or_ms(r["one_p50"])),
         ("one way, p99", lambda r: us_or_ms(r["one_p99"])),
         ("both ways, p50", lambda r: us_or_ms(r["both_p50"])),
         ("both ways, p99", lambda r: us_or_ms(r["both_p99"]))),
        "payload (bytes)", "round trip (ms)",
        (("one way p50", "one_p50"), ("one way p99", "one_p99"), ("both ways p50", "both_p50"),
         ("both ways p99", "both_p99")), log_y=True, y_scale=1e-3),
    "snapshot": Dim(
        "State (snapshot) size",
        "One node; a ledger grown to S bytes of values (appends of up to 1 MB), then durable appends of "
        f"the integer 0: sequential (p50), and {SNAPSHOT_OUTSTANDING} outstanding (calls/s). Every append "
        "packs and commits the agent's whole state (each one makes it a byte larger). `len` is a read, "
        "answered without a commit; the runner still packs the state after it to see that it did not change.",
        bench_snapshot,
        (("state", lambda r: size_label(r["x"])),
         ("growing it", lambda r: f"{r['grow_s']:.1f} s"),
         ("appends measured", lambda r: f"{r['appended']:,}"),
         ("read `len` p50", lambda r: us_or_ms(r["read_p50"])),
         ("durable append p50", lambda r: us_or_ms(r["p50"])),
         (f"appends/s, {SNAPSHOT_OUTSTANDING} outstanding", lambda r: med(r["rate"], " calls/s"))),
        "agent state (bytes)", "durable appends/s", (("appends/s", "rate"),), log_y=True),
    "restart": Dim(
        "Restart time against state size",
        "Two nodes; a ledger of S bytes on n2 (not the supervisor's node). `kill -9` of n2, then at once "
        "the ledger's `len` (the client retries by itself) until it answers with its full count; the "
        "launcher restarts n2 at once.",
        bench_restart,
        (("state", lambda r: size_label(r["x"])),
         ("trials", lambda r: str(len(r["ms"]))),
         ("kill -9 until it answers with its state, median", lambda r: f"{summary(r['ms'])[0]:,.0f} ms"),
         ("range", lambda r: f"{min(r['ms']):,.0f}–{max(r['ms']):,.0f} ms")),
        "agent state (bytes)", "kill -9 to answer (ms)", (("median", "ms"),)),
    "memory": Dim(
        "Memory per idle agent",
        f"`core.bench_idle`: a fresh node, K idle counters spawned ({SPAWN_OUTSTANDING} outstanding, "
        "within a time budget), the node's VmRSS before and one second after.",
        bench_memory,
        (("idle agents", lambda r: f"{r['x']:,}" + ("" if r["x"] == r["asked"] else f" (of {r['asked']:,})")),
         ("node RSS before / after", lambda r: f"{r['before_mb']:,.0f} / {r['after_mb']:,.0f} MB"),
         ("per agent", lambda r: f"{r['per_kb']:.2f} KB"),
         ("spawns/s: all / first tenth / last tenth", spawn_rates)),
        "idle agents", "KB per agent", (("KB per agent", "per_kb"),)),
    "group": Dim(
        "Durable throughput against calls in flight (group commit)",
        f"One node, {GROUP_AGENTS:,} counters; durable `add` to random ones with C calls outstanding, for "
        "a fixed time per run. Calls per commit: acknowledged adds over the node's `commits` counter.",
        bench_group,
        (("outstanding", lambda r: f"{r['x']:,}"),
         ("durable `add`", lambda r: med(r["rate"], " calls/s")),
         ("round trip p50", lambda r: us_or_ms(r["p50"])),
         ("calls per commit", lambda r: med(r["per_commit"], digits=1))),
        "calls outstanding", "durable add calls/s", (("add calls/s", "rate"),)),
}


def dim_table(name: str, res: dict | str, q: str) -> list[str]:
    """A dimension's heading, method, table (one reproducing command per row) and notes."""
    dim = DIMS[name]
    lines = [f"### {dim.title}", "", dim.method, ""]
    if isinstance(res, str):
        return lines + [f"**Failed**: {res} (`{SCRIPT} --only {name}{q}`)", ""]
    heads = [h for h, _ in dim.columns] + ["reproduce"]
    lines += ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for row in res["rows"]:
        at = row.get("asked", row["x"])
        lines.append("| " + " | ".join(fn(row) for _, fn in dim.columns)
                     + f" | `{SCRIPT} --only {name} --at {at}{q}` |")
    if res.get("plot"):
        lines += ["", f"![{dim.title}]({res['plot']})"]
    if res["notes"]:
        lines += ["", "Notes: " + "; ".join(res["notes"]) + "."]
    return lines + [""]


# --- plots ----------------------------------------------------------------------------------------------

def matplotlib_pyplot():
    """pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def median_of(value) -> float:
    """A row's figure for a plot: the median of several runs, or the one value taken."""
    if isinstance(value, (list, tuple)):
        return summary(value)[0] if value else float("nan")
    return float("nan") if value is None else value


def draw(plt, name: str, res: dict, folder: Path) -> str | None:
    """One PNG of a dimension's medians; returns its file name, or None if there is nothing to draw."""
    dim, rows = DIMS[name], res["rows"]
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    xs = [r["x"] for r in rows]
    for label, key in dim.series:
        ax.plot(xs, [median_of(r.get(key)) * dim.y_scale for r in rows], marker="o", label=label)
    ax.set_xscale("log" if dim.log_x else "linear")
    ax.set_yscale("log" if dim.log_y else "linear")
    ax.set_xlabel(dim.plot_x)
    ax.set_ylabel(dim.plot_y)
    ax.set_title(dim.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(dim.series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    file = f"bench-{name}.png"
    fig.savefig(folder / file)
    plt.close(fig)
    return file


def draw_all(results: dict, folder: Path) -> bool:
    """Draw every dimension that has rows into `folder`; False when matplotlib is missing."""
    plt = matplotlib_pyplot()
    if plt is None:
        return False
    for name, res in results.items():
        if isinstance(res, dict):
            try:
                res["plot"] = draw(plt, name, res, folder)
            except Exception:  # a plot must never cost the run its figures
                traceback.print_exc()
                res["plot"] = None
    return True


# --- the run ---------------------------------------------------------------------------------------------

def report(results: dict, size: dict, q: str, took: float, load_at_start: float, plots: str) -> str:
    lines = [
        f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {took / 60:.1f} min in all. Up to {size['runs']} runs "
        f"per figure ({size['seconds']:g} s of load per throughput run, up to {size['calls']:,} calls per "
        f"latency run; restart: {size['trials']} trials per size). {plots}",
        "",
        *[f"- {line}" for line in machine(load_at_start)],
        "",
    ]
    for name, res in results.items():
        lines += dim_table(name, res, q)
    return "\n".join(lines).rstrip("\n")


def run_all(names: list[str], size: dict, at: list[int] | None) -> dict:
    """Run each dimension; a failure becomes its result (a string), and the others go on."""
    results: dict = {}
    for name in names:
        say(f"--- {name}")
        points = tuple(at) if at else size[POINTS[name]]
        t = time.monotonic()
        try:
            results[name] = DIMS[name].run(size, points)
        except Exception as exc:
            traceback.print_exc()
            results[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        say(f"--- {name}: {time.monotonic() - t:.0f} s")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Progress goes to stderr; the tables to stdout.")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, 3 short runs (about 3 minutes)")
    ap.add_argument("--only", action="append", choices=list(DIMS), help="run only this dimension (repeatable)")
    ap.add_argument("--at", type=int, action="append", metavar="N",
                    help="measure only this point of the dimension (repeatable; with one --only)")
    ap.add_argument("--runs", type=int, help="runs per figure (default 5, or 3 with --quick)")
    ap.add_argument("--write", action="store_true",
                    help="rewrite the scaling section of docs/benchmarks.md, and its plots if matplotlib is there")
    args = ap.parse_args()
    if args.at and len(args.only or ()) != 1:
        ap.error("--at needs exactly one --only")
    if args.write and (args.only or args.runs):
        ap.error("--write is for a run of every dimension at its default sizes: leave out --only and --runs")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that Mesh's exits end what we started
    size = dict(SIZES[args.quick])
    if args.runs:
        size["runs"] = args.runs
    t, load_at_start = time.monotonic(), os.getloadavg()[0]
    results = run_all(args.only or list(DIMS), size, args.at)
    if args.write:
        plots = ("Plots: docs/bench-*.png." if draw_all(results, DOC.parent)
                 else "No plots: they need `pip install matplotlib`.")
    else:
        plots = ("Plots are drawn with --write." if matplotlib_pyplot()
                 else "No plots: they need `pip install matplotlib` (and --write).")
    q = (" --quick" if args.quick else "") + (f" --runs {args.runs}" if args.runs else "")
    text = report(results, size, q, time.monotonic() - t, load_at_start, plots)
    print(text)
    if args.write:
        write_section(BEGIN, END, text, HEADING)
        say(f"wrote {DOC.relative_to(ROOT)}")
    return 1 if any(isinstance(r, str) for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
