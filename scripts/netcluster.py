"""A mesh on three network-namespace hosts: for the multi-host tests, chaos runs and
failover benchmarks (root only).

    with NetCluster(folder, replicas=1) as c:      # keys, config, namespaces, one node per host
        async with c.client() as m: ...
        c.hosts.cut("h2"); c.hosts.heal("h2")
        os.kill(c.pid("n2"), signal.SIGSTOP)

Every host gets one node (n1 on h1 runs the supervisor) under its own `mesh node`
launcher; CURVE is on, with fresh keys in FOLDER/keys and an admin client key. With
`control=True` the config has a [control] section instead: each host's launcher runs an
etcd member (TLS, certificates in FOLDER/tls) and every node is a candidate. The
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

CONTROL = """
[control]
members = ["h1", "h2", "h3"]
candidates = ["n1", "n2", "n3"]
tls_dir = "{tls}"
"""


class NetCluster:
    def __init__(self, folder: Path, replicas: int = 1, heartbeat_ms: int = 100, liveness: int = 8,
                 lease_ms: int = 500, extra: str = "", restarts: dict[str, int] | None = None,
                 env: dict | None = None, control: bool = False):
        """`restarts`: launcher restart limit per node (the config's when absent);
        `extra`: more config text (an [llm] table, say); `control`: etcd on every host."""
        from mesh.security import create_keypair
        self.folder, self.restarts, self.env, self.control = Path(folder), restarts or {}, env, control
        self.net = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        keys = self.folder / "keys"
        for name in (*NODES, "admin"):
            create_keypair(str(keys), name)
        self.key = str(keys / "admin.key_secret")
        self.data = self.folder / "data"
        self.config = self.folder / "net.toml"
        text = textwrap.dedent(CONFIG.format(
            data=self.data, keys=keys, net=self.net, replicas=replicas, heartbeat_ms=heartbeat_ms,
            liveness=liveness, lease_ms=lease_ms, extra=extra))
        if control:
            from mesh.certs import make_all
            make_all(self.folder / "tls", "net", {h: f"{self.net}.{h[1]}" for h in NODES.values()})
            text = text.replace('[supervisor]\nnode = "n1"\n', "[supervisor]\n") + CONTROL.format(tls=self.folder / "tls")
        self.config.write_text(text)
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
        if self.control:  # whichever node is elected says "mesh ready" once the tree runs
            for node in ("n1", "n2", "n3"):
                self.start_node(node)
            self.wait_any("mesh ready", 60)
            return self
        for node in ("n2", "n3", "n1"):  # the supervisor last: it finds everyone there
            self.start_node(node, "mesh ready" if node == "n1" else f"node {node} ready")
        return self

    def wait_any(self, pattern: str, timeout: float, since: dict[str, int] | None = None):
        """The first match of `pattern` in any node's output (from `since`'s marks on)."""
        import re
        import time
        deadline = time.monotonic() + timeout
        while True:
            for node, run in self.runs.items():
                for line in list(run.lines[(since or {}).get(node, 0):]):
                    m = re.search(pattern, line)
                    if m:
                        return m
            if time.monotonic() > deadline:
                raise meshrun.NoSuchLine(f"no line matching {pattern!r} within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def marks(self) -> dict[str, int]:
        return {node: run.mark() for node, run in self.runs.items()}

    def leader(self) -> str:
        """The node that last said it leads ([control])."""
        import re
        said = [(int(m.group(2)), m.group(1)) for run in self.runs.values() for line in list(run.lines)
                if (m := re.search(r"leadership: (\S+) leads, term (\d+)", line))]
        return max(said)[1]

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
