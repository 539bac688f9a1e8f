"""Real etcd members on loopback for tests, each ended by its pid at teardown.

Skips the test where the etcd binary is missing (`.ci/run` installs Debian's
`etcd-server`, so CI runs every one of them).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from mesh import etcd_member
from mesh.demo import free_ports
from mesh.etcd_member import Member


class EtcdCluster:
    """`size` members on 127.0.0.1; `endpoints` for clients; kill/start members by name."""

    def __init__(self, tmp_path, size: int = 1, election_ms: int = 500):
        if etcd_member.binary() is None:
            pytest.skip("etcd is not installed (apt-get install etcd-server)")
        ports = free_ports(2 * size)
        self.members = [Member(f"e{i + 1}", f"http://127.0.0.1:{ports[2 * i]}", f"http://127.0.0.1:{ports[2 * i + 1]}")
                        for i in range(size)]
        self.dir, self.election_ms = tmp_path, election_ms
        self.procs: dict[str, subprocess.Popen] = {}
        self.every_pid: list[int] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, name: str | None = None) -> None:
        for m in self.members:
            if name in (None, m.name) and (m.name not in self.procs or self.procs[m.name].poll() is not None):
                proc = etcd_member.start(m, self.members, str(self.dir / f"etcd-{m.name}"),
                                         str(self.dir / f"etcd-{m.name}.log"), heartbeat_ms=self.election_ms // 10,
                                         election_ms=self.election_ms)
                self.procs[m.name] = proc
                self.every_pid.append(proc.pid)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for pid in self.every_pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def etcd_factory(tmp_path):
    """Make (and start) etcd clusters; every member is killed by pid after the test."""
    made: list[EtcdCluster] = []

    def make(size: int = 1, election_ms: int = 500) -> EtcdCluster:
        cluster = EtcdCluster(tmp_path / f"etcd{len(made)}", size, election_ms)
        (tmp_path / f"etcd{len(made)}").mkdir()
        made.append(cluster)
        cluster.start()
        return cluster
    yield make
    for cluster in made:
        cluster.stop()
