"""The chaos workload: concurrent clients appending, adding and talking, with a record.

Each client task picks an agent, invokes one operation with a fresh request id, and
retries it with the same id after any error or timeout until it is acknowledged (or
the run is over). A client waits a short while (`patience`) for each operation; one
still unanswered then goes on by itself while the client works on other agents, so an
agent that is stuck delays only the operations on it. Every invocation, every failed
attempt and every acknowledgement is written to the history with its time; the checker
reads nothing else.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

from mesh.errors import CallError


class History:
    """An append-only JSONL file, flushed line by line (a killed run keeps what it wrote)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def write(self, **event) -> None:
        event.setdefault("t", time.time())
        self.f.write(json.dumps(event, default=str) + "\n")

    def close(self) -> None:
        self.f.close()


class Workload:
    def __init__(self, client, history: History, agents: dict[str, str], clients: int, seed: int,
                 call_timeout: float = 3.0, patience: float = 0.25):
        """agents: name -> "ledger" | "counter" | "conversation".

        A client waits `patience` seconds for an operation; one still unanswered by then
        goes on (retrying) on its own, and the client carries on with other agents. It
        never has two operations in flight on one agent, so a stuck agent holds at most
        one operation per client and never the client itself.
        """
        self.client, self.history, self.agents = client, history, agents
        self.clients, self.rng, self.call_timeout = clients, random.Random(seed), call_timeout
        self.patience = patience
        self.counts = {"ok": 0, "retried": 0, "pending": 0}
        self._n = 0

    async def run(self, stop: asyncio.Event, settle_s: float) -> None:
        """Run until `stop`; then give operations in flight `settle_s` to be acknowledged."""
        tasks = [asyncio.ensure_future(self._client(i, stop, settle_s)) for i in range(self.clients)]
        await asyncio.gather(*tasks)

    async def _client(self, i: int, stop: asyncio.Event, settle_s: float) -> None:
        rng = random.Random(self.rng.random())
        names = sorted(self.agents)
        waiting: dict[str, asyncio.Task] = {}  # agent -> this client's operation on it, still in flight
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                free = [n for n in names if n not in waiting]
                if not free:  # every agent holds one of ours: wait for any to finish
                    await asyncio.wait([*waiting.values(), stopped],
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                name = rng.choice(free)
                task = asyncio.ensure_future(self._operation(f"c{i}", name, self.agents[name], stop, settle_s))
                waiting[name] = task
                task.add_done_callback(lambda t, name=name: waiting.pop(name) if waiting.get(name) is t else None)
                await asyncio.wait([task], timeout=self.patience)
            await asyncio.gather(*waiting.values())
        finally:
            stopped.cancel()
            for task in list(waiting.values()):
                task.cancel()

    async def _operation(self, client: str, name: str, kind: str, stop: asyncio.Event, settle_s: float) -> None:
        self._n += 1
        op = f"{client}-{self._n}"
        if kind == "ledger":
            verb, value, msg = "append", op, {"op": "append", "value": op}
        elif kind == "counter":
            verb, value, msg = "add", 1, {"op": "add", "n": 1}
        else:
            verb, value = "say", f"{op}: my name is {client}."
            msg = {"op": "say", "text": value}
        self.history.write(e="invoke", op=op, agent=name, kind=verb, value=value)
        give_up = None
        while True:
            try:
                result = await self.client.call(name, msg, timeout=self.call_timeout, request_id=op)
            except CallError as err:
                self.history.write(e="fail", op=op, error=f"{type(err).__name__}: {err}"[:200])
                self.counts["retried"] += 1
                if stop.is_set():
                    give_up = give_up or time.monotonic() + settle_s
                    if time.monotonic() > give_up:
                        self.counts["pending"] += 1
                        return
                await asyncio.sleep(0.05)  # back off a little before the same id again
                continue
            self.history.write(e="ok", op=op, result=result)
            self.counts["ok"] += 1
            return

    async def final_states(self) -> dict:
        """Every agent's state after the run, read with retries (faults are healed by now)."""
        out = {}
        for name, kind in sorted(self.agents.items()):
            msg = {"ledger": {"op": "read"}, "counter": {"op": "get"}, "conversation": {"op": "history"}}[kind]
            for _ in range(20):
                try:
                    out[name] = await self.client.call(name, msg, timeout=5)
                    break
                except CallError:
                    await asyncio.sleep(0.5)
        return out
