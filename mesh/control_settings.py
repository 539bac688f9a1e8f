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
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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
    ca: str = ""                      # TLS: the CA that signed every member's and client's certificate
    cert: str = ""                    # this host's certificate and key (client and peer)
    key: str = ""
    timeout_s: float = 1.0            # one request to etcd

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client side of TLS (verifying the members, showing this host's certificate)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
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
    tls = {k: r.get(k, str, "") for k in ("ca", "cert", "key")}
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
    if any(tls.values()) and not all(tls.values()):
        raise ConfigError(path, "control", "TLS needs all of ca, cert and key")
    for k, value in tls.items():
        if value:
            tls[k] = value if os.path.isabs(value) else str((base / value).resolve())
    scheme = "https" if tls["ca"] else "http"
    if members:
        endpoints = tuple(f"{scheme}://{_url_host(hosts[h].address)}:{client_port}" for h in members)
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(path, "control.endpoints", f"{url!r} is not an http(s) URL")
        if parts.scheme == "http" and not _loopback_url(url):
            raise ConfigError(path, "control.endpoints", f"{url!r} leaves this host unencrypted: "
                              "give ca, cert and key, and https endpoints (etcd with client certificates)")
        if parts.scheme == "https" and not tls["ca"]:
            raise ConfigError(path, "control.endpoints", f"{url!r} needs ca, cert and key")
    return ControlSettings(tuple(u.rstrip("/") for u in endpoints), members, candidates, f"mesh/{cluster}/",
                           lease_s, client_port, peer_port, heartbeat_ms, election_ms,
                           tls["ca"], tls["cert"], tls["key"], timeout_s)


def _port(v: int) -> str | None:
    return None if 0 < v < 65536 else "must be a TCP port (1-65535)"
