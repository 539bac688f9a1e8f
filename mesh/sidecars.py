"""Processes the launcher runs beside its nodes: the stand-in model server and this host's
etcd member. Each starts before the nodes, is restarted when it dies (within the
launcher's restart limits), and stops after the nodes.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import etcd_member
from .config import Config

STAND_IN_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "llm_server.py"
START_S = 10.0  # a sidecar serves within this, or it did not start


class Sidecar:
    """One child process in a session of its own, watched through a pidfd."""

    label = "a sidecar"

    def started(self) -> str:
        """The line the launcher says once it serves."""
        return f"{self.label}: started (pid {self.pid})"

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: subprocess.Popen | None = None
        self.pidfd = -1
        self.history: tuple[float, ...] = ()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self) -> str:
        """Start it and wait until it serves; returns why it did not, or ''."""
        self.proc = self._popen()
        self.pidfd = os.pidfd_open(self.proc.pid)
        why = self._wait_ready()
        if why:
            self.stop()
        return why

    def _popen(self) -> subprocess.Popen:
        return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_ready(self) -> str:
        return ""

    def reap(self) -> int:
        code = self.proc.wait()
        os.close(self.pidfd)
        self.pidfd = -1
        return code

    def stop(self) -> None:
        if self.proc is None or self.pidfd < 0:
            return
        signal_group(self.proc.pid, signal.SIGTERM)
        ready, _, _ = select.select([self.pidfd], [], [], 5.0)
        if not ready:
            signal_group(self.proc.pid, signal.SIGKILL)
        self.reap()


class StandIn(Sidecar):
    """scripts/llm_server.py at [llm] base_url: ready when it prints "listening on"."""

    label = "llm: the stand-in model server"

    def __init__(self, argv: list[str], url: str):
        super().__init__(argv)
        self.url = url

    def started(self) -> str:
        return (f"llm: nothing answered at {self.url}; started the stand-in model server there "
                f"(scripts/llm_server.py, pid {self.pid})")

    def _popen(self) -> subprocess.Popen:
        return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)

    def _wait_ready(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], START_S)
        line = self.proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        self.proc.stdout.close()  # it prints nothing after that line
        if line.startswith("listening on "):
            return ""
        if line:
            return line
        return f"it exited with code {self.proc.poll()}" if ready else f"no answer within {START_S:g}s"


def stand_in(config: Config) -> StandIn | str | None:
    """The stand-in to start for this config, a line saying why none can be, or None."""
    llm = config.llm
    address = llm.stand_in_address()
    if not llm.stand_in or address is None or answers(*address):
        return None
    if not STAND_IN_SCRIPT.exists():
        return (f"llm: nothing answers at {llm.base_url}, and the stand-in ({STAND_IN_SCRIPT.name}) is not here; "
                "agents that use the model get LLMError (see docs/troubleshooting.md)")
    return StandIn([sys.executable, str(STAND_IN_SCRIPT), "--host", address[0], "--port", str(address[1])],
                   llm.base_url)


class EtcdMember(Sidecar):
    """This host's member of the control plane's etcd cluster: ready when its client
    port accepts connections (it serves once a majority of members runs)."""

    def __init__(self, argv: list[str], address: tuple[str, int], log_path: str, host: str):
        super().__init__(argv)
        self.address, self.log_path = address, log_path
        self.label = f"etcd: member {host}"

    def _popen(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"it exited with code {self.proc.returncode} (its log: {self.log_path})"
            if answers(*self.address):
                return ""
            time.sleep(0.05)
        return f"its client port {self.address[1]} did not open within {START_S:g}s (its log: {self.log_path})"


def etcd_for_host(config: Config, host: str) -> EtcdMember | str | None:
    """The etcd member `mesh up` runs on `host` ([control] members), a line saying why it
    cannot, or None when this host runs none."""
    control = config.control
    if control is None or host not in control.members:
        return None
    if etcd_member.binary() is None:
        return ("etcd: this host runs a member of the control plane, and etcd is not installed "
                "(Debian and Ubuntu: apt-get install etcd-server)")
    members = [etcd_member.Member(h, control.member_url(config.hosts[h].address, control.client_port),
                                  control.member_url(config.hosts[h].address, control.peer_port))
               for h in control.members]
    me = members[control.members.index(host)]
    tls = control.tls_files(host) if control.tls else None
    data = os.path.join(config.host_dir(host), "etcd")
    os.makedirs(data, exist_ok=True)
    argv = etcd_member.command(me, members, data, control.heartbeat_ms, control.election_ms, tls)
    return EtcdMember(argv, (config.hosts[host].address, control.client_port),
                      os.path.join(config.host_dir(host), "etcd.log"), host)


def answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def signal_group(pid: int, sig: int) -> None:
    """Signal a child's whole process group (each child runs in a session of its own)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
