"""The local embedding model served by an agent, against calling onnxruntime directly.

    python3 scripts/bench/serving.py            # 3 runs of each figure
    python3 scripts/bench/serving.py --quick    # 1 run, fewer texts
    python3 scripts/bench/serving.py --pool     # only the pool's kill -9 figure
    python3 scripts/bench/serving.py --model mini   # a model of MiniLM's cost per text

Builds the shipped model (scripts/make_model.py) in a temp dir (`--model mini`: the same
with six feed-forward blocks 384 wide, about what MiniLM-L6 costs per text), starts a one-node mesh
(`mesh up`, through core.py's Mesh: every pid it showed is ended on exit), spawns a
`local_embedder` and a `counter` on that node, and measures, in one run:

- direct: `Model.embed` in this process, batches of 64 texts: the floor;
- texts/s through the mesh with 1, 8 and 64 concurrent callers, one text per call;
- the batching gain (64 callers against 1) and the mean batch the agent reports;
- `get` calls to the counter on the same node while 64 callers keep the model busy:
  p50 and p99 (the goal: p99 <= 2 ms), with the callers in this process and, again,
  in a process of their own (so the gets wait for the node, not for the callers' loop),
  then interleaved with the same load on a second embedder whose worker thread runs at
  the loop's priority (`worker_nice` 0), 3 x 1,000 gets each;
- 64 callers each sending 16 texts per call;
- for scale, the rate of plain `get` calls with 64 callers: one text per call can go
  no faster than the mesh's calls;
- a pool: a group of three `local_embedder` members on a three-node mesh, 32 callers
  calling the group; kill -9 of a member's node (not the supervisor's), each trial
  once with idempotent calls and once without: errors the callers saw, the longest
  time with no answer after the kill, and texts/s in the second before and after it.

Needs the `serving` extra. The machine is small and shared: read the figures as the
medians of what this run saw, not as constants.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import core  # noqa: E402  (its Mesh starts and ends a real mesh)

import mesh  # noqa: E402

MODELS = {"tiny": [], "mini": ["--dim", "384", "--layers", "6", "--hidden", "1536"]}  # make_model.py's options
WORDS = ("cat dog rain snow server code bread cheese football tennis guitar piano storm wind laptop soup "
         "the a with and in on of my our").split()


def texts(n: int) -> list[str]:
    """n different texts of 6 to 12 words, the same ones every run."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 7)) for i in range(n)]


def direct(model_dir: Path, items: list[str]) -> float:
    from nodes.local_embedder import Model

    model = Model(model_dir)
    model.embed(items[:64])  # warm
    t0 = time.perf_counter()
    for i in range(0, len(items), 64):
        model.embed(items[i:i + 64])
    return len(items) / (time.perf_counter() - t0)


async def through_mesh(m, items: list[str], callers: int, name: str = "emb") -> float:
    queue = list(items)
    msg = (lambda t: {"text": t}) if name == "emb" else (lambda t: {"op": "get"})

    async def caller():
        while queue:
            await m.call(name, msg(queue.pop()), timeout=30)
    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(items) / (time.perf_counter() - t0)


async def many_per_call(m, items: list[str], callers: int, per_call: int) -> float:
    chunks = [items[i:i + per_call] for i in range(0, len(items), per_call)]

    async def caller():
        while chunks:
            await m.call("emb", {"texts": chunks.pop()}, timeout=30)
    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(items) / (time.perf_counter() - t0)


async def gets_under_load(m, items: list[str], n_gets: int, config: Path, apart: bool,
                          target: str = "emb") -> list[float]:
    """`get` latencies while 64 callers keep the model `target` busy: in this process
    (`apart` False: the callers' own loop work delays the gets too), or in a process of
    their own (what the node does to a `get`, without the load generator's share)."""
    done = asyncio.Event()
    queue = list(items) * 20
    if apart:
        loader = subprocess.Popen([sys.executable, __file__, "--load", str(config), "--target", target], stdout=subprocess.PIPE,
                                  text=True, start_new_session=True)
        try:
            assert loader.stdout.readline().strip() == "loading"
            await asyncio.sleep(0.5)  # the load is under way
            return await _gets(m, n_gets)
        finally:
            loader.terminate()
            loader.wait(10)

    async def loader_task():
        while queue and not done.is_set():
            await m.call(target, {"text": queue.pop()}, timeout=30)
    load = [asyncio.ensure_future(loader_task()) for _ in range(64)]
    await asyncio.sleep(0.2)  # the load is under way
    lat = await _gets(m, n_gets)
    done.set()
    await asyncio.gather(*load)
    return lat


