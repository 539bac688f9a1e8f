"""The body of a node process: build the node (and the supervisor role if it is its
node), serve until told to stop, then stop in order.

A node stops in order on SIGTERM or SIGINT, and when its launcher goes away (the
control socket it got from the launcher reads EOF), so no node outlives its launcher.
When a launcher stops the whole mesh it tells the supervisor's node ("stop-tree" on
that socket), which first terminates every agent in reverse start order, supervisor by
supervisor, then stops itself.
A watchdog thread kills the process if its loop stops turning for `WATCHDOG_S`
(a handler that never returns): the launcher then restarts it and the supervisor
puts its agents back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

import zmq

from .clock import wall_offset
from . import collector, logs, otel
from .config import Config
from .errors import ConfigError, StoreError
from .network import ZmqNetwork
from .node import Node
from .security import Authenticator, Security, node_keypair
from .supervisor import SupervisorRole

log = logging.getLogger("mesh.serve")

WATCHDOG_S = 30.0
STALL_WARN_S = 0.5        # a loop held this long is logged with its stack ...
STALL_LOG_EVERY_S = 10.0  # ... at most this often
STOP_TREE_S = 6.0  # an orderly stop of the whole tree, within the launcher's grace (10 s)
RESTART_LINGER_S = 0.1  # a node asked to restart lets its answer leave before it stops (sockets close with linger 0)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold() -> None:
    """Give large blocks back to the system when they are freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB),
    after which blocks of that size come from the heap and stay in the process: a burst
    of messages near the size limit (libzmq allocates each one) would leave the node
    hundreds of MB larger for good. A fixed threshold keeps blocks over 1 MiB in mmap.
    Nothing happens where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def configure_logging(level: str | None = None) -> None:
    level = level or os.environ.get("MESH_LOG", "WARNING")
    offset = wall_offset()
    make = logging.getLogRecordFactory()
    if offset and not getattr(make, "skewed", False):  # once: a forked node inherits its launcher's
        def skewed(*args, **kwargs):  # log lines carry this host's wall clock, as its served records do
            record = make(*args, **kwargs)
            record.created += offset
            record.msecs = (record.created - int(record.created)) * 1000
            return record
        skewed.skewed = True
        logging.setLogRecordFactory(skewed)
    kind = os.environ.get("MESH_LOG_FORMAT", "text").lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(kind))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), handlers=[handler])
    if kind not in logs.FORMATS:
        logging.getLogger("mesh").warning("MESH_LOG_FORMAT=%s is not one of %s: logging text", kind,
                                          ", ".join(logs.FORMATS))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per etcd request otherwise


def node_network(config: Config, name: str) -> ZmqNetwork:
    """A node's sockets: CURVE with a ZAP authenticator when the cluster is secure."""
    limits = config.limits
    if not config.secure:
        return ZmqNetwork(limits.max_message_bytes, limits.batch, out_limit=limits.peer_out_bytes)
    keys = node_keypair(config, name)
    return ZmqNetwork(limits.max_message_bytes, limits.batch, Security(config, keys),
                      authenticator=lambda ctx: Authenticator(ctx, config), out_limit=limits.peer_out_bytes)


MIN_FILES = 1024  # descriptors a node wants: one per connection, plus the store's and its own


