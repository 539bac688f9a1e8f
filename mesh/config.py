"""TOML cluster files -> frozen, validated objects.

One file describes a whole cluster: its hosts, the nodes on each host, the supervisor,
the supervision tree with its static agents, the kinds that may ever be started, and
the settings of time, limits and storage. Every key is checked at load: an unknown key,
a wrong type, a clash of ports or names fails with the file, the key and the reason.
Relative paths are resolved against the config file's folder. See docs/config.md.
"""

from __future__ import annotations

import os
import tomllib
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from .control_settings import ControlSettings, control_settings
from .errors import ConfigError
from .schema import (Reader, between, field_type, host_address, mesh_name, non_negative, positive, tables,
                     z85_key)
from .supervision import RESTARTS, STRATEGIES, ChildSpec, Placement, SupervisorSpec

ENV_CONFIG = "MESH_CONFIG"
DEFAULT_CONFIG = "configs/local.toml"


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = 0.25
    liveness: int = 4
    lease_s: float = 0.75
    call_timeout_s: float = 5.0
    handler_timeout_s: float = 60.0
    served_log: bool = False
    unsafe_reply_before_commit: bool = False  # a planted bug, for proving the chaos checker

    @property
    def dead_after_s(self) -> float:
        return self.heartbeat_s * self.liveness


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 8 * 1024 * 1024
    mailbox: int = 10_000
    dedup_window: int = 1000           # replies kept per agent for repeated request ids ...
    dedup_s: float = 300.0             # ... for this long (agent time)
    dedup_min_s: float = 60.0          # none goes sooner than this, whatever dedup_window says
    batch: int = 512
    peer_rate: float = 500_000.0       # requests per second from one peer (0: unlimited)
    peer_burst: float = 100_000.0
    peer_open_requests: int = 10_000   # requests of one peer awaiting an answer
    peer_decode_share: float = 0.5     # seconds of decoding one peer may cost per second ...
    peer_decode_burst_s: float = 2.0   # ... and at once; past it its frames are dropped unread
    max_elements: int = 100_000        # entries of one array or map from a peer that is no node
    peer_out_bytes: int = 64 << 20     # answers queued for a peer that does not read them


@dataclass(frozen=True)
class StoreSettings:
    sync: bool = True
    map_size_mb: int = 1024
    replicas: int = 0


@dataclass(frozen=True)
class LauncherSettings:
    max_restarts: int = 5
    period_s: float = 30.0


@dataclass(frozen=True)
class LLMSettings:
    """Where agents' language model lives ([llm] in the config). The key is never in the
    file: `api_key_env` names the environment variable that holds it. MESH_LLM_URL,
    MESH_LLM_MODEL and MESH_LLM_EMBEDDING_MODEL override the file."""

    base_url: str = "http://127.0.0.1:8700/v1"
    model: str = "stand-in"
    embedding_model: str = "stand-in-embed"
    api_key_env: str = "MESH_LLM_API_KEY"
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0
    pool_timeout_s: float = 60.0
    total_timeout_s: float = 60.0
    max_retries: int = 4
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    max_connections: int = 64
    max_keepalive: int = 16
    breaker_failures: int = 5
    breaker_reset_s: float = 10.0
    stand_in: bool = False             # `mesh up` starts scripts/llm_server.py at base_url if nothing answers

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def stand_in_address(self) -> tuple[str, int] | None:
        """(host, port) of base_url when it is plain http on loopback, where the stand-in
        model server (scripts/llm_server.py) can be started; else None."""
        from urllib.parse import urlsplit
        try:
            url = urlsplit(self.base_url)
            port = url.port or 80
        except ValueError:
            return None
        if url.scheme != "http" or not url.hostname or not _loopback(url.hostname):
            return None
        return url.hostname, port


_LLM_ENV = {"base_url": "MESH_LLM_URL", "model": "MESH_LLM_MODEL", "embedding_model": "MESH_LLM_EMBEDDING_MODEL"}


