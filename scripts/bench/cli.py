"""Wall time of the `mesh` command's quick verbs against a local mesh, beside `python -c pass`.

    python3 scripts/bench/cli.py            # 15 runs of each, interleaved
    python3 scripts/bench/cli.py --runs 5

Starts a one-node mesh (`mesh up` through core.py's Mesh: every pid it showed is ended on
exit), spawns a counter, then times, round after round, a new interpreter running each of:
`python -c pass` (the floor: an interpreter's start), `mesh call c1 '{"op": "get"}'`,
`mesh status` and `mesh --help`. Prints medians and each verb's time above the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import core  # noqa: E402

import mesh  # noqa: E402


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-500:]}")
    return took * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15)
    a = p.parse_args(argv)
    py = sys.executable
    with core.Mesh(1) as mh:
        async def spawn():
            async with mesh.connect(mh.config) as m:
                await m.spawn("c1", "counter")
        asyncio.run(spawn())
        env = dict(os.environ, MESH_CONFIG=str(mh.config), PYTHONPATH=str(ROOT))
        verbs = {
            "python -c pass": [py, "-c", "pass"],
            "mesh call": [py, "-m", "mesh.cli", "call", "c1", '{"op": "get"}'],
            "mesh status": [py, "-m", "mesh.cli", "status"],
            "mesh --help": [py, "-m", "mesh.cli", "--help"],
        }
        times: dict[str, list[float]] = {v: [] for v in verbs}
        load = os.getloadavg()[0]
        for _ in range(a.runs):
            for verb, cmd in verbs.items():
                times[verb].append(timed(cmd, env))
    floor = statistics.median(times["python -c pass"])
    print(f"{a.runs} runs each, interleaved; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    for verb, ts in times.items():
        med = statistics.median(ts)
        extra = "" if verb == "python -c pass" else f"   {med - floor:6.0f} ms above the floor"
        print(f"{verb:16s} median {med:6.0f} ms   (min {min(ts):.0f}, max {max(ts):.0f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
