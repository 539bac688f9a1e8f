"""The launcher: a small parent that forks node processes and restarts them at once.

It imports everything a node needs (zmq, msgpack, lmdb, httpx, the mesh, the allowed
agent kinds) before it forks, but never creates a ZeroMQ context, an LMDB environment
or an httpx client, so a fork costs milliseconds instead of a new interpreter's 40 ms
of imports. It sees a child's death at once through a pidfd, reaps it, and forks a
new one with a new boot id; the new node tells the supervisor which boot it replaces
and how it ended, so its agents are put back with no wait for heartbeats. Too many
restarts within the configured period and it gives up on that node.

With `[llm] stand_in = true` and nothing answering at the loopback `base_url`, it also
starts the stand-in model server (scripts/llm_server.py) there before the nodes; with
[control] members naming its host, it starts this host's etcd member. Each says so in
one line, is restarted if it dies, and stops after the nodes (`sidecars`).

Each child runs in its own session (its process group is killed as a whole) and holds
one end of a socket pair: it writes status lines ("ready ...", "supervisor-ready") into
it and stops in order when it reads EOF, which is how it learns the launcher is gone.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from . import sidecars, supervision
from .config import Config

log = logging.getLogger("mesh.launcher")

STOP_GRACE_S = 10.0


@dataclass
class Child:
    node: str
    pid: int = 0
    pidfd: int = -1
    control: socket.socket | None = None
    boot: str = ""
    previous: dict | None = None
    history: tuple[float, ...] = ()
    buffer: bytes = b""
    started_at: float = 0.0
    ready: bool = False
    given_up: bool = False
    restarts: int = 0
    why: str = ""  # what the node said when it could not start
    fresh: bool = False  # restarted on request (mesh restart): a new interpreter each time from then on


@dataclass
class Launcher:
    config: Config
    nodes: list[str]
    say: Callable[[str], None] = print
    children: dict[str, Child] = field(default_factory=dict)
    cannot_start: bool = False  # a node said it cannot start as configured: stop, exit 2
    _helpers: list[int] = field(default_factory=list)
    mesh_ready: bool = False     # the supervisor started the tree (once)
    start_failed: str = ""       # the tree could not start: `mesh up` exits 1
    sidecars: list = field(default_factory=list)  # the stand-in model server, this host's etcd member
    leader: str = ""             # the node that said its supervisor is ready, last

    def preimport(self) -> None:
        """Import what nodes need, so a forked child starts with it loaded."""
        from . import serve  # noqa: F401  (pulls in node, supervisor, zmq, lmdb, msgpack)
        for module in ("httpx", "mesh.llm"):
            try:
                importlib.import_module(module)
            except ImportError:
                pass
        for kind, path in self.config.kinds.items():
            module = path.partition(":")[0]
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:  # not written yet: a node imports it when first started
                if exc.name != module.partition(".")[0] and exc.name != module:
                    log.warning("kind %s: module %s cannot be imported: %s", kind, module, exc)
                else:
                    log.info("kind %s: no module %s yet; a node imports it when the kind is first started", kind, module)
            except Exception as exc:  # the node reports it properly when the kind is used
                log.warning("kind %s: module %s cannot be imported: %s", kind, module, exc)
        gc.collect()
        gc.freeze()  # never walked again by a collection: forked nodes share these pages

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or until every node was given up; returns an exit code."""
        _single_threaded()
        self.preimport()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        stopping = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # deaths are read from pidfds
        self._wake_fds = (wake_r, wake_w)
        self._start_sidecars()
        for node in self.nodes:
            self.children[node] = Child(node)
            self._fork(self.children[node])
        self._poller = select.poll()
        self._poller.register(wake_r, select.POLLIN)
        self._registered: set[int] = set()
        try:
            while not stopping:
                for child in self.children.values():
                    for fd in (child.pidfd, child.control.fileno() if child.control else -1):
                        if fd >= 0 and fd not in self._registered:
                            self._poller.register(fd, select.POLLIN)
                            self._registered.add(fd)
                for sidecar in self.sidecars:
                    if sidecar.pidfd >= 0 and sidecar.pidfd not in self._registered:
                        self._poller.register(sidecar.pidfd, select.POLLIN)
                        self._registered.add(sidecar.pidfd)
                if self.cannot_start:
                    self.say("a node cannot start as configured; stopping")
                    return 2
                if all(c.given_up for c in self.children.values()):
                    self.say("every node was given up; stopping")
                    return 1
                if self.start_failed:
                    self.say("the supervision tree could not start; stopping")
                    return 1
                self._reap_helpers()
                for fd, _ in self._poller.poll(1000):
                    if fd == wake_r:
                        _drain(wake_r)
                        continue
                    dead = next((sc for sc in self.sidecars if sc.pidfd == fd), None)
                    if dead is not None:
                        self._forget_fd(fd)
                        self._restart_sidecar(dead)
                        continue
                    for child in list(self.children.values()):
                        if fd == child.pidfd:
                            self._reap(child)
                            break
                        if child.control is not None and fd == child.control.fileno():
                            self._read_status(child)
                            break
            return 0
        finally:
            self.stop()
            self._stop_sidecars()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    # --- sidecars: the stand-in model server, this host's etcd member ----------------------------

    def _start_sidecars(self) -> None:
        """Start what runs beside the nodes (each says in one line what happened)."""
        host = self.config.nodes[self.nodes[0]].host if self.nodes else None
        for sidecar in (sidecars.stand_in(self.config), sidecars.etcd_for_host(self.config, host) if host else None):
            if isinstance(sidecar, str):
                self.say(sidecar)
            elif sidecar is not None:
                why = sidecar.start()
                if why:
                    self.say(f"{sidecar.label} did not start: {why}")  # the nodes start all the same
                    continue
                self.sidecars.append(sidecar)
                self.say(sidecar.started())

    def _restart_sidecar(self, sidecar: sidecars.Sidecar) -> None:
        code = sidecar.reap()
        allowed, sidecar.history = supervision.allow_restart(
            sidecar.history, time.monotonic(), self.config.launcher.max_restarts, self.config.launcher.period_s)
        why = sidecar.start() if allowed else "it exited too often"
        if why:
            self.say(f"{sidecar.label} (pid {sidecar.pid}) exited ({code}); not restarted: {why}")
            self.sidecars.remove(sidecar)
            return
        self.say(f"{sidecar.label} exited ({code}); restarted (pid {sidecar.pid})")

    def _stop_sidecars(self) -> None:
        for sidecar in reversed(self.sidecars):
            sidecar.stop()
        self.sidecars.clear()

    # --- children -------------------------------------------------------------------------------

    def _fork(self, child: Child) -> None:
        parent_end, child_end = socket.socketpair()
        child.boot = os.urandom(6).hex()
        pid = os.fork()
        if pid == 0:  # the node process
            code = 70
            try:
                parent_end.close()
                self._close_inherited(child_end.fileno())
                os.setsid()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                if child.fresh:  # the code on disk, not the code this launcher imported when it began
                    os.set_inheritable(child_end.fileno(), True)
                    os.execv(sys.executable, [sys.executable, "-m", "mesh.fresh", str(self.config.path), child.node,
                                              child.boot, json.dumps(child.previous), str(child_end.fileno())])
                from .serve import configure_logging, run_node
                configure_logging()
                code = run_node(self.config, child.node, child.boot, child.previous, child_end)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        child_end.close()
        child.pid, child.control, child.buffer, child.ready = pid, parent_end, b"", False
        child.pidfd = os.pidfd_open(pid)
        child.started_at = time.monotonic()
        parent_end.setblocking(False)

    def _close_inherited(self, keep: int) -> None:
        """Close the launcher's descriptors in a new child: other nodes' pipes and pidfds."""
        for other in self.children.values():
            for fd in (other.pidfd, other.control.fileno() if other.control else -1):
                if fd >= 0 and fd != keep:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        for sidecar in self.sidecars:
            if sidecar.pidfd >= 0:
                try:
                    os.close(sidecar.pidfd)
                except OSError:
                    pass
        for fd in getattr(self, "_wake_fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass

    def _report_gone(self, child: Child) -> None:
        """Tell the supervisor at once that a node is gone for good, so its agents move
        without waiting for heartbeats. The launcher holds no socket, so a forked helper
        says it (as the node, with the node's key) and exits."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._close_inherited(-1)
                from .serve import report_gone
                code = report_gone(self.config, child.node, child.boot)
            except BaseException:
                pass
            finally:
                os._exit(code)
        self._helpers.append(pid)

    def _reap_helpers(self) -> None:
        for pid in list(self._helpers):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._helpers.remove(pid)

    def _forget_fd(self, fd: int) -> None:
        if fd in self._registered:
            self._poller.unregister(fd)
            self._registered.discard(fd)

    def _reap(self, child: Child) -> None:
        try:
            _, status = os.waitpid(child.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        self._forget_fd(child.pidfd)
        os.close(child.pidfd)
        child.pidfd = -1
        if child.control is not None:
            self._read_status(child)  # its last words (why it could not start) may be unread
            self._forget_fd(child.control.fileno())
            child.control.close()
            child.control = None
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        from .serve import EXIT_CANNOT_START, EXIT_FRESH  # imported already, by preimport
        if code == EXIT_FRESH:  # asked for (mesh restart), so not counted against max_restarts
            child.previous, child.fresh = {"boot": child.boot, "exit": code}, True
            self._fork(child)
            self.say(f"node {child.node} restarted as a new process, as asked (pid {child.pid})")
            return
        if code == EXIT_CANNOT_START:
            child.given_up = self.cannot_start = True
            self.say(f"node {child.node} cannot start{': ' + child.why if child.why else ''}; not restarting it")
            self._report_gone(child)
            return
        self.say(f"node {child.node} (pid {child.pid}) {how}")
        allowed, child.history = supervision.allow_restart(
            child.history, time.monotonic(), self.config.launcher.max_restarts, self.config.launcher.period_s)
        if not allowed:
            child.given_up = True
            self.say(f"node {child.node}: more than {self.config.launcher.max_restarts} restarts in "
                     f"{self.config.launcher.period_s:g}s; not restarting it")
            self._report_gone(child)
            return
        child.previous = {"boot": child.boot, "exit": code}
        child.restarts += 1
        self._fork(child)
        self.say(f"node {child.node} restarted (pid {child.pid})")

    def _read_status(self, child: Child) -> None:
        try:
            data = child.control.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._forget_fd(child.control.fileno())
            return
        child.buffer += data
        while b"\n" in child.buffer:
            line, child.buffer = child.buffer.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if words[:1] == ["ready"]:
                child.ready = True
                took = (time.monotonic() - child.started_at) * 1000
                self.say(f"node {child.node} ready (pid {child.pid}, {took:.0f} ms)")
            elif words[:1] == ["cannot-start"]:
                child.why = " ".join(words[1:])
            elif words[:1] == ["supervisor-ready"]:
                self.leader = child.node  # with [control], the node elected last
                self.mesh_ready = True
                self.say("mesh ready")
            elif words[:1] == ["tree-failed"]:
                why = " ".join(words[1:])
                self.say(f"mesh failed: {why}")
                if not self.mesh_ready:  # OTP fails the start of a tree that cannot start
                    self.start_failed = why

    def stop(self) -> None:
        """Stop every node: the supervisor's first, then the rest; kill what will not stop.

        When this launcher runs every node of the config, the whole mesh stops: the
        supervisor's node is told so ("stop-tree" on its control socket) and terminates
        the agents in reverse start order, supervisor by supervisor, before it stops."""
        live = [c for c in self.children.values() if c.pidfd >= 0]
        if not live:
            return
        first = [c for c in live if c.node == (self.leader or self.config.supervisor_node)]
        whole_mesh = set(self.nodes) == set(self.config.nodes)
        for group in (first, [c for c in live if c not in first]):
            for child in group:
                if whole_mesh and child in first and child.control is not None and _tell(child.control, b"stop-tree\n"):
                    continue
                sidecars.signal_group(child.pid, signal.SIGTERM)
            self._wait_all(group, STOP_GRACE_S)
        for child in live:
            if child.pidfd >= 0:
                self.say(f"node {child.node} did not stop in {STOP_GRACE_S:g}s: killing it")
                sidecars.signal_group(child.pid, signal.SIGKILL)
        self._wait_all(live, 5.0)

    def _wait_all(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for child in children:
            while child.pidfd >= 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready, _, _ = select.select([child.pidfd], [], [], remaining)
                if ready:
                    try:
                        os.waitpid(child.pid, 0)
                    except ChildProcessError:
                        pass
                    os.close(child.pidfd)
                    child.pidfd = -1
                    if child.control is not None:
                        child.control.close()
                        child.control = None


def _tell(control: socket.socket, line: bytes) -> bool:
    try:
        control.sendall(line)
        return True
    except OSError:
        return False


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def host_nodes(config: Config, host: str | None) -> list[str]:
    """The nodes `mesh up` starts: those of `host`, or of the only host."""
    if host is None:
        if len(config.hosts) != 1:
            raise ValueError(f"the config has {len(config.hosts)} hosts: name one with --host")
        host = next(iter(config.hosts))
    if host not in config.hosts:
        raise ValueError(f"no host named {host!r} in the config")
    return [n.name for n in config.nodes_on(host)]


def _single_threaded() -> None:
    """A launcher forks, so it must not have threads (their locks would be copied held)."""
    import threading
    if threading.active_count() > 1:
        raise RuntimeError("the launcher must run in a process without threads")
