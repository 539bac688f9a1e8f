"""The chaos workload: concurrent clients appending, adding and talking, with a record.

Each client task picks an agent, invokes one operation with a fresh request id, and
retries it with the same id after any error or timeout until it is acknowledged (or
the run is over). A client waits a short while (`patience`) for each operation; one
still unanswered then goes on by itself while the client works on other agents, so an
agent that is stuck delays only the operations on it. Every invocation, every failed
attempt and every acknowledgement is written to the history with its time; the checker
reads nothing else.

It also does what users do besides calling (issue 12):

- crashes agents on purpose (`{"op": "crash"}` to a ledger or counter, now and then):
  the answer is AgentCrashed, never an acknowledged effect, and calls in the same
  batch are answered AgentCrashed too and retried;
- shares request ids across callers: now and then a second client (its own connection)
  sends a different append under the request id of another client's append, at the
  same time: one of the two must be refused with BadRequest ("different request") and
  the other acknowledged, never one answered with the other's reply; or it repeats the
  other's exact request (same id, same body) once that is acknowledged, and must get
  the same reply;
- stops and re-spawns names: each `lifecycle` agent lives in eras. An era begins with a
  spawn and a read that must find nothing (a new incarnation starts from nothing), then
  a burst of concurrent appends or adds (more than the reply window `dedup_window`),
  each retried until acknowledged; then a read of the era's final state, sometimes a
  crash, and at once a stop (racing the restart), retried until it answers stopped.
  Spawns, reads and stops are lines of the history, with the era they belong to.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

from mesh.errors import AgentCrashed, AlreadyExists, BadRequest, CallError, NoSuchAgent


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
                 call_timeout: float = 3.0, patience: float = 0.25, rival=None,
                 lifecycle: dict[str, str] | None = None, crash_rate: float = 0.01, share_rate: float = 0.03,
                 burst: int = 24, era_s: tuple[float, float] = (1.0, 4.0)):
        """agents: name -> "ledger" | "counter" | "conversation".

        A client waits `patience` seconds for an operation; one still unanswered by then
        goes on (retrying) on its own, and the client carries on with other agents. It
        never has two operations in flight on one agent, so a stuck agent holds at most
        one operation per client and never the client itself.

        `rival`: a second client (its own connection) for requests that share an id with
        another client's (`share_rate` of ledger appends); `crash_rate` of ledger and
        counter operations are crashes; `lifecycle`: name -> "ledger" | "counter", agents
        this workload spawns, fills with bursts of `burst` concurrent operations (one
        every half second for `era_s` seconds, drawn), stops and spawns again (the caller
        does not spawn them).
        """
        self.client, self.history, self.agents = client, history, agents
        self.clients, self.rng, self.call_timeout = clients, random.Random(seed), call_timeout
        self.patience, self.rival = patience, rival
        self.lifecycle = dict(lifecycle or {})
        self.crash_rate, self.share_rate, self.burst, self.era_s = crash_rate, share_rate, burst, era_s
        self.counts = {"ok": 0, "retried": 0, "pending": 0, "refused": 0, "crashes": 0, "shared": 0, "eras": 0}
        self._n = 0

    async def run(self, stop: asyncio.Event, settle_s: float) -> None:
        """Run until `stop`; then give operations in flight `settle_s` to be acknowledged."""
        tasks = [asyncio.ensure_future(self._client(i, stop, settle_s)) for i in range(self.clients)]
        tasks += [asyncio.ensure_future(self._lifecycle(name, kind, stop, settle_s))
                  for name, kind in sorted(self.lifecycle.items())]
        await asyncio.gather(*tasks)

    def _new_op(self, client: str) -> str:
        self._n += 1
        return f"{client}-{self._n}"

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
                kind = self.agents[name]
                draw = rng.random()
                if kind in ("ledger", "counter") and draw < self.crash_rate:
                    work = self._crash(f"c{i}", name)
                elif kind == "ledger" and self.rival is not None and draw < self.crash_rate + self.share_rate:
                    work = self._shared(f"c{i}", name, stop, settle_s, same=rng.random() < 0.5)
                else:
                    work = self._operation(f"c{i}", name, kind, stop, settle_s)
                task = asyncio.ensure_future(work)
                waiting[name] = task
                task.add_done_callback(lambda t, name=name: waiting.pop(name) if waiting.get(name) is t else None)
                await asyncio.wait([task], timeout=self.patience)
            await asyncio.gather(*waiting.values())
        finally:
            stopped.cancel()
            for task in list(waiting.values()):
                task.cancel()

    def _message(self, op: str, client: str, kind: str) -> tuple[str, object, dict]:
        if kind == "ledger":
            return "append", op, {"op": "append", "value": op}
        if kind == "counter":
            return "add", 1, {"op": "add", "n": 1}
        value = f"{op}: my name is {client}."
        return "say", value, {"op": "say", "text": value}

    async def _operation(self, client: str, name: str, kind: str, stop: asyncio.Event, settle_s: float,
                         era: int | None = None, op: str | None = None, rid: str | None = None,
                         value=None, via=None) -> object:
        """One operation, retried with its request id until acknowledged, refused or given up.
        Returns its result (None if it was not acknowledged)."""
        op = op or self._new_op(client)
        verb, own, msg = self._message(op, client, kind)
        if value is not None:  # a request that shares its id (and maybe its body) with another
            own = value
            msg = {"op": "append", "value": value}
        extra = {}
        if era is not None:
            extra["era"] = era
        if rid is not None:
            extra["rid"] = rid
        self.history.write(e="invoke", op=op, agent=name, kind=verb, value=own, **extra)
        give_up = None
        via = via or self.client
        while True:
            try:
                result = await via.call(name, msg, timeout=self.call_timeout, request_id=rid or op)
            except BadRequest as err:  # final: the same id was used for another request
                self.history.write(e="refused", op=op, error=f"{type(err).__name__}: {err}"[:300])
                self.counts["refused"] += 1
                return None
            except CallError as err:
                self.history.write(e="fail", op=op, error=f"{type(err).__name__}: {err}"[:200])
                self.counts["retried"] += 1
                if stop.is_set():
                    give_up = give_up or time.monotonic() + settle_s
                    if time.monotonic() > give_up:
                        self.counts["pending"] += 1
                        return None
                await asyncio.sleep(0.05)  # back off a little before the same id again
                continue
            self.history.write(e="ok", op=op, result=result)
            self.counts["ok"] += 1
            return result

    async def _crash(self, client: str, name: str, era: int | None = None) -> None:
        """Crash the agent on purpose, once: AgentCrashed is the expected answer."""
        op = self._new_op(client)
        self.history.write(e="invoke", op=op, agent=name, kind="crash", value=None,
                           **({"era": era} if era is not None else {}))
        self.counts["crashes"] += 1
        try:
            result = await self.client.call(name, {"op": "crash"}, timeout=self.call_timeout, request_id=op)
        except AgentCrashed as err:
            self.history.write(e="crashed", op=op, error=f"{err}"[:200])
            return
        except CallError as err:  # not retried: a crash is no effect to deliver
            self.history.write(e="fail", op=op, error=f"{type(err).__name__}: {err}"[:200])
            return
        self.history.write(e="ok", op=op, result=result)

    async def _shared(self, client: str, name: str, stop: asyncio.Event, settle_s: float, same: bool) -> None:
        """Two callers, one request id. Different bodies: both at once, one must be refused.
        The same body: the repeat after the first is acknowledged, and it gets the same reply."""
        self.counts["shared"] += 1
        op = self._new_op(client)
        other = "r" + self._new_op(client)[1:]  # the rival's own operation
        first = self._operation(client, name, "ledger", stop, settle_s, op=op)
        if same:
            if await first is not None:
                await self._operation(client, name, "ledger", stop, settle_s, op=other, rid=op, value=op,
                                      via=self.rival)
            return
        second = self._operation(client, name, "ledger", stop, settle_s, op=other, rid=op, value=other,
                                 via=self.rival)
        await asyncio.gather(first, second)

    # --- names that are stopped and spawned again ----------------------------------------------

    async def _retrying(self, what, stop: asyncio.Event, settle_s: float):
        """Await what() until it returns, retrying CallErrors (given up `settle_s` after stop)."""
        give_up = None
        while True:
            try:
                return await what()
            except CallError as err:
                self.history.write(e="note", text=f"{getattr(what, '__name__', 'call')}: "
                                                  f"{type(err).__name__}: {err}"[:200])
                if stop.is_set():
                    give_up = give_up or time.monotonic() + settle_s
                    if time.monotonic() > give_up:
                        raise
                await asyncio.sleep(0.1)

    async def _lifecycle(self, name: str, kind: str, stop: asyncio.Event, settle_s: float) -> None:
        rng = random.Random(self.rng.random())
        read = {"ledger": {"op": "read"}, "counter": {"op": "get"}}[kind]
        era = 0
        try:
            while True:
                async def spawn():
                    try:
                        return await self.client.spawn(name, kind)
                    except AlreadyExists as err:  # an earlier attempt's answer was lost
                        return {"exists": str(err)[:200]}
                async def fresh():
                    try:
                        return await self.client.call(name, read, timeout=self.call_timeout)
                    except NoSuchAgent:  # "exists already" came from a spawn that then failed
                        return NoSuchAgent
                while True:
                    self.history.write(e="spawn", agent=name, era=era, kind=kind,
                                       result=await self._retrying(spawn, stop, settle_s))
                    state = await self._retrying(fresh, stop, settle_s)
                    if state is not NoSuchAgent:
                        break
                    self.history.write(e="note", text=f"{name} era {era}: not there after its spawn; spawned again")
                self.counts["eras"] += 1
                self.history.write(e="fresh", agent=name, era=era, state=state)
                if stop.is_set():
                    return
                ends = time.monotonic() + rng.uniform(*self.era_s)
                while True:
                    ops = [self._operation("life", name, kind, stop, settle_s, era=era) for _ in range(self.burst)]
                    if rng.random() < 0.2:  # a crash amid the burst: its batch-mates are answered AgentCrashed
                        ops.append(self._crash("life", name, era=era))
                    await asyncio.gather(*ops)
                    if stop.is_set():
                        return  # the last era's state is read after the run (final.json)
                    if time.monotonic() >= ends:
                        break
                    try:  # the pace of the bursts, not a wait for anything
                        await asyncio.wait_for(stop.wait(), min(0.5, max(0.0, ends - time.monotonic())))
                    except asyncio.TimeoutError:
                        pass
                state = await self._retrying(lambda: self.client.call(name, read, timeout=self.call_timeout),
                                             stop, settle_s)
                self.history.write(e="era", agent=name, era=era, state=state)
                if rng.random() < 0.5:  # a crash, and the stop at once: it races the restart
                    await self._crash("life", name, era=era)
                async def stop_it():
                    try:
                        return await self.client.stop(name)
                    except NoSuchAgent as err:  # a repeat of a stop that was done (its answer was lost)
                        return {"name": name, "gone": str(err)[:200]}
                while True:
                    result = await self._retrying(stop_it, stop, settle_s)
                    self.history.write(e="stop", agent=name, era=era, result=result)
                    if isinstance(result, dict) and result.get("gone"):
                        break
                    if isinstance(result, dict) and result.get("stopped"):
                        break
                    await asyncio.sleep(0.1)
                era += 1
        except CallError as err:  # given up after the run
            self.history.write(e="note", text=f"lifecycle {name} era {era} given up: {err}"[:200])

    async def final_states(self) -> dict:
        """Every agent's state after the run, read with retries (faults are healed by now)."""
        out = {}
        for name, kind in sorted({**self.agents, **self.lifecycle}.items()):
            msg = {"ledger": {"op": "read"}, "counter": {"op": "get"}, "conversation": {"op": "history"}}[kind]
            for _ in range(20):
                try:
                    out[name] = await self.client.call(name, msg, timeout=5)
                    break
                except CallError:
                    await asyncio.sleep(0.5)
        return out
