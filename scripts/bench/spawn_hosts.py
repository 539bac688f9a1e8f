"""Spawn rate on three namespaced hosts, without and with the control plane, in one run.

    sudo python3 scripts/bench/spawn_hosts.py                   # 3,000 spawns, 200 outstanding, 3 rounds
    sudo python3 scripts/bench/spawn_hosts.py --spawns 1000 --rounds 1

Each round starts scripts/netcluster.py's mesh (one node per host, CURVE, replicas = 1)
once with the supervisor on n1 and once with [control] (etcd on every host, the
supervisor elected, its records in etcd), spawns fresh counters with `--outstanding`
spawns in flight, and times them from the first to the last answer. What the consensus
costs is the ratio of the two rates, each a median over the rounds. Root only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(HERE)]

from core import machine, say  # noqa: E402
from netcluster import NetCluster, available  # noqa: E402


async def spawn_all(cluster: NetCluster, n: int, outstanding: int) -> float:
    """Spawns per second of `n` fresh counters, `outstanding` at a time."""
    async with cluster.client() as m:
        names = iter(range(n))
        began = time.monotonic()

        async def worker():
            for i in names:
                await m.spawn(f"s{i}", "counter", timeout=60)
        await asyncio.gather(*(worker() for _ in range(outstanding)))
        return n / (time.monotonic() - began)


def one(control: bool, n: int, outstanding: int) -> float:
    with tempfile.TemporaryDirectory(prefix="mesh-spawns-") as folder:
        with NetCluster(Path(folder), replicas=1, heartbeat_ms=250, liveness=4, control=control,
                        env={**os.environ, "MESH_LOG": "WARNING"}) as c:
            return asyncio.run(spawn_all(c, n, outstanding))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spawns", type=int, default=3000)
    ap.add_argument("--outstanding", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    why = available()
    if why:
        print(f"spawn_hosts: needs network namespaces: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()[0]
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for control in (False, True):
            rate = one(control, args.spawns, args.outstanding)
            rates[control].append(rate)
            say(f"round {r + 1}: {'[control]' if control else 'supervisor on n1'}: {rate:,.0f} spawns/s")
    plain, etcd = statistics.median(rates[False]), statistics.median(rates[True])
    print("\n".join([
        f"Run: `sudo python3 scripts/bench/spawn_hosts.py {' '.join(sys.argv[1:])}`", "",
        *[f"- {line}" for line in machine(load)], "",
        "| mesh | spawns/s, median of rounds (range) |", "| --- | --- |",
        f"| three hosts, supervisor on n1 | {plain:,.0f} ({min(rates[False]):,.0f}–{max(rates[False]):,.0f}) |",
        f"| three hosts, [control] (etcd) | {etcd:,.0f} ({min(rates[True]):,.0f}–{max(rates[True]):,.0f}) |",
        f"| ratio | {etcd / plain:.2f}× |",
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
