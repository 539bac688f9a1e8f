"""Nodes of one config on an in-memory network with a fake clock, in one loop.

Real LMDB (one store per host, shared by that host's nodes, as on a real host), real
runners and supervisor; only sockets and time are stand-ins, so node logic is tested
deterministically. Waits are on events and futures, bounded by the test's timeout.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from mesh import config as config_mod
from mesh.client import Client
from mesh.clock import FakeClock
from mesh.network import MemoryNetwork
from mesh.node import Node
from mesh.store import Store
from mesh.supervisor import SupervisorRole

BASE = """
[cluster]
heartbeat_ms = 100
liveness = 4
lease_ms = 300
call_timeout_s = 5
handler_timeout_s = 10

[limits]
mailbox = {mailbox}
dedup_window = 8
{limits}

[kinds]
counter = "nodes.counter:Counter"
ledger = "nodes.ledger:Ledger"
waiter = "kinds:Waiter"
relay = "kinds:Relay"
lifecycle = "kinds:Lifecycle"
whoami = "kinds:Whoami"
stamper = "kinds:Stamper"
intkeys = "kinds:IntKeys"
failsinit = "kinds:FailsInit"
notagent = "kinds:NotAnAgent"
missing = "kinds_that_do_not_exist:Nothing"
spawner = "kinds:Spawner"
flaky = "kinds:Flaky"
doubler = "kinds:Doubler"
stepper = "kinds:Stepper"
peeker = "kinds:Peeker"

[hosts.h1]
address = "127.0.0.1"

[nodes.n1]
host = "h1"
port = 1

[nodes.n2]
host = "h1"
port = 2

[nodes.n3]
host = "h1"
port = 3

[supervisor]
node = "n1"
dynamic = "sessions"

[tree.sessions]
dynamic = true
intensity = 3
period_s = 10
"""


def make_config(tmp_path: Path, extra: str = "", mailbox: int = 100, limits: str = "") -> config_mod.Config:
    path = tmp_path / "cluster.toml"
    path.write_text(textwrap.dedent(BASE.format(mailbox=mailbox, limits=limits)) + textwrap.dedent(extra))
    return config_mod.load(path)


class Cluster:
    def __init__(self, cfg: config_mod.Config, tmp_path: Path):
        self.cfg, self.tmp = cfg, tmp_path
        self.clock = FakeClock()
        self.net = MemoryNetwork(self.clock)
        self.stores = {h: Store(str(tmp_path / h), sync=False) for h in cfg.hosts}
        self.nodes: dict[str, Node] = {}
        self.role: SupervisorRole | None = None
        self.clients: list[Client] = []

    async def start(self, *names: str) -> None:
        for name in names or self.cfg.nodes:
            await self.start_node(name)
        if self.role is not None:
            await self.role.ready_event.wait()

    async def start_node(self, name: str, previous: dict | None = None) -> Node:
        spec = self.cfg.nodes[name]
        node = Node(self.cfg, name, self.net, self.clock, store=self.stores[spec.host],
                    inline_commit=True, previous=previous)
        await node.start()
        self.nodes[name] = node
        if name == self.cfg.supervisor_node:
            self.role = SupervisorRole(node)
        return node

    def kill(self, name: str) -> dict:
        """Like kill -9: the node vanishes without a word; returns its `previous` record."""
        node = self.nodes.pop(name)
        node.abandon()
        node.committer = _Dead()  # and its store takes nothing more from it
        return {"boot": node.boot, "exit": -9}

    def freeze(self, name: str) -> None:
        """Stop a node as SIGSTOP does: its timers stop and nothing reaches it."""
        node = self.nodes[name]
        self.net.freeze(node.endpoint)
        node.pause()

    def thaw(self, name: str) -> None:
        """SIGCONT: its overdue heartbeat runs at once, then what was sent to it arrives."""
        node = self.nodes[name]
        node.resume()
        self.net.thaw(node.endpoint)

    def fill_disk(self, host: str) -> None:
        """The disk under `host`'s store is full: every commit there fails as ENOSPC does
        (the store's own translation makes it a disk-full StoreError), reads still work."""
        import lmdb

        def full(batch):
            raise lmdb.DiskError("No space left on device")
        self.stores[host]._write_once = full

    def free_disk(self, host: str) -> None:
        """The disk under `host`'s store has room again."""
        self.stores[host].__dict__.pop("_write_once", None)

    async def restart(self, name: str) -> Node:
        previous = self.kill(name)
        return await self.start_node(name, previous)

    def client(self) -> Client:
        c = Client(self.cfg, network=self.net, clock=self.clock, name="client:test")
        self.clients.append(c)
        return c

    async def settle(self, rounds: int = 20) -> None:
        """Let the loop run until no frame is in flight for several turns in a row."""
        quiet = 0
        while quiet < rounds:
            await asyncio.sleep(0)
            quiet = quiet + 1 if self.net.in_flight == 0 else 0

    async def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move the fake clock in steps, letting the loop run after each."""
        t = 0.0
        while t < seconds - 1e-9:
            self.clock.advance(min(step, seconds - t))
            t += step
            await self.settle()

    async def run(self, coro, limit_s: float = 10.0, step: float = 0.05):
        """Await `coro` while time passes (a call that must wait for a recheck or a move)."""
        task = asyncio.ensure_future(coro)
        waited = 0.0
        while not task.done():
            if waited >= limit_s:
                task.cancel()
                raise TimeoutError(f"not done after {limit_s} s of fake time")
            await self.advance(step, step)
            waited += step
        return task.result()

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        sup = self.cfg.supervisor_node  # last, so the others' goodbyes get an answer
        for node in sorted(self.nodes.values(), key=lambda n: n.name == sup):
            await node.shutdown()
        for store in self.stores.values():
            store.close()


class _Dead:
    def submit(self, batch, done):
        pass

    def close(self):
        pass


class GatedCommitter:
    """Holds every batch until the test releases it (shows what waits for a commit), or
    fails them as a full disk would."""

    def __init__(self, store):
        self.store, self.held = store, []

    def submit(self, batch, done):
        self.held.append((batch, done))

    def release(self, fail: bool = False):
        from mesh.errors import StoreError
        from mesh.store import Outcome
        held, self.held = self.held, []
        for batch, done in held:
            if fail:
                err = StoreError("commit failed: disk full (No space left on device)")
                err.disk_full = True
                done(Outcome(error=err))
            else:
                done(self.store.write(batch))

    def close(self):
        pass