async def _gets(m, n: int) -> list[float]:
    """Latencies, in ms, of `n` sequential gets to the counter c1."""
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await m.call("c1", {"op": "get"})
        lat.append((time.perf_counter() - t0) * 1000)
    return lat


def load_forever(config: str, target: str) -> int:
    """The --load process: 64 callers embed texts with `target` until terminated."""
    items = texts(1000)

    async def go():
        async with mesh.connect(config) as m:
            async def caller(i):
                while True:
                    await m.call(target, {"text": items[i % len(items)]}, timeout=30)
                    i += 64
            print("loading", flush=True)
            await asyncio.gather(*(caller(i) for i in range(64)))
    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    return 0


async def pool_kill(mh, m, items: list[str], idempotent: bool, callers: int = 32) -> dict:
    """One kill -9 of the node of a member of group "pool" while `callers` call it."""
    members = await m.members("pool")
    victim = next(x["node"] for x in members if x["node"] and x["node"] != "n1")
    stop = asyncio.Event()
    done: list[float] = []
    errors: Counter = Counter()

    async def caller(i: int) -> None:
        j = i
        while not stop.is_set():
            try:
                await m.call_group("pool", {"text": items[j % len(items)]}, timeout=10, idempotent=idempotent)
                done.append(time.perf_counter())
            except mesh.CallError as exc:
                errors[type(exc).__name__] += 1
            j += callers
    tasks = [asyncio.ensure_future(caller(i)) for i in range(callers)]
    await asyncio.sleep(1.5)
    mark = mh.mark()
    killed = time.perf_counter()
    os.kill(mh.pids[victim], signal.SIGKILL)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*tasks)
    later = [killed] + sorted(t for t in done if t >= killed)
    gap = max(b - a for a, b in zip(later, later[1:])) if len(later) > 1 else float("inf")
    await asyncio.to_thread(mh.wait_for, rf"node {victim} ready", mark, 30)
    for _ in range(600):  # until the killed member serves again, from wherever it was restarted
        if all(x["status"] == "running" for x in await m.members("pool")):
            break
        await asyncio.sleep(0.05)
    return {"errors": dict(errors), "gap_ms": gap * 1000,
            "before": sum(killed - 1 <= t < killed for t in done), "after": sum(killed < t <= killed + 1 for t in done),
            "inflight": callers}


