"""Faults, alone or mixed, on a seeded schedule: the chaos suite's nemesis.

    kill        kill -9 of a random node (its launcher restarts it)
    stop        SIGSTOP of a random node for a while, then SIGCONT
    term        SIGTERM to a random node: an orderly stop, often mid-handler (its launcher
                restarts it; in force until it is ready again)
    restart     `mesh restart` of a random node: drained (its agents move, with their
                state, between two messages), a new process, undrained; in force until
                the command returns
    supervisor  kill -9 of the supervisor's node
    llm         the model API fails half its requests and slows down
    disk        the data directory runs out of space, then gets it back
    cut         a host cut off from everyone, then healed            (hosts only)
    loss        a host drops a third of its packets, both ways       (hosts only)
    host        every process of a host killed, then the host back   (hosts only)

With --control (an etcd member on every host, the supervisor elected among the nodes):

    leaderhost  every process of the leader's host killed (its etcd member too), the
                host kept down for `down` seconds (20-40 s), then started again
    leadercut   the leader's host cut off from the others (for the drawn duration, at
                least LEADER_CUT_MIN_S: long enough for its term to run out), then healed
    etcdkill    kill -9 of one etcd member (its launcher restarts it: in force until it says so)
    etcdall     kill -9 of all three etcd members at once (in force until every launcher
                has restarted its own)

"The supervisor" is whoever leads now: the environment reads it from the nodes' output
(`supervisor_node`, `supervisor_host`), so `supervisor` kills the current leader's node,
and a kill, stop, term, cut, loss or host that happens to hit it is marked as aimed at
the supervisor. Without --control, `host` spares the supervisor's host (nothing would
take its place); with it, any host may be killed.

Each attempt is one `Fault`. It is written to the history once its outcome is known:
injected (with the time it really came into force, after the action took effect) or
not (with the reason). An injected fault is healed on every path out of it (a
`finally`), and the heal is written with the time it took effect. A kill lasts until
the killed node reports ready again (at most `back_s`). A heal that fails leaves the
fault in force: `in_force()` lists those, and `still_in_force()` looks at the machine
itself (a filler file, a stopped process, a link down, a drop rule) after the run.

`missing()` says, before a run, which kinds cannot be injected on this machine at all.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ONE_HOST = ("kill", "stop", "term", "restart", "supervisor", "llm", "disk")
HOSTS = ONE_HOST + ("cut", "loss", "host")
CONTROL = ("leaderhost", "leadercut", "etcdkill", "etcdall")
EVERY = HOSTS + CONTROL
NEEDS_HOSTS = ("cut", "loss", "host") + CONTROL
AT_SUPERVISOR = ("supervisor", "leaderhost", "leadercut")  # aimed at the supervisor by definition
LEADER_CUT_MIN_S = 2.0   # a leader cut off this long has surely lost its term (lease_s = 1 s)
ETCD_BACK_S = 20.0       # an etcd member's launcher restarts it within this, or something is wrong


def missing(faults, hosts: bool, root: bool, which=shutil.which, control: bool = False) -> dict[str, str]:
    """Why each of `faults` cannot be injected on this machine ({kind: reason}); {} if all can."""
    why = {}
    for kind in faults:
        if kind in CONTROL and not control:
            why[kind] = "needs --control (an etcd member on every host)"
        elif kind in NEEDS_HOSTS and not hosts:
            why[kind] = "needs --hosts (namespaced hosts)"
        elif kind in NEEDS_HOSTS and not root:
            why[kind] = "needs root (network namespaces)"
        elif kind in NEEDS_HOSTS and which("ip") is None:
            why[kind] = "needs iproute2 (the ip command)"
        elif kind == "loss" and which("nft") is None:
            why[kind] = "needs nftables (the nft command)"
        elif kind == "disk" and not root:
            why[kind] = "needs root (it mounts a small tmpfs for the data)"
        elif kind == "disk" and which("mount") is None:
            why[kind] = "needs the mount command"
    return why


def fill(path: Path) -> int:
    """Write zeros to `path` until its filesystem is full; returns the bytes written.

    Unbuffered (os.write), so ENOSPC is raised here and nothing is left to flush at
    close. On any other error the file is removed before the error goes on.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    try:
        block = bytes(1 << 20)
        while True:
            try:
                written += os.write(fd, block)  # a short write at the very end, then ENOSPC
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@dataclass
class Fault:
    id: int
    kind: str
    target: str | None = None
    injected: bool = False
    start: float | None = None   # wall time it came into force
    end: float | None = None     # wall time its heal took effect
    error: str | None = None     # why it was not injected, or why its heal failed
    note: str | None = None
    pid: int | None = None       # stop: the stopped process
    pids: tuple = ()             # etcdkill, etcdall: the killed members' pids
    filler: str | None = None    # disk: the file that fills the disk


