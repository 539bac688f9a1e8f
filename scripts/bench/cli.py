"""Wall time of the `mesh` command's quick verbs against a local mesh, beside `python -c pass`.

    python3 scripts/bench/cli.py            # 15 runs of each, interleaved
    python3 scripts/bench/cli.py --runs 5
    python3 scripts/bench/cli.py --baseline DIR   # also the CLI of another checkout, same mesh

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


def timed(argv: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-500:]}")
    return took * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--baseline", metavar="DIR", help="a checkout whose CLI is timed too, against the same mesh")
    a = p.parse_args(argv)
    py = sys.executable
    with core.Mesh(1) as mh:
        async def spawn():
            async with mesh.connect(mh.config) as m:
                await m.spawn("c1", "counter")
        asyncio.run(spawn())
        sides = {"": ROOT} | ({"baseline ": Path(a.baseline).resolve()} if a.baseline else {})
        verbs = {"python -c pass": ([py, "-c", "pass"], ROOT)}
        for side, where in sides.items():
            verbs |= {f"{side}mesh call": ([py, "-m", "mesh.cli", "call", "c1", '{"op": "get"}'], where),
                      f"{side}mesh status": ([py, "-m", "mesh.cli", "status"], where),
                      f"{side}mesh --help": ([py, "-m", "mesh.cli", "--help"], where)}
        times: dict[str, list[float]] = {v: [] for v in verbs}
        load = os.getloadavg()[0]
        for _ in range(a.runs):
            for verb, (cmd, where) in verbs.items():
                env = dict(os.environ, MESH_CONFIG=str(mh.config), PYTHONPATH=str(where))
                times[verb].append(timed(cmd, env, where))
    floor = statistics.median(times["python -c pass"])
    print(f"{a.runs} runs each, interleaved; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")
    for verb, ts in times.items():
        med = statistics.median(ts)
        extra = "" if verb == "python -c pass" else f"   {med - floor:6.0f} ms above the floor"
        print(f"{verb:25s} median {med:6.0f} ms   (min {min(ts):.0f}, max {max(ts):.0f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
