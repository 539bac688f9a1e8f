#!/usr/bin/env python3
"""Hosts for tests: one network namespace per host of a cluster config, on one bridge.

    sudo python3 scripts/hosts.py up -c configs/cluster3.toml --start   # namespaces + `mesh up --host H` in each
    sudo python3 scripts/hosts.py cut h2          # h2 can reach nobody, nobody can reach h2
    sudo python3 scripts/hosts.py heal h2
    sudo python3 scripts/hosts.py loss h2 30      # drop 30% of h2's packets, both ways (0 stops)
    sudo python3 scripts/hosts.py delay h2 50     # 50 ms each way, where the kernel has netem
    sudo python3 scripts/hosts.py kill h2         # kill -9 every process of h2
    sudo python3 scripts/hosts.py down            # kill everything, remove everything made
    sudo python3 scripts/hosts.py sweep           # remove what a crashed run left behind

Each host gets a namespace `mesh-TAG-HOST` with an interface eth0 at the address the
config gives it, joined by a veth pair to a bridge in the root namespace, which itself
takes the address .254 of the hosts' /24 so that clients on this machine reach them.
Traffic goes only between these namespaces and the root namespace. Loss is made with
nftables (`numgen random`); delay needs the kernel's netem qdisc, which not every kernel
has (this tool says so plainly). The state of a run is kept in var/hosts.json, so the
commands above can be given one by one; `down` removes everything, and the Hosts class
(used by the tests) removes everything when its `with` block ends, also after a failure.
Needs root and iproute2; loss needs nftables.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

STATE = Path("var/hosts.json")
PREFIX = "mesh-"


class HostsError(Exception):
    pass


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise HostsError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def available() -> str | None:
    """Why hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    return None


class Hosts:
    """Namespaces for `hosts` ({name: address}); a context manager that cleans up."""

    def __init__(self, hosts: dict[str, str], tag: str | None = None):
        self.hosts = dict(hosts)
        self.tag = tag or secrets.token_hex(2)
        nets = {ipaddress.ip_interface(f"{a}/24").network for a in self.hosts.values()}
        if len(nets) != 1:
            raise HostsError(f"the hosts' addresses must share one /24, not {sorted(map(str, nets))}")
        self.net = nets.pop()
        self.gateway = str(self.net.network_address + 254)
        if self.gateway in self.hosts.values():
            raise HostsError(f"{self.gateway} is the bridge's address; give the hosts others")
        self.bridge = f"mb{self.tag}"
        self.processes: list[subprocess.Popen] = []

    # --- names -------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.tag}-{host}"

    def veth(self, host: str) -> str:
        return f"mv{self.tag}{list(self.hosts).index(host)}"

    # --- lifecycle ---------------------------------------------------------------------------

    def create(self) -> "Hosts":
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            for host, address in self.hosts.items():
                ns, veth = self.ns(host), self.veth(host)
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                sh("ip", "link", "set", f"{veth}p", "netns", ns)
                sh("ip", "link", "set", veth, "master", self.bridge)
                sh("ip", "link", "set", veth, "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{veth}p", "name", "eth0")
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except HostsError:
            self.destroy()
            raise
        return self

    def __enter__(self) -> "Hosts":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()

    def destroy(self) -> None:
        """Kill every process in the namespaces and remove everything this made."""
        for host in self.hosts:
            self.kill(host)
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for host in self.hosts:
            sh("ip", "netns", "del", self.ns(host), check=False)
            sh("ip", "link", "del", self.veth(host), check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    # --- processes ---------------------------------------------------------------------------

    def run(self, host: str, argv: list[str], **popen) -> subprocess.Popen:
        """Start a process inside `host`'s namespace (in its own session)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], start_new_session=True, **popen)
        self.processes.append(proc)
        return proc

    def pids(self, host: str) -> list[int]:
        r = sh("ip", "netns", "pids", self.ns(host), check=False)
        return [int(p) for p in r.stdout.split()]

    def kill(self, host: str) -> list[int]:
        """kill -9 every process of the host (woken first, should any be stopped)."""
        pids = self.pids(host)
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        return pids

    # --- faults ------------------------------------------------------------------------------

    def cut(self, host: str) -> None:
        sh("ip", "link", "set", self.veth(host), "down")

    def heal(self, host: str) -> None:
        sh("ip", "link", "set", self.veth(host), "up")
        self.loss(host, 0)

    def loss(self, host: str, percent: float) -> None:
        """Drop `percent` of the host's packets in each direction (0 removes the rule)."""
        ns = self.ns(host)
        sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "meshfault", check=False)
        if percent <= 0:
            return
        if shutil.which("nft") is None:
            raise HostsError("packet loss needs nftables (the nft command)")
        n = max(1, min(100, round(percent)))
        rules = "\n".join([
            "table inet meshfault {",
            "  chain in { type filter hook input priority 0; policy accept;",
            f"    numgen random mod 100 < {n} drop; }}",
            "  chain out { type filter hook output priority 0; policy accept;",
            f"    numgen random mod 100 < {n} drop; }}",
            "}",
        ])
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if r.returncode != 0:
            raise HostsError(f"nft: {r.stderr.strip()}")

    def delay(self, host: str, ms: float) -> None:
        ns = self.ns(host)
        if ms <= 0:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            return
        r = sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
               "delay", f"{ms}ms", check=False)
        if r.returncode != 0:
            raise HostsError(f"delay needs the kernel's netem qdisc, which this kernel lacks ({r.stderr.strip()})")

    # --- state, for the command line ---------------------------------------------------------

    def save(self, path: Path, extra: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"tag": self.tag, "hosts": self.hosts, **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: Path) -> "Hosts":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HostsError(f"no hosts are up ({path} is missing)") from None
        return cls(data["hosts"], data["tag"])


