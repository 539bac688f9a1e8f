#!/usr/bin/env python3
"""What a peer flooding a node with cheap calls does to another peer's latency.

    python3 scripts/bench/flood.py [--seconds 3] [--connections 10] [--rate 0] [--batch 1]

Starts a one-node mesh, measures an honest client's `get` round trip quietly, then while
a flooder (one key, --connections connections, a process of its own) sends cheap
calls as fast as it can: to another agent, and to the agent the honest client calls.
With --rate the node's per-peer rate limit is set (limits.peer_rate, and a burst of a
tenth of it). With --batch N the flooder sends its calls N to a BATCH frame, as the
client library does with the calls of one loop turn. Everything it starts is ended on exit; it prints a small table.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import Mesh, pct, say  # noqa: E402

import mesh  # noqa: E402
from mesh import wire  # noqa: E402
from mesh.config import load  # noqa: E402


def flood(endpoint: str, target: str, inc: int, connections: int, batch: int, stop, sent) -> None:
    """The flooder, in a process of its own (in this one it would share the GIL with the
    honest client and measure that instead)."""
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(connections):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(endpoint)
            socks.append(s)
        n = 0
        while not stop.is_set():
            for s in socks:
                try:
                    calls = [wire.encode(wire.Kind.CALL, f"flood-{n + i}", target, None, 5000, {"op": "get"},
                                         {"inc": inc}) for i in range(batch)]
                    s.send(calls[0] if batch == 1 else wire.batch_frame(calls), zmq.NOBLOCK)
                    n += batch
                except zmq.Again:
                    pass
                while s.poll(0):
                    s.recv()
        sent.value = n
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


async def honest(config: Path, name: str, seconds: float) -> list[float]:
    out = []
    async with mesh.connect(config) as m:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            t = time.perf_counter()
            await m.call(name, {"op": "get"}, timeout=10)
            out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each measurement (default 3)")
    ap.add_argument("--connections", type=int, default=10, help="the flooder's connections (default 10)")
    ap.add_argument("--rate", type=float, default=0.0, help="limits.peer_rate for the mesh (default: the config's)")
    ap.add_argument("--batch", type=int, default=1, help="the flooder's calls per frame (default 1)")
    args = ap.parse_args()
    if args.rate:
        Mesh.limits = f"[limits]\npeer_rate = {args.rate}\npeer_burst = {max(1.0, args.rate / 10)}\n"
    rows = []
    with Mesh(1) as m:
        async def setup():
            async with mesh.connect(m.config) as c:
                return {name: (await c.spawn(name, "counter"))["incarnation"] for name in ("busy", "quiet")}
        incarnations = asyncio.run(setup())
        endpoint = load(m.config).nodes["n1"].endpoint
        lat = asyncio.run(honest(m.config, "quiet", args.seconds))
        rows.append(("no flood", lat, 0))
        for target, label in (("busy", "flood to another agent"), ("quiet", "flood to the same agent")):
            ctx = multiprocessing.get_context("spawn")
            stop, sent = ctx.Event(), ctx.Value("q", 0)
            flooder = ctx.Process(target=flood, args=(endpoint, target, incarnations[target], args.connections, args.batch, stop, sent), daemon=True)
            flooder.start()
            try:
                time.sleep(0.5)  # let the flood build up before measuring
                lat = asyncio.run(honest(m.config, "quiet", args.seconds))
            finally:
                stop.set()
                flooder.join(10)
                if flooder.is_alive():
                    flooder.kill()
                    flooder.join()
            rows.append((label, lat, sent.value))
    print(f"honest `get` round trip, ms ({args.connections} flood connections, {args.batch} calls a frame, "
          f"peer_rate {args.rate or 'default'}):")
    print("| case | calls | p50 | p99 | flood calls sent |\n| --- | --- | --- | --- | --- |")
    for label, lat, sent in rows:
        print(f"| {label} | {len(lat)} | {pct(lat, 0.5):.2f} | {pct(lat, 0.99):.2f} | {sent:,} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
