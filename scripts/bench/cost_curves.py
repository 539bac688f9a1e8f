"""Cost against what an agent or a node holds: a conversation's turn against its history,
and kill -9 of a node against the agents it hosts.

    python3 scripts/bench/cost_curves.py                 # both, full sizes (a few minutes)
    python3 scripts/bench/cost_curves.py --only turn --history 10 --history 10000
    python3 scripts/bench/cost_curves.py --only kill --agents 10 --agents 1000 --agents 10000

turn: one node, the stand-in model server (scripts/llm_server.py, no added latency) as
[llm]; one ConversationAgent per history length, each grown by `say` turns to that many
messages (its `keep` raised to hold them); then turns measured on each in turn, round
trips from this process. The figure that matters is the ratio of each length's p50 to the
shortest's, in the same run.

kill: three nodes; counters spawned until the node that is not the supervisor's and hosts
the most has K of them, each with its own value; kill -9 of that node, then a `get` to
each of its agents at once (500 outstanding; the client retries by itself) until every
one answered with its value; the time to the first and to the last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from core import Mesh, free_ports, machine, pct, say  # noqa: E402

import mesh  # noqa: E402

SCRIPT = "python3 scripts/bench/cost_curves.py"
OUTSTANDING = 500


# --- a conversation's turn against its history ----------------------------------------------------

def bench_turn(histories: list[int], turns: int) -> list[tuple[int, float, float]]:
    """(history length, turn p50 ms, turn p99 ms) per length."""
    port = free_ports(1)[0]
    llm = (f'\n[llm]\nbase_url = "http://127.0.0.1:{port}/v1"\nmodel = "stand-in"\nstand_in = true\n'
           f'max_connections = 16\n')
    out = []

    async def go(cfg):
        async with mesh.connect(cfg) as m:
            for n in histories:
                name = f"talk{n}"
                await m.spawn(name, "conversation", {"keep": max(n, 40), "window": 20})
                t = time.perf_counter()
                for i in range(n // 2):  # each turn adds the user's text and the reply
                    await m.call(name, {"op": "say", "text": f"message {i}: " + "words " * 8}, timeout=60)
                say(f"turn: {name} grown to {len(await m.call(name, {'op': 'history'}, timeout=60)):,} "
                    f"messages in {time.perf_counter() - t:.1f} s")
            times: dict[int, list[float]] = {n: [] for n in histories}
            for _ in range(turns):
                for n in histories:  # interleaved: a change in the machine's load hits every length alike
                    t = time.perf_counter()
                    await m.call(f"talk{n}", {"op": "say", "text": "one more turn"}, timeout=60)
                    times[n].append((time.perf_counter() - t) * 1000)
            for n in histories:
                out.append((n, pct(times[n], 0.5), pct(times[n], 0.99)))
                say(f"turn: history {n:,}: p50 {out[-1][1]:.2f} ms, p99 {out[-1][2]:.2f} ms")

    with Mesh(1, kinds={"conversation": "nodes.conversation:ConversationAgent"}, label="bench-turn",
              extra=llm) as mh:
        asyncio.run(go(mh.config))
    return out


# --- kill -9 against the agents a node hosts ---------------------------------------------------------

def bench_kill(counts: list[int], trials: int) -> list[tuple[int, list[float], list[float]]]:
    """(agents on the killed node, first answers ms, last answers ms) per count."""
    out = []

    async def go(mh: Mesh):
        async with mesh.connect(mh.config) as m:
            want: dict[str, int] = {}
            where: dict[str, list[str]] = {}

            async def spawn(name: str):
                placed = await m.spawn(name, "counter", timeout=60)
                want[name] = await m.call(name, {"op": "add", "n": len(name)}, timeout=60)
                where.setdefault(placed["node"], []).append(name)

            for count in counts:
                while max((len(v) for n, v in where.items() if n != "n1"), default=0) < count:
                    names = [f"k{len(want) + i}" for i in range(min(5000, 3 * count))]
                    await _in_flight([spawn(name) for name in names])
                firsts, lasts = [], []
                for trial in range(trials):
                    victim = max((n for n in where if n != "n1"), key=lambda n: len(where[n]))
                    names = where[victim][:count]  # the rest answer too, but are not timed
                    mark, pid = mh.mark(), mh.pids[victim]
                    t0 = time.perf_counter()
                    os.kill(pid, signal.SIGKILL)

                    async def get(name):
                        value = await m.call(name, {"op": "get"}, timeout=120)
                        if value != want[name]:
                            raise AssertionError(f"kill: {name} answered {value}, not {want[name]}")
                        return time.perf_counter() - t0
                    took = await _in_flight([get(n) for n in names])
                    firsts.append(min(took) * 1000)
                    lasts.append(max(took) * 1000)
                    say(f"kill: {count:,} agents on {victim} (it hosts {len(where[victim]):,}): trial {trial + 1}: "
                        f"first {firsts[-1]:.0f} ms, all {lasts[-1]:.0f} ms")
                    await asyncio.to_thread(mh.wait_for, rf"node {victim} ready", mark, 60)
                    where.clear()  # they may have moved: ask again
                    for node, names_there in (await _placement(m, list(want))).items():
                        where[node] = names_there
                out.append((count, firsts, lasts))

    with Mesh(3, log="WARNING", label="bench-kill-curve") as mh:
        asyncio.run(go(mh))
    return out


async def _in_flight(coros: list) -> list:
    """Run `coros`, OUTSTANDING at a time; their results in order."""
    results: list = [None] * len(coros)
    it = iter(enumerate(coros))

    async def worker():
        for i, coro in it:
            results[i] = await coro
    await asyncio.gather(*(worker() for _ in range(min(OUTSTANDING, len(coros)))))
    return results


async def _placement(m, names: list[str]) -> dict[str, list[str]]:
    found = await _in_flight([m.whereis(name) for name in names])
    where: dict[str, list[str]] = {}
    for name, body in zip(names, found):
        where.setdefault(body.get("node"), []).append(name)
    return where


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("turn", "kill"), action="append")
    ap.add_argument("--history", type=int, action="append", metavar="N", help="history lengths (default 10, 1000, 10000)")
    ap.add_argument("--turns", type=int, default=200, help="turns measured per history length")
    ap.add_argument("--agents", type=int, action="append", metavar="K", help="agents on the killed node (default 10, 1000, 10000)")
    ap.add_argument("--trials", type=int, default=3, help="kills per count")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    lines = [f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`", "", *[f"- {line}" for line in machine(load)], ""]
    if not args.only or "turn" in args.only:
        rows = bench_turn(sorted(args.history or [10, 1000, 10000]), args.turns)
        base = rows[0][1]
        lines += ["| history (messages) | turn p50 | turn p99 | p50 / the shortest's |", "| --- | --- | --- | --- |"]
        lines += [f"| {n:,} | {p50:.2f} ms | {p99:.2f} ms | {p50 / base:.2f}× |" for n, p50, p99 in rows]
        lines.append("")
    if not args.only or "kill" in args.only:
        rows = bench_kill(sorted(args.agents or [10, 1000, 10000]), args.trials)
        lines += ["| agents on the killed node | first answer, median | all answered, median [range] |", "| --- | --- | --- |"]
        lines += [f"| {k:,} | {pct(f, 0.5):,.0f} ms | {pct(a, 0.5):,.0f} ms [{min(a):,.0f}–{max(a):,.0f}] |"
                  for k, f, a in rows]
    lines.append(f"- load average (1 min) at end {os.getloadavg()[0]:.2f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