class Nemesis:
    def __init__(self, env, faults: list[str], seed: int, history, interval: tuple[float, float] = (1.5, 4.0),
                 duration: tuple[float, float] = (0.5, 2.5), concurrent: int = 1, back_s: float = 10.0,
                 down: tuple[float, float] = (20.0, 40.0)):
        """`down`: how long (drawn) a leaderhost fault keeps the leader's host down."""
        self.env, self.faults, self.history = env, faults, history
        self.rng = random.Random(seed)
        self.interval, self.duration, self.back_s, self.down = interval, duration, back_s, down
        self.slots = asyncio.Semaphore(concurrent)
        self.log: list[Fault] = []
        self.hold = asyncio.sleep  # how a fault is kept in force for its duration (tests replace it)
        self._ids = itertools.count(1)
        self._active: set[asyncio.Task] = set()

    # --- counts -----------------------------------------------------------------------------

    @property
    def injected(self) -> int:
        return sum(f.injected for f in self.log)

    def counts(self) -> dict[str, tuple[int, int]]:
        """{kind: (attempted, injected)}."""
        attempted, injected = Counter(), Counter()
        for f in self.log:
            attempted[f.kind] += 1
            injected[f.kind] += f.injected
        return {k: (attempted[k], injected[k]) for k in sorted(attempted)}

    def in_force(self) -> list[Fault]:
        return [f for f in self.log if f.injected and f.end is None]

    # --- the schedule -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.interval))
                    break
                except asyncio.TimeoutError:
                    pass
                kind = self.rng.choice(self.faults)
                await self.slots.acquire()
                if stop.is_set():  # the run ended while the previous fault held the slot
                    self.slots.release()
                    break
                self.spawn(kind, self.rng.uniform(*self.duration))
            await asyncio.gather(*self._active, return_exceptions=True)
        finally:
            await self.cancel()

    def spawn(self, kind: str, duration: float) -> asyncio.Task:
        task = asyncio.ensure_future(self.one(kind, duration))
        self._active.add(task)
        task.add_done_callback(self._active.discard)
        return task

    async def cancel(self) -> None:
        """End every fault still running now; each heals on its way out."""
        for task in list(self._active):
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)

    async def one(self, kind: str, duration: float) -> Fault:
        fault = Fault(next(self._ids), kind)
        self.log.append(fault)
        try:
            await getattr(self, f"_{kind}")(fault, duration)
        except Exception as exc:  # a fault that could not be made is recorded, not fatal
            if not fault.injected:
                fault.error = f"{type(exc).__name__}: {exc}"[:300]
                self.history.write(e="fault", id=fault.id, fault=kind, target=fault.target, injected=False,
                                   error=fault.error)
        finally:
            self.slots.release()
        return fault

    # --- bookkeeping ------------------------------------------------------------------------

    def _started(self, fault: Fault, target: str) -> None:
        fault.target, fault.injected, fault.start = target, True, time.time()
        # a fault aimed at the supervisor's node or host takes the supervisor away too
        # (the supervisor as known when the fault came into force)
        sup = (fault.kind in AT_SUPERVISOR
               or fault.kind in ("kill", "stop", "term") and target == getattr(self.env, "supervisor_node", None)
               or fault.kind in ("cut", "loss", "host") and target == getattr(self.env, "supervisor_host", None))
        self.history.write(e="fault", id=fault.id, fault=fault.kind, target=target, injected=True, t=fault.start,
                           supervisor=sup)

    def _healed(self, fault: Fault, heal) -> None:
        """Run `heal` (a plain function: it also runs while the task is being cancelled)."""
        try:
            note = heal()
        except Exception as exc:
            fault.error = f"heal failed: {type(exc).__name__}: {exc}"[:300]
            self.history.write(e="heal_failed", id=fault.id, fault=fault.kind, target=fault.target, error=fault.error)
            return
        fault.end, fault.note = time.time(), note
        self.history.write(e="heal", id=fault.id, fault=fault.kind, target=fault.target, t=fault.end,
                           **({"note": note} if note else {}))

    async def _held(self, fault: Fault, target: str, duration: float, heal) -> None:
        """`fault` is in force on `target` now: keep it `duration` seconds, then heal it, on every path."""
        self._started(fault, target)
        try:
            await self.hold(duration)
        finally:
            self._healed(fault, heal)

    async def _healed_off_loop(self, fault: Fault, heal) -> None:
        """`_healed`, with a `heal` that blocks (it waits for processes to start) run in a
        thread, so that the workload goes on meanwhile. Cancelled while it runs, it still
        waits for the heal to finish and records it before the cancellation goes on."""
        box: dict = {}

        def run():
            try:
                box["note"] = heal()
            except Exception as exc:
                box["error"] = exc

        def outcome():
            if "error" in box:
                raise box["error"]
            return box.get("note")

        job = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            await asyncio.shield(job)
        finally:
            if not job.done():
                await asyncio.wait({job})
            self._healed(fault, outcome)

    # --- the faults -------------------------------------------------------------------------

    async def _killed(self, fault: Fault, node: str, sig: int = signal.SIGKILL) -> None:
        mark = self.env.mark(node) if hasattr(self.env, "mark") else None
        if not self.env.signal_node(node, sig):
            raise RuntimeError(f"{node} is not running")
        self._started(fault, node)
        note = None
        try:
            if mark is not None:  # in force until the node's launcher reports it ready again
                note = await self.env.back(node, mark, self.back_s)
        finally:
            self._healed(fault, lambda: note)

    async def _kill(self, fault: Fault, duration: float) -> None:
        await self._killed(fault, self.rng.choice(self.env.node_names()))

    async def _term(self, fault: Fault, duration: float) -> None:
        await self._killed(fault, self.rng.choice(self.env.node_names()), signal.SIGTERM)

    async def _restart(self, fault: Fault, duration: float) -> None:
        node = self.rng.choice(self.env.node_names())
        self._started(fault, node)
        note = None
        try:
            note = await self.env.restart_node(node)
        except Exception as exc:  # a restart that failed is a finding: its heal says so
            note = f"restart failed: {type(exc).__name__}: {exc}"[:300]
        finally:
            self._healed(fault, lambda: note)

    async def _supervisor(self, fault: Fault, duration: float) -> None:
        await self._killed(fault, self.env.supervisor_node)

    async def _stop(self, fault: Fault, duration: float) -> None:
        node = self.rng.choice(self.env.node_names())
        pid = self.env.signal_node(node, signal.SIGSTOP)
        if not pid:
            raise RuntimeError(f"{node} is not running")
        fault.pid = pid

        def heal():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                return "gone before SIGCONT"
        await self._held(fault, node, duration, heal)

    async def _llm(self, fault: Fault, duration: float) -> None:
        self.env.standin.faults(error_rate=0.5, latency_ms=200)
        await self._held(fault, "model API", duration, lambda: self.env.standin.faults(error_rate=0, latency_ms=0))

    async def _disk(self, fault: Fault, duration: float) -> None:
        folder = self.env.disk_dir
        if folder is None:
            raise RuntimeError("the data directory is not on a space-limited mount")
        filler = Path(folder) / "filler"
        fault.filler = str(filler)
        try:
            fill(filler)
        except BaseException:
            filler.unlink(missing_ok=True)
            raise
        if os.statvfs(folder).f_bavail > 0:
            filler.unlink(missing_ok=True)
            raise RuntimeError(f"{folder} still has room after filling it")
        target = getattr(self.env, "disk_host", None) or str(folder)
        await self._held(fault, target, duration, lambda: filler.unlink(missing_ok=True))

    def _hosts(self):
        if self.env.hosts is None:
            raise RuntimeError("this fault needs hosts (run with --hosts)")
        return self.env.hosts

    async def _cut(self, fault: Fault, duration: float) -> None:
        hosts = self._hosts()
        host = self.rng.choice(list(hosts.hosts))
        try:
            hosts.cut(host)
        except BaseException:
            hosts.heal(host)
            raise
        await self._held(fault, host, duration, lambda: hosts.heal(host))

    async def _loss(self, fault: Fault, duration: float) -> None:
        hosts = self._hosts()
        host = self.rng.choice(list(hosts.hosts))
        hosts.loss(host, 33)
        await self._held(fault, host, duration, lambda: hosts.loss(host, 0))

    async def _host(self, fault: Fault, duration: float) -> None:
        hosts = self._hosts()
        spared = None if getattr(self.env, "control", False) else self.env.supervisor_host
        host = self.rng.choice([h for h in hosts.hosts if h != spared] or list(hosts.hosts))
        await self._down(fault, hosts, host, duration)

    async def _down(self, fault: Fault, hosts, host: str, seconds: float) -> None:
        """Kill every process of `host`, keep it down `seconds`, start it again (the fault
        lasts until its node is ready again)."""
        if not hosts.kill(host):
            raise RuntimeError(f"{host} had no processes to kill")
        self._started(fault, host)
        try:
            await self.hold(seconds)
        finally:
            await self._healed_off_loop(fault, lambda: self.env.restart_host(host))

    # --- the control plane's faults (--control) ---------------------------------------------

    async def _leaderhost(self, fault: Fault, duration: float) -> None:
        hosts = self._hosts()
        down = self.rng.uniform(*self.down)  # drawn before any wait: the schedule stays the seed's
        await self._down(fault, hosts, self.env.supervisor_host, down)

    async def _leadercut(self, fault: Fault, duration: float) -> None:
        hosts = self._hosts()
        host = self.env.supervisor_host
        try:
            hosts.cut(host)
        except BaseException:
            hosts.heal(host)
            raise
        await self._held(fault, host, max(duration, LEADER_CUT_MIN_S), lambda: hosts.heal(host))

    async def _etcdkill(self, fault: Fault, duration: float) -> None:
        self._hosts()
        await self._etcd_killed(fault, [self.rng.choice(self.env.etcd_hosts())])

    async def _etcdall(self, fault: Fault, duration: float) -> None:
        self._hosts()
        await self._etcd_killed(fault, list(self.env.etcd_hosts()))

    async def _etcd_killed(self, fault: Fault, members: list[str]) -> None:
        """kill -9 of these hosts' etcd members at once; in force until each one's launcher
        says it restarted it (at most ETCD_BACK_S)."""
        pids = {host: self.env.etcd_pid(host) for host in members}
        if not all(pids.values()):
            raise RuntimeError(f"no etcd member runs on {', '.join(h for h, p in pids.items() if not p)}")
        marks = {host: self.env.mark_host(host) for host in members}
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        fault.pids = tuple(pids.values())
        self._started(fault, ",".join(members))
        notes: list[str] = []
        try:
            for host in members:
                note = await self.env.etcd_back(host, marks[host], ETCD_BACK_S)
                if note:
                    notes.append(note)
        finally:
            self._healed(fault, lambda: "; ".join(notes) or None)

    # --- after the run ----------------------------------------------------------------------

    def still_in_force(self) -> list[str]:
        """Healed faults that the machine still shows (those never healed are `in_force()`)."""
        out = []
        hosts = getattr(self.env, "hosts", None)
        for f in self.log:
            if not f.injected or f.end is None:
                continue
            if f.kind == "disk" and Path(f.filler).exists():
                out.append(f"#{f.id} disk: {f.filler} is still there")
            elif f.kind == "stop" and _stopped(f.pid):
                out.append(f"#{f.id} stop: pid {f.pid} on {f.target} is still stopped")
            elif (f.kind in ("cut", "leadercut") and hosts is not None and f.target in hosts.hosts
                  and _link_down(hosts.veth(f.target))):
                out.append(f"#{f.id} {f.kind}: the link of {f.target} is still down")
            elif f.kind in ("etcdkill", "etcdall") and hasattr(self.env, "etcd_pid"):
                for host in f.target.split(","):
                    pid = self.env.etcd_pid(host)
                    if not pid or not _running(pid):
                        out.append(f"#{f.id} {f.kind}: the etcd member of {host} is not running")
            elif f.kind in ("host", "leaderhost") and hasattr(self.env, "host_up") and not self.env.host_up(f.target):
                out.append(f"#{f.id} {f.kind}: {f.target} was not started again")
            elif f.kind == "loss" and hosts is not None and f.target in hosts.hosts and _dropping(hosts.ns(f.target)):
                out.append(f"#{f.id} loss: {f.target} still drops packets")
        return list(dict.fromkeys(out))


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _link_down(link: str) -> bool:
    r = subprocess.run(["ip", "-o", "link", "show", link], capture_output=True, text=True)
    if r.returncode != 0:
        return False  # gone with its namespace
    flags = r.stdout.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in r.stdout else []
    return "UP" not in flags


def _dropping(ns: str) -> bool:
    if shutil.which("nft") is None:
        return False
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "meshfault"], capture_output=True)
    return r.returncode == 0