def _llm_settings(path: str, table: dict) -> LLMSettings:
    r = Reader(path, "llm", table)
    values = {}
    for f in fields(LLMSettings):
        typ = field_type(f)
        check = positive if typ in (int, float) and f.name != "max_retries" else None
        if f.name == "max_retries":
            check = non_negative
        values[f.name] = r.get(f.name, typ, f.default, check)
    r.done()
    for key, var in _LLM_ENV.items():
        if os.environ.get(var):
            values[key] = os.environ[var]
    if not values["base_url"].startswith(("http://", "https://")):
        raise ConfigError(path, "llm.base_url", "must start with http:// or https://")
    settings = LLMSettings(**values)
    if settings.stand_in and settings.stand_in_address() is None and not os.environ.get("MESH_LLM_URL"):
        raise ConfigError(path, "llm.stand_in", "needs a base_url on loopback (http://127.0.0.1:PORT/v1): "
                          "the stand-in serves this host only")
    return settings


ROLES = ("client", "admin", "node")


@dataclass(frozen=True)
class SecuritySettings:
    """[security]: who may connect, and where this host keeps its secret keys.

    Every node has a key pair; its public key is in [nodes.NAME] public_key and its
    secret key in KEYS_DIR/NAME.key_secret on its host. Clients are listed in
    [security.clients.NAME] with a public key and a role: "client" may call and cast,
    "admin" may also spawn, stop and ask for status. Nothing else gets in."""

    keys_dir: str = ""
    client_key: str = ""                      # default key file for `mesh` commands on this host
    clients: dict = None                      # public key -> (name, role)

    def peers(self, nodes: dict) -> dict[str, tuple[str, str]]:
        """Every public key that may connect -> (name, role)."""
        out = {n.public_key: (n.name, "node") for n in nodes.values()}
        out.update(self.clients or {})
        return out


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeSpec:
    name: str
    host: str
    address: str  # ip of the host
    port: int
    tags: tuple[str, ...] = ()
    public_key: str = ""  # CURVE public key (z85), when the cluster is secure
    metrics_port: int = 0  # where it serves Prometheus metrics over HTTP; 0: it does not

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.address}:{self.port}"


@dataclass(frozen=True)
class Config:
    path: str
    name: str
    data_dir: str
    timing: Timing
    limits: Limits
    store: StoreSettings
    launcher: LauncherSettings
    kinds: dict[str, str]
    hosts: dict[str, Host]
    nodes: dict[str, NodeSpec]
    supervisor_node: str
    dynamic_supervisor: str
    tree: dict[str, SupervisorSpec]
    agents: dict[str, ChildSpec]
    llm: LLMSettings = LLMSettings()
    secure: bool = False
    security: SecuritySettings = SecuritySettings()
    control: ControlSettings | None = None  # [control]: etcd behind leadership and leases (G8)

    def host_dir(self, host: str) -> str:
        return os.path.join(self.data_dir, host)

    def resolve_kind(self, kind: str) -> str:
        """Short name or allowed import path -> import path; NotAllowed-worthy -> None."""
        if kind in self.kinds:
            return self.kinds[kind]
        if kind in self.kinds.values():
            return kind
        return None  # type: ignore[return-value]

    def nodes_on(self, host: str) -> list[NodeSpec]:
        return [n for n in self.nodes.values() if n.host == host]

    def parent_of(self) -> dict[str, str]:
        """child name -> the supervisor that lists it."""
        return {c: s.name for s in self.tree.values() for c in s.children}


