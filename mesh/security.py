"""CURVE keys, who may connect, and what each role may ask.

With `cluster.secure = true` every socket is CurveZMQ: traffic is encrypted and every
connection is authenticated. Each node runs a ZAP authenticator on its context before
it binds; the authenticator admits only the public keys the config names (the nodes'
own, and the clients' in [security.clients]) and stamps each connection with a User-Id
"role:name", which the node reads once per connection. An unknown key is refused at the
handshake and logged. CURVE without a ZAP handler would only encrypt and let any key
pair in: the mesh never runs it that way.

Roles:  client  CALL, CAST, INFO, WHEREIS
        admin   and SPAWN, STOP, STATUS
        node    everything (the supervisor's and the nodes' own messages)

Key files are the ZeroMQ certificate format (`NAME.key` public, `NAME.key_secret`
secret). A secret key file that anyone but its owner can read is refused.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from .config import Config
from .errors import ConfigError
from .wire import Kind

log = logging.getLogger("mesh.security")


_CLIENT = frozenset({Kind.CALL, Kind.CAST, Kind.INFO, Kind.WHEREIS, Kind.BATCH})
_ADMIN = _CLIENT | {Kind.SPAWN, Kind.STOP, Kind.STATUS, Kind.UPGRADE, Kind.DRAIN, Kind.RESTART, Kind.INSPECT,
                     Kind.TRACE}
PERMISSIONS = {"client": _CLIENT, "admin": _ADMIN, "node": frozenset(Kind)}


def role_of(identity: str) -> str:
    return identity.partition(":")[0]


def allowed(identity: str, kind: Kind) -> bool:
    return kind in PERMISSIONS.get(role_of(identity), ())


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def create_keypair(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key and NAME.key_secret (owner-only) into `directory`; returns their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def load_keypair(path: str) -> KeyPair:
    """Load a secret key file, refusing one that others can read."""
    try:
        mode = os.stat(path).st_mode
        public, secret = zmq.auth.load_certificate(path)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such key file (create it with `mesh keys`)") from None
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(path, "", f"not a key file: {exc}") from None
    if not secret:
        raise ConfigError(path, "", "holds no secret key (use the .key_secret file)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(path, "", f"key file is readable by others (mode {stat.S_IMODE(mode):o}); "
                                    f"run: chmod 600 {path}")
    return KeyPair(public, secret)


def node_keypair(config: Config, node: str) -> KeyPair:
    path = os.path.join(config.security.keys_dir, f"{node}.key_secret")
    keys = load_keypair(path)
    if keys.public.decode() != config.nodes[node].public_key:
        raise ConfigError(path, "", f"its public key is not the one the config gives node {node!r}")
    return keys


def client_keypair(config: Config, path: str | None = None) -> KeyPair:
    path = path or os.environ.get("MESH_KEY") or config.security.client_key
    if not path:
        raise ConfigError(config.path, "security.client_key",
                          "the cluster is secure: name a client key file (here, with --key, or in $MESH_KEY)")
    return load_keypair(path)


class Security:
    """CURVE settings for one process's sockets: its key pair and its peers' keys."""

    def __init__(self, config: Config, keys: KeyPair):
        self.keys = keys
        self.server_keys = {n.endpoint: n.public_key.encode() for n in config.nodes.values()}

    def server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, endpoint: str) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = self.server_keys[endpoint]


class _Gate:
    """The credentials check the authenticator calls for every CURVE handshake."""

    def __init__(self, peers: dict[str, tuple[str, str]]):
        self.peers = peers
        self.refused = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key.decode() in self.peers:
            return True
        with self._lock:
            self.refused += 1
            n = self.refused
        if n <= 10 or n % 1000 == 0:
            log.warning("refused a connection with an unknown key %s (%d refused so far)", key.decode(), n)
        return False


class Authenticator(ThreadAuthenticator):
    """Admits the config's keys; names each connection "role:name" (its User-Id)."""

    def __init__(self, ctx: zmq.Context, config: Config):
        super().__init__(ctx, log=logging.getLogger("mesh.zap"))
        self.peers = config.security.peers(config.nodes)
        self.gate = _Gate(self.peers)

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", credentials_provider=self.gate)

    def curve_user_id(self, client_public_key: bytes) -> str:
        name, role = self.peers[zmq.utils.z85.encode(client_public_key).decode()]
        return f"{role}:{name}"
