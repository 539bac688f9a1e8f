"""A mesh on three network-namespace hosts: for the multi-host tests, chaos runs and
failover benchmarks (root only).

    with NetCluster(folder, replicas=1) as c:      # keys, config, namespaces, one node per host
        async with c.client() as m: ...
        c.hosts.cut("h2"); c.hosts.heal("h2")
        os.kill(c.pid("n2"), signal.SIGSTOP)

Every host gets one node (n1 on h1 runs the supervisor) under its own `mesh node`
launcher; CURVE is on, with fresh keys in FOLDER/keys and an admin client key. The
namespaces, the processes and everything else are removed when the block ends.
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import hosts as hosts_tool
import meshrun

CONFIG = """
[cluster]
name = "net"
data_dir = "{data}"
secure = true
served_log = true
heartbeat_ms = {heartbeat_ms}
liveness = {liveness}
lease_ms = {lease_ms}
call_timeout_s = 10

[store]
replicas = {replicas}

[security]
keys_dir = "{keys}"

[security.clients.admin]
role = "admin"

[kinds]
counter = "nodes.counter:Counter"
ledger = "nodes.ledger:Ledger"
conversation = "nodes.conversation:ConversationAgent"

{extra}

[hosts.h1]
address = "{net}.1"
[hosts.h2]
address = "{net}.2"
[hosts.h3]
address = "{net}.3"

[nodes.n1]
host = "h1"
port = 7101
[nodes.n2]
host = "h2"
port = 7101
[nodes.n3]
host = "h3"
port = 7101

[supervisor]
node = "n1"
dynamic = "sessions"

[tree.sessions]
dynamic = true
intensity = 1000
period_s = 10
"""

NODES = {"n1": "h1", "n2": "h2", "n3": "h3"}


class NetCluster:
    def __init__(self, folder: Path, replicas: int = 1, heartbeat_ms: int = 100, liveness: int = 8,
                 lease_ms: int = 500, extra: str = "", restarts: dict[str, int] | None = None,
                 env: dict | None = None):
        """`restarts`: launcher restart limit per node (the config's when absent);
        `extra`: more config text (an [llm] table, say)."""
        from mesh.security import create_keypair
        self.folder, self.restarts, self.env = Path(folder), restarts or {}, env
        self.net = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        keys = self.folder / "keys"
        for name in (*NODES, "admin"):
            create_keypair(str(keys), name)
        self.key = str(keys / "admin.key_secret")
        self.data = self.folder / "data"
        self.config = self.folder / "net.toml"
        self.config.write_text(textwrap.dedent(CONFIG.format(
            data=self.data, keys=keys, net=self.net, replicas=replicas, heartbeat_ms=heartbeat_ms,
            liveness=liveness, lease_ms=lease_ms, extra=extra)))
        self.hosts = hosts_tool.Hosts({h: f"{self.net}.{h[1]}" for h in NODES.values()})
        self.runs: dict[str, meshrun.MeshRun] = {}

    @property
    def gateway(self) -> str:
        """The root namespace's address on the hosts' bridge (for servers the hosts use)."""
        return self.hosts.gateway

    def create_hosts(self) -> "NetCluster":
        self.hosts.create()
        return self

    def start(self) -> "NetCluster":
        for node in ("n2", "n3", "n1"):  # the supervisor last: it finds everyone there
            self.start_node(node, "mesh ready" if node == "n1" else f"node {node} ready")
        return self

    def start_node(self, node: str, wait: str | None = None) -> meshrun.MeshRun:
        args = ["node", "-c", str(self.config), node]
        if node in self.restarts:
            args += ["--max-restarts", str(self.restarts[node])]
        old = self.runs.get(node)
        if old is not None:
            old.kill_all()
        run = meshrun.MeshRun(*args, prefix=["ip", "netns", "exec", self.hosts.ns(NODES[node])], env=self.env)
        self.runs[node] = run.start(wait or f"node {node} ready", 60)
        return run

    def pid(self, node: str) -> int:
        return self.runs[node].pids[node]

    def client(self):
        import mesh
        return mesh.connect(self.config, key=self.key)

    def logs(self) -> str:
        return "\n".join(f"--- {node}\n" + "\n".join(run.lines) for node, run in self.runs.items())

    def stop(self) -> None:
        for run in self.runs.values():
            run.stop(timeout=10)
        self.hosts.destroy()

    def __enter__(self) -> "NetCluster":
        try:
            return self.create_hosts().start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        """Stop everything; after an error, keep every node's output, the config and the
        data first (scripts/evidence.py), and say where in the error's message."""
        kept = None
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            import evidence
            kept = {run.keep_evidence(f"{exc_type.__name__}: {exc}", "netcluster") for run in self.runs.values()}
        self.stop()
        for where in sorted(kept or ()):
            evidence.note(exc, where)


def available() -> str | None:
    """Why namespaced hosts cannot be made here, or None."""
    return hosts_tool.available()
