"""Faults, alone or mixed, on a seeded schedule: the chaos suite's nemesis.

    kill        kill -9 of a random node (its launcher restarts it)
    stop        SIGSTOP of a random node for a while, then SIGCONT
    supervisor  kill -9 of the supervisor's node
    llm         the model API fails half its requests and slows down
    disk        the data directory runs out of space, then gets it back
    cut         a host cut off from everyone, then healed            (hosts only)
    loss        a host drops a third of its packets, both ways       (hosts only)
    host        every process of a host killed, then the host back   (hosts only)

Every fault is written to the history when it starts and when it heals.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

ONE_HOST = ("kill", "stop", "supervisor", "llm", "disk")
HOSTS = ONE_HOST + ("cut", "loss", "host")


class Nemesis:
    def __init__(self, env, faults: list[str], seed: int, history, interval: tuple[float, float] = (1.5, 4.0),
                 duration: tuple[float, float] = (0.5, 2.5), concurrent: int = 1):
        self.env, self.faults, self.history = env, faults, history
        self.rng = random.Random(seed)
        self.interval, self.duration = interval, duration
        self.slots = asyncio.Semaphore(concurrent)
        self.injected = 0
        self._active: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.interval))
                break
            except asyncio.TimeoutError:
                pass
            fault = self.rng.choice(self.faults)
            await self.slots.acquire()
            task = asyncio.ensure_future(self._one(fault, self.rng.uniform(*self.duration)))
            self._active.add(task)
            task.add_done_callback(self._active.discard)
        await asyncio.gather(*self._active, return_exceptions=True)

    async def _one(self, fault: str, duration: float) -> None:
        try:
            target = await getattr(self, f"_{fault}")(duration)
            self.injected += 1
        except Exception as exc:  # a fault that could not be made is recorded, not fatal
            self.history.write(e="note", text=f"fault {fault} not injected: {exc}")
        finally:
            self.slots.release()

    def _note(self, fault: str, target: str, phase: str = "start") -> None:
        self.history.write(e="fault" if phase == "start" else "heal", fault=fault, target=target)

    async def _kill(self, duration: float) -> str:
        node = self.rng.choice(self.env.node_names())
        self._note("kill", node)
        self.env.signal_node(node, signal.SIGKILL)
        return node

    async def _supervisor(self, duration: float) -> str:
        node = self.env.supervisor_node
        self._note("supervisor", node)
        self.env.signal_node(node, signal.SIGKILL)
        return node

    async def _stop(self, duration: float) -> str:
        node = self.rng.choice(self.env.node_names())
        self._note("stop", node)
        pid = self.env.signal_node(node, signal.SIGSTOP)
        await asyncio.sleep(duration)
        if pid:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._note("stop", node, "heal")
        return node

    async def _llm(self, duration: float) -> str:
        self._note("llm", "model API")
        self.env.standin.faults(error_rate=0.5, latency_ms=200)
        await asyncio.sleep(duration)
        self.env.standin.faults(error_rate=0, latency_ms=0)
        self._note("llm", "model API", "heal")
        return "model API"

    async def _disk(self, duration: float) -> str:
        folder = self.env.disk_dir
        if folder is None:
            raise RuntimeError("the data directory is not on a space-limited mount")
        self._note("disk", str(folder))
        filler = Path(folder) / "filler"
        with open(filler, "wb") as f:
            block = b"\0" * (1 << 20)
            try:
                while True:
                    f.write(block)
            except OSError:
                pass  # full
        await asyncio.sleep(duration)
        filler.unlink()
        self._note("disk", str(folder), "heal")
        return str(folder)

    def _hosts(self):
        if self.env.hosts is None:
            raise RuntimeError("this fault needs hosts (run with --hosts)")
        return self.env.hosts

    async def _cut(self, duration: float) -> str:
        hosts = self._hosts()
        host = self.rng.choice(list(hosts.hosts))
        self._note("cut", host)
        hosts.cut(host)
        await asyncio.sleep(duration)
        hosts.heal(host)
        self._note("cut", host, "heal")
        return host

    async def _loss(self, duration: float) -> str:
        hosts = self._hosts()
        host = self.rng.choice(list(hosts.hosts))
        self._note("loss", host)
        hosts.loss(host, 33)
        await asyncio.sleep(duration)
        hosts.loss(host, 0)
        self._note("loss", host, "heal")
        return host

    async def _host(self, duration: float) -> str:
        hosts = self._hosts()
        host = self.rng.choice([h for h in hosts.hosts if h != self.env.supervisor_host] or list(hosts.hosts))
        self._note("host", host)
        hosts.kill(host)
        await asyncio.sleep(duration)
        self.env.restart_host(host)
        self._note("host", host, "heal")
        return host