def sweep() -> list[str]:
    """Remove namespaces, veths and bridges that a crashed run left behind."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(PREFIX):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(("mb", "mv")) and len(name) <= 9:
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _config_hosts(path: str) -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mesh.config import load
    cfg = load(path)
    return {name: h.address for name, h in cfg.hosts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", default=str(STATE), help="where this run's state is kept")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make the namespaces for a config's hosts")
    up.add_argument("-c", "--config", required=True)
    up.add_argument("--start", action="store_true", help="also run `mesh up --host H` in each")
    for name in ("cut", "heal", "kill"):
        sub.add_parser(name).add_argument("host")
    loss = sub.add_parser("loss")
    loss.add_argument("host")
    loss.add_argument("percent", type=float)
    delay = sub.add_parser("delay")
    delay.add_argument("host")
    delay.add_argument("ms", type=float)
    sub.add_parser("down")
    sub.add_parser("sweep")
    a = p.parse_args(argv)
    why = available()
    if why:
        print(f"hosts: {why}", file=sys.stderr)
        return 2
    state = Path(a.state)
    try:
        if a.cmd == "up":
            hosts = Hosts(_config_hosts(a.config)).create()
            hosts.save(state, {"config": os.path.abspath(a.config)})
            for host, address in hosts.hosts.items():
                print(f"{host}: namespace {hosts.ns(host)}, address {address}")
            if a.start:
                logs = state.parent / f"hosts-{hosts.tag}"
                logs.mkdir(parents=True, exist_ok=True)
                for host in hosts.hosts:
                    out = open(logs / f"{host}.log", "w")
                    hosts.run(host, [sys.executable, "-m", "mesh.cli", "up", "-c", a.config, "--host", host],
                              stdout=out, stderr=subprocess.STDOUT)
                    print(f"{host}: mesh up --host {host} (output in {logs / (host + '.log')})")
            return 0
        if a.cmd == "sweep":
            print("\n".join(sweep()) or "nothing left behind")
            return 0
        hosts = Hosts.load(state)
        if a.cmd == "down":
            hosts.destroy()
            state.unlink(missing_ok=True)
        elif a.cmd == "kill":
            print(f"killed {hosts.kill(a.host)}")
        elif a.cmd == "loss":
            hosts.loss(a.host, a.percent)
        elif a.cmd == "delay":
            hosts.delay(a.host, a.ms)
        else:
            getattr(hosts, a.cmd)(a.host)
        return 0
    except HostsError as exc:
        print(f"hosts: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
