"""Real mesh processes for tests: `mesh up` of a generated config, ended by pid.

Every pid a run ever saw (the launcher's, and every node's from its "ready" lines) is
killed at teardown if still alive, also when the test failed; waits are on output
lines and process exits, each with a deadline.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mesh.demo import free_ports

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import meshrun  # noqa: E402
from meshrun import NoSuchLine, alive, wait_gone  # noqa: E402,F401

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

CONFIG = """
[cluster]
name = "{name}"
data_dir = "{data}"
heartbeat_ms = 100
liveness = 10
lease_ms = 700
call_timeout_s = 5

[launcher]
max_restarts = {max_restarts}
period_s = 30

[kinds]
counter = "nodes.counter:Counter"
ledger = "nodes.ledger:Ledger"
conversation = "nodes.conversation:ConversationAgent"
embedder = "nodes.embedder:EmbeddingAgent"
waiter = "kinds:Waiter"
lifecycle = "kinds:Lifecycle"
recorder = "kinds:Recorder"
failsinit = "kinds:FailsInit"
calculator = "kinds:Calculator"

[llm]
base_url = "{llm_url}"
max_connections = {llm_connections}
backoff_base_s = 0.02
breaker_reset_s = 0.3

[hosts.local]
address = "127.0.0.1"

{nodes}

[supervisor]
node = "n1"
dynamic = "sessions"

[tree.root]
children = ["sessions", "jobs", "stats"]

[tree.jobs]
dynamic = true

[tree.stats]
strategy = "one_for_all"
children = ["hits", "misses"]

[tree.sessions]
dynamic = true
intensity = 50
period_s = 10

[agents.hits]
kind = "counter"

[agents.misses]
kind = "counter"
"""


def write_config(tmp_path: Path, nodes: int = 3, max_restarts: int = 5, name: str = "test",
                 llm_url: str = "http://127.0.0.1:9/v1", llm_connections: int = 64,
                 metrics: bool = False) -> Path:
    """With `metrics`, each node serves Prometheus metrics on a port of its own."""
    ports = free_ports(2 * nodes if metrics else nodes)
    node_tables = "\n".join(f'[nodes.n{i + 1}]\nhost = "local"\nport = {ports[i]}\n'
                             + (f"metrics_port = {ports[nodes + i]}\n" if metrics else "") for i in range(nodes))
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, data=tmp_path / "data", nodes=node_tables, max_restarts=max_restarts,
                                  llm_url=llm_url, llm_connections=llm_connections))
    return path


def env() -> dict:
    return meshrun.env([str(TESTS)])


def mesh_cmd(*args: str, timeout: float = 30, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run the mesh CLI once; returns its completed process (never raises on exit codes)."""
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                          env={**env(), **(env_extra or {})}, timeout=timeout, cwd=ROOT)


class MeshRun(meshrun.MeshRun):
    """A mesh process tree whose nodes can import the tests' agent kinds."""

    def __init__(self, *args: str, prefix: list[str] | None = None, env_extra: dict | None = None):
        super().__init__(*args, prefix=prefix, env={**env(), **(env_extra or {})})

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0):
        try:
            return super().wait_for(pattern, timeout, start)
        except NoSuchLine as exc:
            pytest.fail(str(exc))