def pool_figures(model_dir: Path, items: list[str], trials: int) -> None:
    out = {True: [], False: []}
    with core.Mesh(3, {"local_embedder": "nodes.local_embedder:LocalEmbedder"}, label="bench-pool") as mh:
        async def go():
            async with mesh.connect(mh.config) as m:
                await m.spawn_group("pool", "local_embedder", 3, {"model_dir": str(model_dir), "batch_size": 64,
                                                                  "batch_timeout_ms": 2.0, "queue": 1024})
                for x in await m.members("pool"):
                    await m.call(x["name"], {"text": "warm"}, timeout=30)
                for _ in range(trials):
                    for idempotent in (True, False):
                        out[idempotent].append(await pool_kill(mh, m, items, idempotent))
        asyncio.run(go())
    for idempotent, results in out.items():
        errs = Counter()
        for r in results:
            errs.update(r["errors"])
        gaps = sorted(r["gap_ms"] for r in results)
        print(f"pool of 3, kill -9 of a member's node, {'idempotent' if idempotent else 'not idempotent':14s} "
              f"{len(results)} trials: errors {dict(errs) or 0} (32 callers), longest gap after the kill "
              f"p50 {statistics.median(gaps):.0f} ms max {gaps[-1]:.0f} ms, texts/s in the second before/after "
              f"{statistics.median(r['before'] for r in results):.0f}/{statistics.median(r['after'] for r in results):.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pool", action="store_true", help="only the pool's kill -9 figure")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny",
                   help="tiny: the shipped 64-wide model; mini: six feed-forward blocks, MiniLM's cost per text")
    p.add_argument("--load", metavar="CONFIG", help=argparse.SUPPRESS)  # the load process of the gets figure
    p.add_argument("--target", default="emb", help=argparse.SUPPRESS)  # the model it loads
    a = p.parse_args(argv)
    if a.load:
        return load_forever(a.load, a.target)  # ended by SIGTERM's default action
    runs, n = (1, 1000) if a.quick else (3, 3000)
    if a.model == "mini":
        n //= 5  # about 50 times the time per text
    items = texts(n)
    with tempfile.TemporaryDirectory(prefix="mesh-model-") as tmp:
        model_dir = Path(tmp) / "model"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), str(model_dir), *MODELS[a.model]],
                       check=True, capture_output=True, timeout=300)
        if a.pool:
            pool_figures(model_dir, items, runs)
            return 0
        figures: dict[str, list[float]] = {"direct": [], "1": [], "8": [], "64": [], "gets": [], "many": []}
        gets: list[float] = []
        gets_apart: list[float] = []
        gets_apart0: list[float] = []
        with core.Mesh(1, {"local_embedder": "nodes.local_embedder:LocalEmbedder"}) as mh:
            async def go():
                async with mesh.connect(mh.config) as m:
                    await m.spawn("c1", "counter")
                    args = {"model_dir": str(model_dir), "batch_size": 64, "batch_timeout_ms": a.batch_timeout_ms,
                            "queue": 1024}
                    await m.spawn("emb", "local_embedder", args)
                    await m.spawn("emb0", "local_embedder", dict(args, worker_nice=0))  # the model at the loop's priority
                    await m.call("emb", {"text": "warm"}, timeout=30)
                    await m.call("emb0", {"text": "warm"}, timeout=30)
                    for _ in range(runs):
                        figures["direct"].append(direct(model_dir, items))
                        for callers in (1, 8, 64):
                            before = await m.call("emb", {"op": "stats"})
                            figures[str(callers)].append(await through_mesh(m, items, callers))
                            after = await m.call("emb", {"op": "stats"})
                            figures.setdefault(f"batch{callers}", []).append(
                                (after["inputs"] - before["inputs"]) / max(1, after["batches"] - before["batches"]))
                        figures["gets"].append(await through_mesh(m, items, 64, "c1"))
                        figures["many"].append(await many_per_call(m, items * 4, 64, 16))
                        gets.extend(await gets_under_load(m, items, 500, mh.config, False))
                        for _ in range(3):  # interleaved: the worker at nice 10 (the default), then at 0
                            gets_apart.extend(await gets_under_load(m, items, 1000, mh.config, True))
                            gets_apart0.extend(await gets_under_load(m, items, 1000, mh.config, True, "emb0"))
                    figures["stats"] = [await m.call("emb", {"op": "stats"})]
            asyncio.run(go())
        pool_figures(model_dir, items, runs)  # printed first: the rest is summed up below
    stats = figures.pop("stats")[0]
    med = {k: statistics.median(v) for k, v in figures.items()}
    gets.sort()
    print(f"model {a.model}, runs {runs}, {n} texts each; medians; batch_timeout_ms {a.batch_timeout_ms:g}")
    print(f"direct onnxruntime, batches of 64     {med['direct']:9.0f} texts/s")
    for callers in (1, 8, 64):
        print(f"through the mesh, {callers:2d} callers           {med[str(callers)]:9.0f} texts/s"
              f"   mesh/direct {med[str(callers)] / med['direct']:.2f}   mean batch {med[f'batch{callers}']:.1f}")
    print(f"64 callers, 16 texts per call          {med['many']:9.0f} texts/s   mesh/direct {med['many'] / med['direct']:.2f}")
    print(f"for scale: counter gets, 64 callers    {med['gets']:9.0f} calls/s (the mesh's call rate here)")
    print(f"batching gain, 64 callers / 1          {med['64'] / med['1']:9.1f}x")
    print(f"get on the same node under that load   p50 {gets[len(gets) // 2]:.2f} ms, "
          f"p99 {gets[int(len(gets) * 0.99)]:.2f} ms ({len(gets)} calls; the 64 callers in this process)")
    for label, lat in (("the callers in a process of their own", gets_apart),
                       ("the same, the model's worker at nice 0", gets_apart0)):
        lat.sort()
        print(f"  {label:37s} p50 {lat[len(lat) // 2]:.2f} ms, p99 {lat[int(len(lat) * 0.99)]:.2f} ms ({len(lat)} calls)")
    print(f"the agent's stats at the end: queue_ms {stats['queue_ms']}, inference_ms {stats['inference_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