def raise_file_limit() -> None:
    """Raise this process's descriptor limit to its hard limit. With too few, a flood of
    connections makes ZeroMQ's accept fail with EMFILE and its I/O thread spin, and
    legitimate handshakes go unanswered: a limit too low to serve is said at start."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536),
                                                        hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ValueError, OSError):
            pass
    if soft < MIN_FILES:
        log.warning("this process may open only %d files (ulimit -n); a node wants at least %d, one per "
                    "connection: raise the hard limit (ulimit -Hn, or LimitNOFILE= under systemd)", soft, MIN_FILES)


def report_gone(config: Config, name: str, boot: str, timeout_s: float = 2.0) -> int:
    """Say GOODBYE to the supervisor for a node that died and will not be restarted.
    With [control] there is nothing to say: its lease in etcd runs out on its own."""
    if config.control is not None:
        return 0
    import zmq
    from . import wire
    from .wire import Kind
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if config.secure:
            Security(config, node_keypair(config, name)).client(sock, config.nodes[config.supervisor_node].endpoint)
        sock.connect(config.nodes[config.supervisor_node].endpoint)
        sock.send(wire.encode(Kind.GOODBYE, os.urandom(6).hex(), None, f"node:{name}", int(timeout_s * 1000),
                              {"node": name, "boot": boot}))
        return 0 if sock.poll(int(timeout_s * 1000)) else 1
    finally:
        sock.close(0)
        ctx.term()


EXIT_CANNOT_START = 78  # EX_CONFIG: this node cannot start here as configured; restarting will not help
EXIT_FRESH = 76  # asked to restart (mesh restart): its launcher starts a new interpreter, not a fork


class CannotStart(Exception):
    """The node cannot start on this machine as configured (its port is taken, its data
    directory cannot be written): one line for the user, and no restart."""


def run_node(config: Config, name: str, boot: str, previous: dict | None, control: socket.socket | None) -> int:
    """Run one node until it stops; returns the process exit code."""
    logs.set_node(name)
    otel.configure_from_env(name)
    fix_mmap_threshold()
    raise_file_limit()
    collector.tune()
    try:
        return asyncio.run(_serve(config, name, boot, previous, control))
    except CannotStart as exc:
        try:  # the launcher says it, once; without one, the log does
            control.sendall(f"cannot-start {exc}\n".encode())
        except (OSError, AttributeError):
            log.error("node %s cannot start: %s", name, exc)
        return EXIT_CANNOT_START
    except Exception:
        log.exception("node %s failed", name)
        return 70


async def _serve(config: Config, name: str, boot: str, previous: dict | None, control: socket.socket | None) -> int:
    loop = asyncio.get_running_loop()
    network = node_network(config, name)

    def notify(line: str) -> None:
        if control is not None:
            try:
                control.sendall(line.encode() + b"\n")
            except OSError:
                pass

    try:
        node = Node(config, name, network, boot=boot, previous=previous, notify=notify)
    except StoreError as exc:
        network.close()
        raise CannotStart(f"{exc} (check [cluster] data_dir in {config.path})") from None
    except ConfigError as exc:  # found only on this host (its TLS files for etcd, say)
        network.close()
        raise CannotStart(str(exc)) from None
    stop = asyncio.Event()
    whole_mesh = []  # the launcher said the whole mesh stops: the supervisor stops the tree first
    fresh = []       # asked to restart: stop in order, exit so that the launcher execs a new node
    if control is not None:
        node.on_restart = lambda: (fresh.append(True), loop.call_later(RESTART_LINGER_S, stop.set))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if control is not None:
        control.setblocking(False)

        def on_control() -> None:
            try:
                data = control.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the launcher is gone
                loop.remove_reader(control.fileno())
                stop.set()
            elif b"stop-tree" in data.split(b"\n"):
                whole_mesh.append(True)
                stop.set()
        loop.add_reader(control.fileno(), on_control)
    watchdog = _Watchdog(loop, WATCHDOG_S, name)
    collector.watch(loop)
    exporter = None
    try:
        try:
            await node.start()
        except zmq.ZMQError as exc:
            raise CannotStart(f"cannot listen on {node.endpoint}: {exc.strerror}"
                              f"{' (another process holds the port)' if exc.errno == errno.EADDRINUSE else ''}"
                              ) from None
        if node.spec.metrics_port:
            exporter = _metrics(node, loop)
        if config.control is not None:  # elected in etcd: the role comes with a term
            node.on_elected = lambda records: SupervisorRole(node, records, control=node.control)
        elif name == config.supervisor_node:
            SupervisorRole(node)
        await stop.wait()
    finally:
        watchdog.stop()
        if exporter is not None:
            exporter[0].shutdown()
        if node.supervisor is not None and whole_mesh:
            await node.supervisor.stop_tree(STOP_TREE_S)
        await node.shutdown(whole_mesh=bool(whole_mesh))
        network.close()
    return EXIT_FRESH if fresh else 0


def _metrics(node: Node, loop: asyncio.AbstractEventLoop):
    from . import metrics  # prometheus-client is imported only by nodes that serve metrics
    try:
        return metrics.serve(node, loop)
    except OSError as exc:
        raise CannotStart(f"cannot serve metrics on {node.spec.address}:{node.spec.metrics_port}: {exc.strerror}"
                          f"{' (another process holds the port)' if exc.errno == errno.EADDRINUSE else ''}") from None
    except ConfigError as exc:
        raise CannotStart(str(exc)) from None


class _Watchdog:
    """Kills this process if the loop has not turned for `limit` seconds, and logs where
    the loop is held when it has not turned for `STALL_WARN_S` (at most once per
    `STALL_LOG_EVERY_S`): a stall longer than a lease makes nodes drop their agents, and
    the stack is what says which handler did it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float, name: str):
        self.loop, self.limit, self.name = loop, limit, name
        self.beat = time.monotonic()
        self.every = min(limit / 10, STALL_WARN_S / 5)
        self._stop = threading.Event()
        self._tick()
        threading.Thread(target=self._watch, name="mesh-watchdog", daemon=True).start()

    def _tick(self) -> None:
        self.beat = time.monotonic()
        if not self._stop.is_set():
            self.loop.call_later(self.every, self._tick)

    def _watch(self) -> None:
        reported_beat, reported_at = None, -1e9
        while not self._stop.wait(self.every):
            beat = self.beat
            stuck = time.monotonic() - beat
            if stuck > self.limit:
                log.critical("node %s: event loop stuck for %.1fs (a handler that never returns?): killing it; "
                             "the loop's thread is at:\n%s", self.name, stuck, self._where())
                os.kill(os.getpid(), signal.SIGKILL)
            elif (stuck > STALL_WARN_S + self.every and beat != reported_beat
                  and time.monotonic() - reported_at > STALL_LOG_EVERY_S):
                reported_beat, reported_at = beat, time.monotonic()
                log.warning("node %s: event loop held for %.2fs so far, at:\n%s", self.name, stuck, self._where())

    @staticmethod
    def _where() -> str:
        frame = sys._current_frames().get(threading.main_thread().ident)
        return "".join(traceback.format_stack(frame)[-8:]).rstrip() if frame is not None else "(no stack)"

    def stop(self) -> None:
        self._stop.set()
