"""Real mesh processes, for tests and the chaos suite: run `mesh up` / `mesh node`, read
their output, and end every pid they ever showed.

Every pid a run saw (the launcher's, each node's from its "ready" lines, each sidecar's
from its "started" lines) is killed at the end if still alive. Waits are on output lines and on pidfds, each with a deadline.
A run asked to keep its evidence (after a failed check) keeps its output, config and data
once its processes are gone (scripts/evidence.py); the meshes log at INFO unless MESH_LOG
says otherwise.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import evidence

ROOT = Path(__file__).resolve().parent.parent


def env(extra_path: list[str] | None = None) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([*(extra_path or []), str(ROOT), e.get("PYTHONPATH", "")])
    e.setdefault("MESH_LOG", evidence.LOG_LEVEL)
    return e


class NoSuchLine(Exception):
    pass


class MeshRun:
    """One `mesh up` (or `mesh node`) process tree."""

    READY = re.compile(r"node (\S+) ready \(pid (\d+)")
    STARTED = re.compile(r"\b(?:started|restarted)\b.*\(.*\bpid (\d+)\)")  # sidecars: etcd, the stand-in model
    started: list["MeshRun"] | None = None  # when a list: every run started since (tests set it)

    def __init__(self, *args: str, prefix: list[str] | None = None, env: dict | None = None,
                 cwd: str | os.PathLike | None = None):
        self.args, self.prefix, self.env, self.cwd = args, prefix or [], env, cwd or ROOT
        self.lines: list[str] = []
        self.pids: dict[str, int] = {}
        self.seen: set[int] = set()
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.evidence: Path | None = None   # where this run's evidence goes, once asked for
        self._why = ""
        self._kept = False

    def start(self, wait_for: str | None = "mesh ready", timeout: float = 30) -> "MeshRun":
        if MeshRun.started is not None:
            MeshRun.started.append(self)
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "mesh.cli", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=self.env or env(), cwd=self.cwd,
                                     start_new_session=True)
        self.seen.add(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()
        if wait_for:
            self.wait_for(wait_for, timeout)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                m = self.READY.search(line)
                if m:
                    self.pids[m.group(1)] = int(m.group(2))
                    self.seen.add(int(m.group(2)))
                m = self.STARTED.search(line)
                if m:
                    self.seen.add(int(m.group(1)))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match:
        """Wait for an output line (from line `start` on) matching `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._more_coming()):
                    raise NoSuchLine(f"no line matching {pattern!r} within {timeout}s; output:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.5))

    def _more_coming(self) -> bool:
        return not self.proc.stdout.closed and self.proc.poll() is None

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pids[name]
        os.kill(pid, sig)
        return pid

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM the launcher and wait; then kill whatever is left, by pid."""
        code = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        elif self.proc:
            code = self.proc.returncode
        self.kill_all()
        return code

    def kill_all(self) -> None:
        for pid in self.seen:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
        if self.proc and self.proc.poll() is None:
            self.proc.wait(10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if self.evidence is not None and not self._kept:
            self._keep()

    @property
    def config(self) -> str | None:
        """The config file this run was given (-c/--config), if any."""
        for flag in ("-c", "--config"):
            if flag in self.args[:-1]:
                return self.args[self.args.index(flag) + 1]
        return None

    def keep_evidence(self, why: str, label: str = "mesh") -> Path:
        """Keep this run's output, config and data: now if its processes are gone, else
        when stop() or kill_all() has ended them. Returns the folder (the same each time)."""
        if self.evidence is None:
            self.evidence, self._why = evidence.new_folder(label), why
        if self.proc is not None and self.proc.poll() is not None and not any(alive(p) for p in self.seen):
            self._keep()
        return self.evidence

    def _keep(self) -> None:
        self._kept = True
        with self._cond:
            lines = list(self.lines)
        evidence.keep(self.evidence, lines, self.config, self._why)


def keep_all_evidence(runs: list[MeshRun], why: str, label: str = "mesh") -> list[Path]:
    """keep_evidence() for each run; the folders, for a failure message."""
    return [run.keep_evidence(why, label) for run in runs]


def alive(pid: int) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        ready, _, _ = select.select([fd], [], [], 0)
        return not ready  # a pidfd turns readable when its process has exited
    finally:
        os.close(fd)


def wait_gone(pids, timeout: float = 15) -> list[int]:
    """Wait (on pidfds, no polling) until every pid has exited; returns those still alive."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], remaining)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)
