"""Running one member of an etcd cluster as a child process (development and tests).

In production the mesh points at an etcd cluster run by its operators; for a cluster
config's development setup and for the tests, `mesh up` runs this host's member itself
(`launcher`), and the tests run three on loopback or in namespaced hosts. This module
only builds the member's command line and waits for it to serve.

The election timings are short on purpose: a lease's shortest honoured TTL is about
1.5 x the election timeout, and the mesh's node leases are one second long (see
`control`). `heartbeat_ms = 50, election_ms = 500` serves within half a second of a
start and elects a new etcd leader in about 0.7 s.

Members run with `--pre-vote` (etcd 3.5's default, off in 3.4): a member cut off from
the others keeps campaigning, each time with a higher raft term, and without pre-vote
that term deposes the leader the moment the cut heals, so one cut costs a second
election, and with one-second node leases a lapse of every lease.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass

from .etcd import Etcd, EtcdError

ETCD_BINARY = "etcd"


@dataclass(frozen=True)
class Member:
    name: str
    client_url: str   # where clients reach it: http(s)://address:port
    peer_url: str     # where the other members reach it


def binary() -> str | None:
    """The etcd executable on $PATH, or None (Debian and Ubuntu: `apt-get install etcd-server`)."""
    return shutil.which(ETCD_BINARY)


def command(member: Member, cluster: list[Member], data_dir: str, heartbeat_ms: int = 50,
            election_ms: int = 500, tls: dict | None = None) -> list[str]:
    """The command line that runs `member` of `cluster`, keeping its data in `data_dir`.

    `tls` (keys `cert`, `key`, `ca`: file paths) makes the member require client
    certificates from clients and peers alike.
    """
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster)
    args = [binary() or ETCD_BINARY, "--name", member.name, "--data-dir", data_dir,
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--heartbeat-interval", str(heartbeat_ms), "--election-timeout", str(election_ms),
            "--pre-vote", "--logger", "zap", "--log-outputs", "stderr"]
    if tls:
        args += ["--cert-file", tls["cert"], "--key-file", tls["key"], "--trusted-ca-file", tls["ca"],
                 "--client-cert-auth",
                 "--peer-cert-file", tls["cert"], "--peer-key-file", tls["key"],
                 "--peer-trusted-ca-file", tls["ca"], "--peer-client-cert-auth"]
    return args


def start(member: Member, cluster: list[Member], data_dir: str, log_path: str, **kwargs) -> subprocess.Popen:
    """Start the member in a session of its own, its output in `log_path`."""
    os.makedirs(data_dir, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command(member, cluster, data_dir, **kwargs), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)


async def wait_serving(etcd: Etcd, timeout_s: float) -> None:
    """Return once the cluster answers a read (it has a leader); raise EtcdError after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await etcd.range("\0")
            return
        except EtcdError as exc:
            if loop.time() >= deadline:
                raise EtcdError(f"etcd is not serving after {timeout_s:g} s: {exc}") from None
        await asyncio.sleep(0.05)
