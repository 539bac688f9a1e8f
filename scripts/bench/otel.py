"""What OpenTelemetry tracing costs a call, side by side with tracing off, in one run.

    python3 scripts/bench/otel.py              # 5 rounds of 2,000 calls each way
    python3 scripts/bench/otel.py --rounds 3

Three nodes in this process on the in-memory network (tests/harness.py: real nodes,
runners, supervisor and LMDB; no sockets), one client; rounds alternate between
tracing off and on (the SDK with a BatchSpanProcessor, as a node sets it up, into an
in-memory exporter emptied after each round), each round a run of sequential `get`
calls and one of durable `add` calls to a counter on another node. Without sockets a
call costs less than over ZeroMQ, so the ratio here is an upper bound of tracing's
share. Needs the `otel` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import Cluster, make_config  # noqa: E402

from mesh import otel  # noqa: E402


async def run(rounds: int, calls: int) -> dict[str, dict[str, list[float]]]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))  # as a node process sets it up
    out = {side: {"get": [], "add": []} for side in ("off", "on")}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-otel-") as tmp:
        c = Cluster(make_config(Path(tmp)), Path(tmp))
        await c.start()
        m = c.client()
        try:
            for i in range(10):  # a counter off the client's first node: a call crosses nodes
                name = f"c{i}"
                if (await m.spawn(name, "counter"))["node"] != "n1":
                    break
            for _ in range(rounds):
                for side in ("off", "on"):
                    otel.use(provider) if side == "on" else otel.stop()
                    for op, msg in (("get", {"op": "get"}), ("add", {"op": "add", "n": 1})):
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            await m.call(name, msg)
                        out[side][op].append((time.perf_counter() - t0) / calls * 1e6)
                    exporter.clear()
        finally:
            otel.stop()
            await c.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args(argv)
    load = os.getloadavg()[0]
    out = asyncio.run(run(a.rounds, a.calls))
    print(f"{a.rounds} rounds of {a.calls:,} sequential calls each way; load average {load:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; medians, µs per call")
    for op in ("get", "add"):
        off, on = statistics.median(out["off"][op]), statistics.median(out["on"][op])
        print(f"{op:4s} tracing off {off:7.1f} µs   on {on:7.1f} µs   on/off {on / off:.2f}x   (+{on - off:.1f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