def load(path: str | os.PathLike | None = None) -> Config:
    """Load and validate a config file; `None` means $MESH_CONFIG, then configs/local.toml."""
    path = os.fspath(path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot be read: {exc.strerror}") from None
    return parse(raw, path)


def parse(raw: dict, path: str = "<config>") -> Config:
    """A validated Config from a TOML document: one reader per section, each default
    written once (on the settings' dataclasses), every unknown key an error."""
    top = Reader(path, "", raw)
    base = Path(path).resolve().parent
    name, data_dir, secure, timing = _cluster(path, base, top.get("cluster", dict, {}))
    limits = _limits(path, top.get("limits", dict, {}))
    store = _store(path, top.get("store", dict, {}))
    launcher = _launcher(path, top.get("launcher", dict, {}))
    kinds = _kinds(path, top.get("kinds", dict, {}))
    hosts = _hosts(path, top)
    nodes = _nodes(path, top, hosts, secure)
    supervisor_node, dynamic_name = _supervisor(path, top.get("supervisor", dict, {}), nodes)
    tree = _tree(path, top)
    agents = _agents(path, top, kinds, hosts)
    tree = _complete_tree(path, tree, agents, dynamic_name)
    llm = _llm_settings(path, top.get("llm", dict, {}))
    control = control_settings(path, base, top.get("control", dict, None), name, hosts, nodes)
    if control is not None:
        if "node" in (raw.get("supervisor") or {}):
            raise ConfigError(path, "supervisor.node", "with [control] the supervisor is elected among "
                              "control.candidates: leave this out")
        supervisor_node = control.candidates[0]  # the first to ask; any node passes requests on to the leader
    security, nodes = _security(path, base, top.get("security", dict, {}), nodes, secure)
    if not secure:
        exposed = sorted(h.name for h in hosts.values() if not _loopback(h.address))
        if exposed:
            raise ConfigError(path, "cluster.secure", f"must be true: host {exposed[0]!r} listens beyond loopback, "
                              "and without CURVE anyone who reaches its ports gets in")
    top.done()
    return Config(
        path=str(Path(path).resolve()), name=name, data_dir=data_dir, timing=timing, limits=limits,
        store=store, launcher=launcher, kinds=kinds, hosts=hosts, nodes=nodes,
        supervisor_node=supervisor_node, dynamic_supervisor=dynamic_name, tree=tree,
        agents=agents, llm=llm, secure=secure, security=security, control=control,
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _cluster(path: str, base: Path, table: dict) -> tuple[str, str, bool, Timing]:
    cluster = Reader(path, "cluster", table)
    name = cluster.get("name", str, Path(path).stem, mesh_name)
    data_dir = cluster.get("data_dir", str, "../var/" + name)
    data_dir = str((base / data_dir).resolve()) if not os.path.isabs(data_dir) else data_dir
    secure = cluster.get("secure", bool, False)
    d = Timing
    timing = Timing(
        heartbeat_s=cluster.get("heartbeat_ms", int, _ms(d.heartbeat_s), positive) / 1000,
        liveness=cluster.get("liveness", int, d.liveness, positive),
        lease_s=cluster.get("lease_ms", int, _ms(d.lease_s), positive) / 1000,
        call_timeout_s=cluster.get("call_timeout_s", float, d.call_timeout_s, between(0.001, 86_400)),
        handler_timeout_s=cluster.get("handler_timeout_s", float, d.handler_timeout_s, between(0.001, 86_400)),
        served_log=cluster.get("served_log", bool, d.served_log),
        unsafe_reply_before_commit=cluster.get("unsafe_reply_before_commit", bool, d.unsafe_reply_before_commit),
    )
    cluster.done()
    if timing.unsafe_reply_before_commit:
        import logging
        logging.getLogger("mesh.config").warning(
            "%s: cluster.unsafe_reply_before_commit is on: replies leave before their state is "
            "committed (which waits 50 ms), and a crash loses acknowledged writes (it exists to test the chaos "
            "checker)", path)
    if timing.lease_s >= timing.dead_after_s:
        raise ConfigError(path, "cluster.lease_ms", f"must be shorter than heartbeat_ms x liveness ({timing.dead_after_s * 1000:.0f} ms), so a silent node's lease has run out before it is declared dead")
    return name, data_dir, secure, timing


_LIMIT_CHECKS = {
    "max_message_bytes": between(1024, 1 << 30), "dedup_window": non_negative, "dedup_min_s": non_negative,
    "peer_rate": non_negative, "peer_out_bytes": non_negative,
}


def _limits(path: str, table: dict) -> Limits:
    lim = Reader(path, "limits", table)
    values = {f.name: lim.get(f.name, field_type(f), f.default, _LIMIT_CHECKS.get(f.name, positive))
              for f in fields(Limits)}
    lim.done()
    return Limits(**values)


def _store(path: str, table: dict) -> StoreSettings:
    st, d = Reader(path, "store", table), StoreSettings
    store = StoreSettings(
        sync=st.get("sync", bool, d.sync),
        map_size_mb=st.get("map_size_mb", int, d.map_size_mb, between(1, 1 << 24)),
        replicas=st.get("replicas", int, d.replicas, non_negative),
    )
    st.done()
    return store


def _launcher(path: str, table: dict) -> LauncherSettings:
    la, d = Reader(path, "launcher", table), LauncherSettings
    launcher = LauncherSettings(
        max_restarts=la.get("max_restarts", int, d.max_restarts, non_negative),
        period_s=la.get("period_s", float, d.period_s, positive),
    )
    la.done()
    return launcher


def _kinds(path: str, table: dict) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for short, target in table.items():
        if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
            raise ConfigError(path, f"kinds.{short}", "must be an import path 'module:Class'")
        kinds[short] = target
    return kinds


def _hosts(path: str, top: Reader) -> dict[str, Host]:
    hosts: dict[str, Host] = {}
    for hname, table in tables(path, top.table, "hosts").items():
        r = Reader(path, f"hosts.{hname}", table)
        hosts[hname] = Host(hname, r.get("address", str, ..., host_address), r.strings("tags"))
        r.done()
    top.used.add("hosts")
    if not hosts:
        raise ConfigError(path, "hosts", "at least one host is required")
    return hosts


def _nodes(path: str, top: Reader, hosts: dict[str, Host], secure: bool) -> dict[str, NodeSpec]:
    nodes: dict[str, NodeSpec] = {}
    seen_ports: dict[tuple[str, int], str] = {}
    for nname, table in tables(path, top.table, "nodes").items():
        r = Reader(path, f"nodes.{nname}", table)
        host = r.get("host", str)
        if host not in hosts:
            raise ConfigError(path, f"nodes.{nname}.host", f"no host named {host!r}")
        port = r.get("port", int, check=lambda p: None if 0 < p < 65536 else "must be a TCP port 1..65535")
        key = (hosts[host].address, port)
        if key in seen_ports:
            raise ConfigError(path, f"nodes.{nname}.port", f"port {port} on {key[0]} is also used by node {seen_ports[key]!r}")
        seen_ports[key] = nname
        public_key = r.get("public_key", str, "", z85_key if secure else None)
        metrics_port = r.get("metrics_port", int, 0,
                             check=lambda p: None if 0 < p < 65536 else "must be a TCP port 1..65535")
        if metrics_port:
            key = (hosts[host].address, metrics_port)
            if key in seen_ports:
                raise ConfigError(path, f"nodes.{nname}.metrics_port",
                                  f"port {metrics_port} on {key[0]} is also used by node {seen_ports[key]!r}")
            seen_ports[key] = nname
        nodes[nname] = NodeSpec(nname, host, hosts[host].address, port, r.strings("tags"), public_key,
                                metrics_port)
        r.done()
    top.used.add("nodes")
    if not nodes:
        raise ConfigError(path, "nodes", "at least one node is required")
    return nodes


def _supervisor(path: str, table: dict, nodes: dict[str, NodeSpec]) -> tuple[str, str]:
    sup = Reader(path, "supervisor", table)
    supervisor_node = sup.get("node", str, next(iter(nodes)))
    if supervisor_node not in nodes:
        raise ConfigError(path, "supervisor.node", f"no node named {supervisor_node!r}")
    dynamic_name = sup.get("dynamic", str, "dynamic", mesh_name)
    sup.done()
    return supervisor_node, dynamic_name


def _tree(path: str, top: Reader) -> dict[str, SupervisorSpec]:
    tree: dict[str, SupervisorSpec] = {}
    d = SupervisorSpec
    for sname, table in tables(path, top.table, "tree").items():
        r = Reader(path, f"tree.{sname}", table)
        strategy = r.get("strategy", str, d.strategy, lambda s: None if s in STRATEGIES else f"must be one of {', '.join(STRATEGIES)}")
        dynamic = r.get("dynamic", bool, d.dynamic)
        children = r.strings("children")
        if dynamic and (children or strategy != "one_for_one"):
            raise ConfigError(path, f"tree.{sname}", "a dynamic supervisor is one_for_one and lists no children")
        backoff_s = r.get("backoff_s", float, d.backoff_s, non_negative)
        backoff_max_s = r.get("backoff_max_s", float, max(d.backoff_max_s, backoff_s), non_negative)
        if backoff_max_s < backoff_s:
            raise ConfigError(path, f"tree.{sname}.backoff_max_s", f"must be at least backoff_s ({backoff_s:g})")
        tree[sname] = SupervisorSpec(
            name=sname,
            strategy=strategy,
            intensity=r.get("intensity", int, d.intensity, non_negative),
            period_s=r.get("period_s", float, d.period_s, positive),
            children=children,
            dynamic=dynamic,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        r.done()
    top.used.add("tree")
    return tree


def _agents(path: str, top: Reader, kinds: dict[str, str], hosts: dict[str, Host]) -> dict[str, ChildSpec]:
    agents: dict[str, ChildSpec] = {}
    for aname, table in tables(path, top.table, "agents").items():
        r = Reader(path, f"agents.{aname}", table)
        kind = r.get("kind", str)
        if kind not in kinds and kind not in kinds.values():
            raise ConfigError(path, f"agents.{aname}.kind", f"kind {kind!r} is not in [kinds]")
        placement_table = r.get("placement", dict, {})
        pr = Reader(path, f"agents.{aname}.placement", placement_table)
        placement = Placement(pr.strings("hosts"), pr.strings("tags"))
        pr.done()
        for h in placement.hosts:
            if h not in hosts:
                raise ConfigError(path, f"agents.{aname}.placement.hosts", f"no host named {h!r}")
        agents[aname] = ChildSpec(
            name=aname,
            kind=kind,
            args=r.get("args", dict, {}),
            restart=r.get("restart", str, ChildSpec.restart, lambda s: None if s in RESTARTS else f"must be one of {', '.join(RESTARTS)}"),
            placement=placement,
        )
        r.done()
    top.used.add("agents")
    return agents


def _loopback(address: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _security(path: str, base: Path, table: dict, nodes: dict, secure: bool) -> tuple[SecuritySettings, dict]:
    r = Reader(path, "security", table)
    keys_dir = r.get("keys_dir", str, "keys")
    client_key = r.get("client_key", str, "")
    clients_table = r.get("clients", dict, {})
    r.done()
    resolve = lambda p: str((base / p).resolve()) if p and not os.path.isabs(p) else p  # noqa: E731
    keys_dir = resolve(keys_dir)
    if secure:  # a public key not written in the file is read from KEYS_DIR/NAME.key
        for name, spec in list(nodes.items()):
            if not spec.public_key:
                key = _public_key_file(path, f"nodes.{name}.public_key", keys_dir, name)
                nodes[name] = NodeSpec(spec.name, spec.host, spec.address, spec.port, spec.tags, key)
    clients: dict[str, tuple[str, str]] = {}
    for cname, entry in clients_table.items():
        cr = Reader(path, f"security.clients.{cname}", entry)
        key = cr.get("public_key", str, "", z85_key)
        role = cr.get("role", str, "client", lambda v: None if v in ("client", "admin") else "must be client or admin")
        cr.done()
        key = key or _public_key_file(path, f"security.clients.{cname}.public_key", keys_dir, cname)
        if key in clients or any(n.public_key == key for n in nodes.values()):
            raise ConfigError(path, f"security.clients.{cname}.public_key", "is listed twice")
        clients[key] = (cname, role)
    if secure and len({n.public_key for n in nodes.values()}) != len(nodes):
        raise ConfigError(path, "nodes", "two nodes have the same public key")
    return SecuritySettings(keys_dir, resolve(client_key), clients), nodes


def _public_key_file(path: str, key: str, keys_dir: str, name: str) -> str:
    """The public key in KEYS_DIR/NAME.key (a ZeroMQ certificate), for a secure config."""
    file = os.path.join(keys_dir, f"{name}.key")
    try:
        with open(file) as f:
            for line in f:
                if line.strip().startswith("public-key"):
                    value = line.split("=", 1)[1].strip().strip('"')
                    if z85_key(value) is None:
                        return value
    except OSError:
        pass
    raise ConfigError(path, key, f"is required when cluster.secure is true: write it here, or create {file} "
                                 f"(`mesh keys -c {os.path.basename(path)} --all` creates every missing key)")


def _complete_tree(path: str, tree: dict[str, SupervisorSpec], agents: dict[str, ChildSpec], dynamic_name: str) -> dict[str, SupervisorSpec]:
    """Check the tree is one tree rooted at 'root'; add the root and the dynamic supervisor if absent."""
    tree = dict(tree)
    if dynamic_name not in tree:
        if dynamic_name in agents:
            raise ConfigError(path, "supervisor.dynamic", f"{dynamic_name!r} names an agent, not a supervisor")
        tree[dynamic_name] = SupervisorSpec(dynamic_name, intensity=100, period_s=10.0, dynamic=True)
        if "root" in tree:  # a root written by hand gets the implicit dynamic supervisor first
            root = tree["root"]
            tree["root"] = dataclasses.replace(root, children=(dynamic_name,) + root.children)
    elif not tree[dynamic_name].dynamic:
        raise ConfigError(path, f"tree.{dynamic_name}", "is the dynamic supervisor, so it needs dynamic = true")
    listed: dict[str, str] = {}
    for s in tree.values():
        for child in s.children:
            if child in listed:
                raise ConfigError(path, f"tree.{s.name}.children", f"{child!r} is also a child of {listed[child]!r}")
            if child not in tree and child not in agents:
                raise ConfigError(path, f"tree.{s.name}.children", f"{child!r} is neither a supervisor nor an agent")
            if child == "root":
                raise ConfigError(path, f"tree.{s.name}.children", "the root supervisor cannot be a child")
            listed[child] = s.name
    clash = set(tree) & set(agents)
    if clash:
        raise ConfigError(path, f"agents.{sorted(clash)[0]}", "a supervisor has the same name")
    if "root" not in tree:
        orphans = tuple(n for n in list(tree) + list(agents) if n not in listed)
        tree["root"] = SupervisorSpec("root", intensity=10, period_s=60.0, children=orphans)
    else:
        orphans = [n for n in list(tree) + list(agents) if n not in listed and n != "root"]
        if orphans:
            raise ConfigError(path, "tree.root.children", f"{orphans[0]!r} is under no supervisor")
    # a cycle would leave some node unreachable from root
    seen, todo = set(), ["root"]
    while todo:
        n = todo.pop()
        if n in seen:
            raise ConfigError(path, f"tree.{n}", "is reached twice: the tree has a cycle")
        seen.add(n)
        if n in tree:
            todo.extend(tree[n].children)
    unreachable = (set(tree) | set(agents)) - seen
    if unreachable:
        raise ConfigError(path, f"tree.{sorted(unreachable)[0]}", "is not reachable from root (cycle)")
    return tree
