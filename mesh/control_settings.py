"""[control]: the etcd cluster behind leadership, the supervisor's records and node leases.

A config without it runs as before: the supervisor role on `supervisor.node`, nodes
serving under its leases. With it (G8), supervisor candidates campaign in etcd, the
winner keeps its records there, and every node holds its own lease there, so the loss
of any one host, the supervisor's included, stops nothing on the others.

Either `endpoints` names an etcd cluster run by its operators (production), or
`members` names the hosts whose launcher runs an etcd member itself (development and
tests; `mesh up` on each of those hosts starts its member before its nodes).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import ssl

from .errors import ConfigError
from .schema import Reader, positive


@dataclass(frozen=True)
class ControlSettings:
    endpoints: tuple[str, ...]        # etcd client URLs (given, or those of the members run here)
    members: tuple[str, ...] = ()     # hosts whose `mesh up` runs an etcd member
    candidates: tuple[str, ...] = ()  # nodes that campaign to supervise
    prefix: str = "mesh/"             # every key of this cluster starts with it
    lease_s: int = 1                  # a node's lease and the leader's term, in etcd
    client_port: int = 2379           # the members' ports (members only)
    peer_port: int = 2380
    heartbeat_ms: int = 20            # the members' raft timings (members only)
    election_ms: int = 200
    tls_dir: str = ""                 # TLS: ca.crt, and HOST.crt / HOST.key for each host (`mesh certs`)
    timeout_s: float = 1.0            # one request to etcd

    @property
    def tls(self) -> bool:
        return bool(self.tls_dir)

    def tls_files(self, host: str) -> dict[str, str]:
        """The CA's certificate and `host`'s own pair (its member's and its nodes')."""
        return {"ca": os.path.join(self.tls_dir, "ca.crt"), "cert": os.path.join(self.tls_dir, f"{host}.crt"),
                "key": os.path.join(self.tls_dir, f"{host}.key")}

    def ssl_context(self, host: str, path: str = "<config>") -> ssl.SSLContext | None:
        """The client side of TLS for `host`'s nodes: verify the members, show its certificate.
        Raises ConfigError naming the file that is missing or unreadable."""
        if not self.tls:
            return None
        import ssl  # here: a config without TLS (and the quick CLI) does without it
        files = self.tls_files(host)
        try:
            context = ssl.create_default_context(cafile=files["ca"])
            context.load_cert_chain(files["cert"], files["key"])
        except (OSError, ssl.SSLError) as exc:
            missing = next((f for f in files.values() if not os.path.exists(f)), None)
            why = f"{missing} is missing (`mesh certs` makes it)" if missing else f"cannot be used: {exc}"
            raise ConfigError(path, "control.tls_dir", why) from None
        return context

    def member_url(self, address: str, port: int) -> str:
        return f"{'https' if self.tls else 'http'}://{_url_host(address)}:{port}"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def control_settings(path: str, base: Path, table: dict | None, cluster: str, hosts: dict, nodes: dict,
                     ) -> ControlSettings | None:
    """The [control] section, checked against the hosts and nodes; None when absent."""
    if table is None:
        return None
    r = Reader(path, "control", table)
    d = ControlSettings
    endpoints = r.strings("endpoints")
    members = r.strings("members")
    first_of_host: dict[str, str] = {}
    for node in nodes.values():
        first_of_host.setdefault(node.host, node.name)
    candidates = r.strings("candidates", tuple(first_of_host.values()))
    lease_s = r.get("lease_s", int, d.lease_s, lambda v: None if v >= 1 else "must be at least 1 (etcd counts whole seconds)")
    client_port = r.get("client_port", int, d.client_port, _port)
    peer_port = r.get("peer_port", int, d.peer_port, _port)
    heartbeat_ms = r.get("heartbeat_ms", int, d.heartbeat_ms, positive)
    election_ms = r.get("election_ms", int, d.election_ms, positive)
    timeout_s = r.get("timeout_s", float, d.timeout_s, positive)
    tls_dir = r.get("tls_dir", str, "")
    r.done()
    if bool(endpoints) == bool(members):
        raise ConfigError(path, "control", "needs either endpoints (an etcd cluster of your own) or members "
                          "(the hosts that run one), not both")
    for host in members:
        if host not in hosts:
            raise ConfigError(path, "control.members", f"no host named {host!r}")
    if len(set(members)) != len(members):
        raise ConfigError(path, "control.members", "names a host twice")
    for name in candidates:
        if name not in nodes:
            raise ConfigError(path, "control.candidates", f"no node named {name!r}")
    if not candidates:
        raise ConfigError(path, "control.candidates", "needs at least one node")
    if members and client_port == peer_port:
        raise ConfigError(path, "control.peer_port", "must differ from client_port")
    if members and election_ms < 5 * heartbeat_ms:
        raise ConfigError(path, "control.election_ms", "must be at least 5 x heartbeat_ms (etcd's advice)")
    if members and lease_s * 1000 < 1.5 * election_ms:
        raise ConfigError(path, "control.lease_s", f"etcd honours no lease shorter than 1.5 x election_ms "
                          f"({1.5 * election_ms / 1000:g} s)")
    if tls_dir and not os.path.isabs(tls_dir):
        tls_dir = str((base / tls_dir).resolve())
    scheme = "https" if tls_dir else "http"
    if members:
        endpoints = tuple(f"{scheme}://{_url_host(hosts[h].address)}:{client_port}" for h in members)
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(path, "control.endpoints", f"{url!r} is not an http(s) URL")
        if parts.scheme == "http" and not _loopback_url(url):
            raise ConfigError(path, "control.endpoints", f"{url!r} leaves this host unencrypted: give tls_dir "
                              "(`mesh certs` makes its files) and https endpoints (etcd with client certificates)")
        if parts.scheme == "https" and not tls_dir:
            raise ConfigError(path, "control.endpoints", f"{url!r} needs tls_dir (`mesh certs` makes its files)")
    return ControlSettings(tuple(u.rstrip("/") for u in endpoints), members, candidates, f"mesh/{cluster}/",
                           lease_s, client_port, peer_port, heartbeat_ms, election_ms, tls_dir, timeout_s)


def _port(v: int) -> str | None:
    return None if 0 < v < 65536 else "must be a TCP port (1-65535)"
