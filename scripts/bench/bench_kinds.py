"""Agent kinds only the benchmarks use (their meshes put this folder on the nodes' path)."""

import time

from mesh import Agent


class Pinger(Agent):
    """call {"op": "ping", "target": NAME, "n": N} -> per-call times (µs) of N sequential
    `get` calls from this agent to NAME: a call between two agents, measured where it is made."""

    read_ops = frozenset({"ping"})

    async def handle_call(self, msg, ctx):
        target, body, times = msg["target"], {"op": "get"}, []
        for _ in range(int(msg["n"])):
            t = time.perf_counter()
            await self.call(target, body)
            times.append((time.perf_counter() - t) * 1e6)
        return times
