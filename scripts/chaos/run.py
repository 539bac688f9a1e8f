#!/usr/bin/env python3
"""Break the mesh on purpose while clients work on it, then check nothing was lost.

    python3 scripts/chaos/run.py --seconds 60                  # one host, three nodes
    sudo python3 scripts/chaos/run.py --hosts --seconds 60     # three namespaced hosts, replicas = 1
    sudo python3 scripts/chaos/run.py --hosts --minutes 30     # a soak
    sudo python3 scripts/chaos/run.py --hosts --control --seconds 180   # etcd on every host, an elected supervisor
    python3 scripts/chaos/run.py --seconds 30 --unsafe         # with a planted bug: must FAIL
    python3 scripts/chaos/run.py --seconds 90 --hostile        # twice: without, then with a hostile peer

It starts the stand-in model server and a mesh in a fresh folder (var/chaos/RUN, or
--out), spawns ledger, counter and conversation agents, and runs the workload
(scripts/chaos/workload.py) against them while the nemesis (scripts/chaos/nemesis.py)
injects faults on a schedule drawn from --seed. Then it heals everything, lets the
operations in flight finish, reads every agent's final state and hands the record to
the checker (scripts/chaos/check.py), whose verdict it prints; exit status 1 on any
violation. Everything it starts is ended, also on Ctrl-C.

--faults chooses among: kill stop term restart supervisor llm disk, and with --hosts also
cut loss host. The disk fault mounts a small tmpfs for the data (root only).

--control (with --hosts) gives the config a [control] section: each host's `mesh up`
runs an etcd member (TLS, certificates made for the run), every node is a candidate,
and the supervisor is whichever node leads (read from the runs' output: the highest
term said wins). It adds the faults leaderhost (the leader's host killed, kept down
--down seconds), leadercut (the leader's host cut off), etcdkill (kill -9 of one etcd
member) and etcdall (kill -9 of all three at once); "supervisor" faults hit the
current leader, and host may kill any host, the leader's included.

Before it starts anything it asks which of those faults cannot be injected on this
machine (no --hosts, no root, no nft ...): it names them and refuses to start, unless
--skip-missing, which leaves them out and says so in the report. Faults are counted as
attempted and as injected; only injected ones count as faults. A fault still in force
at the end (not healed, or seen on the machine) fails the run.

Besides calls, the workload crashes agents, shares request ids between two clients,
stops and spawns names again (--lifecycle) and keeps more calls outstanding than the
reply window (--window); with --hosts each host's wall clock is skewed (--skew).

Availability: per fault kind, the longest time any agent could not be served while a
fault of that kind was the only one in force; a judged kind whose goal is missed fails
the run (goals in check.py; --judge chooses the kinds, default every kind with a goal,
but disk only with --hosts; the report says "not judged" of the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(HERE)]

import mesh  # noqa: E402
from mesh import etcd_member  # noqa: E402
from mesh.clock import WALL_OFFSET_ENV  # noqa: E402
from mesh.demo import free_ports  # noqa: E402
from mesh.security import create_keypair  # noqa: E402
import check  # noqa: E402
import meshrun  # noqa: E402
import nemesis as nemesis_mod  # noqa: E402
from workload import History, Workload  # noqa: E402

CONFIG = """
[cluster]
name = "chaos"
data_dir = "{data}"
served_log = true
heartbeat_ms = 100
liveness = 8
lease_ms = 500
call_timeout_s = 10
secure = {secure}
unsafe_reply_before_commit = {unsafe}

[store]
replicas = {replicas}

[limits]
dedup_window = {window}   # small: a burst of concurrent calls with retries holds more replies than this

[launcher]
max_restarts = 1000
period_s = 10

{security}

[kinds]
counter = "nodes.counter:Counter"
ledger = "nodes.ledger:Ledger"
conversation = "nodes.conversation:ConversationAgent"

[llm]
base_url = "{llm}"
max_retries = 1
read_timeout_s = 5
breaker_reset_s = 1

{hosts}

[supervisor]
{supervisor_node}dynamic = "sessions"

[tree.sessions]
dynamic = true
intensity = 1000
period_s = 10
"""


CONTROL = """
[control]
members = ["h1", "h2", "h3"]
candidates = ["n1", "n2", "n3"]
tls_dir = "{tls}"
"""

LEADS = re.compile(r"leadership: (\S+) leads, term (\d+)")
ETCD_LINE = re.compile(r"^etcd: member (\S+?):? (.*)$")
ETCD_RUNS = re.compile(r"(?:^started|; restarted) \(pid (\d+)\)$")


class Leaders:
    """Who leads, from the nodes' output: the highest term any "leadership: NODE leads,
    term N" line gave wins. Reads each run's lines once (runs only ever grow)."""

    def __init__(self):
        self.best: tuple[int, str] | None = None
        self._read: dict[int, tuple[object, int]] = {}  # id(run) -> (run, lines read)

    def read(self, runs) -> str | None:
        for run in runs:
            _, done = self._read.get(id(run), (run, 0))
            lines = run.lines[done:]
            for line in lines:
                m = LEADS.search(line)
                if m and (self.best is None or int(m.group(2)) > self.best[0]):
                    self.best = (int(m.group(2)), m.group(1))
            self._read[id(run)] = (run, done + len(lines))
        return self.best[1] if self.best else None


def etcd_pid(lines: list[str], host: str) -> int | None:
    """The pid of `host`'s etcd member as its launcher last told it; None when it said the
    member did not start or was not restarted (or said nothing)."""
    for line in reversed(lines):
        m = ETCD_LINE.match(line)
        if m and m.group(1) == host:
            running = ETCD_RUNS.search(m.group(2))
            return int(running.group(1)) if running else None
    return None


class StandIn:
    def __init__(self, host: str = "127.0.0.1"):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "llm_server.py"), "--port", "0",
                                      "--host", host], stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the stand-in model server did not start: {line!r}")
        self.url = line.split()[-1]

    def faults(self, **settings) -> None:
        import urllib.request
        req = urllib.request.Request(self.url.rsplit("/v1", 1)[0] + "/admin/faults",
                                     json.dumps(settings).encode(), method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


RESTART_TIMEOUT_S = 60.0  # a restart fault: drain, a new process, undrain

class Env:
    """The mesh under test: its processes, its hosts (or none), its stand-in model API."""

    def __init__(self, out: Path, use_hosts: bool, unsafe: bool, disk: bool, window: int = 8,
                 skew: dict[str, float] | None = None, control: bool = False):
        self.out, self.use_hosts, self.disk_dir, self.disk_host = out, use_hosts, None, None
        self.skew = dict(skew or {})  # host -> its wall-clock offset (s), in $MESH_WALL_OFFSET_S
        self.control = control        # [control]: etcd on every host, the supervisor elected
        self.standin = None
        self.runs: dict[str, meshrun.MeshRun] = {}
        self.past: list[meshrun.MeshRun] = []  # runs of hosts killed since (their lines still count)
        self.leaders = Leaders()
        self.hosts = None
        self._supervisor = ("n1", "h1")  # without [control]: the config's supervisor.node
        data = out / "data"
        control_text = ""
        security, hosts_text, secure, self.key = "", "", "false", None
        if use_hosts:
            import hosts as hosts_tool
            net = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
            keys = out / "keys"
            for name in ("n1", "n2", "n3", "admin"):
                create_keypair(str(keys), name)
            self.key = str(keys / "admin.key_secret")
            security = f'[security]\nkeys_dir = "{keys}"\n[security.clients.admin]\nrole = "admin"'
            hosts_text = "\n".join(f'[hosts.h{i}]\naddress = "{net}.{i}"\n[nodes.n{i}]\nhost = "h{i}"\nport = 7101\n'
                                   for i in (1, 2, 3))
            secure = "true"
            if control:
                from mesh.certs import make_all
                make_all(out / "tls", "chaos", {f"h{i}": f"{net}.{i}" for i in (1, 2, 3)})
                control_text = CONTROL.format(tls=out / "tls")
            self.hosts = hosts_tool.Hosts({f"h{i}": f"{net}.{i}" for i in (1, 2, 3)}).create()
            self.standin = StandIn(self.hosts.gateway)  # where the namespaced hosts can reach it
        else:
            self.standin = StandIn()
            ports = free_ports(3)
            hosts_text = '[hosts.local]\naddress = "127.0.0.1"\n' + "\n".join(
                f'[nodes.n{i}]\nhost = "local"\nport = {p}\n' for i, p in enumerate(ports, 1))
            self._supervisor = ("n1", "local")
        if disk:  # the store only: the served records beside it must outlive the mount
            self.disk_host = "local" if not use_hosts else "h2"
            self.disk_dir = data / self.disk_host / "store"
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(self.disk_dir)], check=True)
        self.config = out / "chaos.toml"
        self.config.write_text(textwrap.dedent(CONFIG.format(
            data=data, secure=secure, unsafe=str(unsafe).lower(), replicas=1 if use_hosts else 0,
            security=security, llm=self.standin.url, hosts=hosts_text + control_text, window=window,
            supervisor_node="" if control else 'node = "n1"\n')))

    @property
    def supervisor_node(self) -> str:
        """The node that runs the supervisor role: with [control], whichever leads now (as
        the nodes last said; the highest term wins)."""
        if not self.control:
            return self._supervisor[0]
        return self.leaders.read([*self.past, *list(self.runs.values())]) or "n1"

    @property
    def supervisor_host(self) -> str:
        return self._supervisor[1] if not self.control else f"h{self.supervisor_node[1]}"

    def etcd_hosts(self) -> list[str]:
        return ["h1", "h2", "h3"] if self.control else []

    def etcd_pid(self, host: str) -> int | None:
        run = self.runs.get(host)
        return etcd_pid(list(run.lines), host) if run is not None else None

    def mark_host(self, host: str) -> tuple:
        run = self.runs[host]
        return run, run.mark()

    async def etcd_back(self, host: str, mark: tuple, timeout: float) -> str | None:
        """Wait until `host`'s launcher says it restarted its etcd member after `mark`;
        None, or what went wrong."""
        run, start = mark
        try:
            m = await asyncio.to_thread(run.wait_for, rf"^etcd: member {host} .*(; restarted \(pid|not restarted)",
                                        timeout, start)
        except meshrun.NoSuchLine:
            return f"the etcd member of {host} not restarted within {timeout:g} s"
        return None if "; restarted" in m.group(1) else m.string

    def host_up(self, host: str) -> bool:
        run = self.runs.get(host)
        return run is not None and run.proc is not None and run.proc.poll() is None

    def _env(self, host: str) -> dict:
        e = meshrun.env()
        if self.skew.get(host):
            e[WALL_OFFSET_ENV] = repr(float(self.skew[host]))
        return e

    def start(self) -> None:
        if self.hosts is None:
            self.runs["local"] = meshrun.MeshRun("up", "-c", str(self.config), env=self._env("local")).start(
                "mesh ready", 60)
            return
        if self.control:  # whichever node is elected says "mesh ready" once the tree runs
            for host in ("h1", "h2", "h3"):
                self._start_host(host, f"node n{host[1]} ready")
            self._wait_any("mesh ready", 90)
            return
        for host in ("h2", "h3", "h1"):
            self._start_host(host, "mesh ready" if host == "h1" else f"node n{host[1]} ready")

    def _wait_any(self, pattern: str, timeout: float) -> None:
        """Wait for a line matching `pattern` in any host's output."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        while not any(rx.search(line) for run in list(self.runs.values()) for line in list(run.lines)):
            if time.monotonic() > deadline:
                raise meshrun.NoSuchLine(f"no line matching {pattern!r} from any host within {timeout:g} s")
            time.sleep(0.1)

    def _start_host(self, host: str, wait: str) -> None:
        run = meshrun.MeshRun("up", "-c", str(self.config), "--host", host, env=self._env(host),
                              prefix=["ip", "netns", "exec", self.hosts.ns(host)])
        self.runs[host] = run  # known before it is ready: whatever happens, it is ended with the rest
        run.start(wait, 60)

    def restart_host(self, host: str) -> None:
        """Start a killed host again (its launcher, nodes and sidecars); returns once its
        node is ready. Blocks: the nemesis runs it in a thread."""
        old = self.runs.pop(host)
        old.kill_all()
        self.past.append(old)
        with open(self.out / f"mesh-{host}.log", "a") as f:
            f.write("\n".join(old.lines) + "\n--- host killed ---\n")
        self._start_host(host, f"node n{host[1]} ready")

    def mark(self, node: str) -> tuple:
        run = self._run_of(node)
        return run, run.mark()

    async def back(self, node: str, mark: tuple, timeout: float) -> str | None:
        """Wait until `node` reports ready again after `mark`; None, or what went wrong."""
        run, start = mark
        try:
            await asyncio.to_thread(run.wait_for, rf"node {node} ready \(pid", timeout, start)
        except meshrun.NoSuchLine:
            return f"{node} not ready again within {timeout:g} s"
        return None

    def node_names(self) -> list[str]:
        return ["n1", "n2", "n3"]

    def _run_of(self, node: str) -> meshrun.MeshRun:
        host = "local" if self.hosts is None else f"h{node[1]}"
        run = self.runs.get(host)
        if run is None:
            raise RuntimeError(f"{host} is being started again")
        return run

    def signal_node(self, node: str, sig: int) -> int | None:
        pid = self._run_of(node).pids.get(node)
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return None
        return pid

    def client(self):
        return mesh.connect(self.config, key=self.key)

    async def restart_node(self, node: str) -> str:
        """`mesh restart NODE`: drained, a new process, undrained; what happened, in a few words."""
        async with self.client() as c:
            done = await c.restart(node, timeout=RESTART_TIMEOUT_S)
        if not done["restarted"]:
            raise RuntimeError(f"not restarted: {done['failed'][:3]}")
        return f"pid {done['old_pid']} -> {done['pid']}, {len(done['moved'])} agents moved"

    def stop(self) -> None:
        for run in self.runs.values() if self.control else ():  # at once: none waits on etcd's majority
            if run.proc is not None and run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        for name, run in self.runs.items():
            run.stop(timeout=15)
            with open(self.out / f"mesh-{name}.log", "a") as f:  # after what earlier runs of the host wrote
                f.write("\n".join(run.lines) + "\n")
        if self.hosts is not None:
            self.hosts.destroy()
        if self.standin is not None:
            self.standin.stop()
        if self.disk_dir is not None:
            subprocess.run(["umount", "-l", str(self.disk_dir)], check=False)


async def chaos(args) -> int:
    out = Path(args.out or ROOT / "var" / "chaos" / time.strftime("%Y%m%d-%H%M%S")).resolve()  # the config names it
    if not args.hostile:
        code, _ = await chaos_once(args, out)
        return code
    # the same run twice, back to back: without the hostile peer, then with it
    code, plain = await chaos_once(args, out / "plain")
    if plain is None:
        return code
    code2, hostile = await chaos_once(args, out / "hostile", hostile=True)
    if hostile is None:
        return code2
    lines = ["hostile peer: honest clients' latency, same seed and length, run back to back",
             f"  without  {plain.latency_line()}",
             f"  with     {hostile.latency_line()}  (fuzz_node.py --hostile against {HOSTILE_NODE}; "
             f"its output in hostile/hostile-peer.log)",
             f"  verdicts without {'PASS' if plain.ok else 'FAIL'}, with {'PASS' if hostile.ok else 'FAIL'}"]
    (out / "hostile.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return max(code, code2)


HOSTILE_NODE = "n2"


def start_hostile(env: "Env", out: Path, seconds: float) -> subprocess.Popen:
    """scripts/fuzz_node.py as a hostile peer against one node, for the whole run."""
    argv = [sys.executable, "-u", str(ROOT / "scripts" / "fuzz_node.py"), "-c", str(env.config), "--node", HOSTILE_NODE,
            "--seconds", f"{seconds:g}", "--hostile"]
    if env.key:
        argv += ["--key", env.key]
    log = open(out / "hostile-peer.log", "w")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=meshrun.env(), cwd=ROOT,
                                start_new_session=True)
    finally:
        log.close()


def stop_hostile(proc: subprocess.Popen | None, grace_s: float = 0.0) -> None:
    """End the hostile peer: it ends by itself after its --seconds (a round is bounded);
    whatever still runs after `grace_s` is killed, with its process group."""
    if proc is None:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


async def chaos_once(args, out: Path, hostile: bool = False) -> tuple[int, "check.Report | None"]:
    default = nemesis_mod.EVERY if args.control else nemesis_mod.HOSTS if args.hosts else nemesis_mod.ONE_HOST
    faults = args.faults.split(",") if args.faults else list(default)
    unknown = set(faults) - set(nemesis_mod.EVERY)
    if unknown:
        print(f"chaos: unknown faults {sorted(unknown)}", file=sys.stderr)
        return 2, None
    judged = list(check.JUDGED) if args.judge is None else [k for k in args.judge.split(",") if k and k != "none"]
    if args.judge is None and not args.hosts:
        judged.remove("disk")  # one host has one disk: no other host can take over while it is full
    no_goal = sorted(k for k in judged if check.goal(k) is None)
    if no_goal:
        print(f"chaos: --judge: no goal for {no_goal} "
              f"(goals: {', '.join(f'{k} {v:g} s' for k, v in {**check.GOALS, **check.ROW_GOALS}.items())})",
              file=sys.stderr)
        return 2, None
    if args.control and not args.hosts:
        print("chaos: --control needs --hosts (an etcd member on each of three hosts)", file=sys.stderr)
        return 2, None
    if args.control and etcd_member.binary() is None:
        print("chaos: --control needs etcd (Debian and Ubuntu: apt-get install etcd-server)", file=sys.stderr)
        return 2, None
    root = os.geteuid() == 0
    skipped = nemesis_mod.missing(faults, args.hosts, root, control=args.control)
    if skipped:
        for kind, why in skipped.items():
            print(f"chaos: fault {kind} cannot be injected here: {why}", file=sys.stderr)
        if not args.skip_missing:
            print("chaos: not started (leave those faults out with --faults, or run with --skip-missing)",
                  file=sys.stderr)
            return 2, None
        faults = [f for f in faults if f not in skipped]
        if not faults:
            print("chaos: no fault left to inject", file=sys.stderr)
            return 2, None
    if args.hosts and not root:
        print("chaos: --hosts needs root", file=sys.stderr)
        return 2, None
    out.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60 if args.minutes else args.seconds
    history = History(out / "history.jsonl")
    skew = parse_skew(args.skew, args.hosts)
    history.write(e="run", faults=faults, skipped=skipped, judged=judged, seed=args.seed, seconds=seconds,
                  hosts=args.hosts, control=args.control, dedup_window=args.window, skew=skew,
                  hostile=HOSTILE_NODE if hostile else None)
    env = None
    try:
        env = Env(out, args.hosts, args.unsafe, "disk" in faults, window=args.window, skew=skew, control=args.control)
    except BaseException:
        history.close()
        raise
    print(f"chaos: {seconds:g} s, seed {args.seed}, faults {', '.join(faults)}"
          f"{' (skipped: ' + ', '.join(skipped) + ')' if skipped else ''}, "
          f"{'three namespaced hosts' if args.hosts else 'one host'}"
          f"{' with etcd on each ([control])' if args.control else ''}"
          f"{', wall clocks ' + ', '.join(f'{h} {o:+g} s' for h, o in skew.items()) if skew else ''}; record in {out}")
    nemesis = None
    peer = None
    tasks: list[asyncio.Future] = []
    try:
        env.start()
        async with env.client() as m, env.client() as rival:
            agents = {}
            for i in range(args.agents):
                kind = ("ledger", "counter")[i % 2]
                await m.spawn(f"{kind}-{i}", kind)
                agents[f"{kind}-{i}"] = kind
            for i in range(args.conversations):
                await m.spawn(f"talk-{i}", "conversation", {"keep": 100_000, "window": 6})
                agents[f"talk-{i}"] = "conversation"
            lifecycle = {f"life-{('ledger', 'counter')[i % 2]}-{i}": ("ledger", "counter")[i % 2]
                         for i in range(args.lifecycle)}
            work = Workload(m, history, agents, args.clients, args.seed, rival=rival, lifecycle=lifecycle,
                            crash_rate=args.crash_rate, share_rate=args.share_rate, burst=args.burst)
            every = tuple(float(x) for x in args.every.split(","))
            duration = tuple(float(x) for x in args.duration.split(","))  # straddles the goals (2-3 s)
            down = tuple(float(x) for x in args.down.split(","))
            nemesis = nemesis_mod.Nemesis(env, faults, args.seed, history, interval=every, duration=duration,
                                          concurrent=args.concurrent, down=down)
            if hostile:
                peer = start_hostile(env, out, seconds)
            stop = asyncio.Event()
            runner = asyncio.ensure_future(work.run(stop, settle_s=args.settle))
            faulting = asyncio.ensure_future(nemesis.run(stop))
            tasks += [runner, faulting]
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(min(10, seconds - (time.monotonic() - t0)))
                print(f"  {time.monotonic() - t0:5.0f} s: {work.counts['ok']} acknowledged, "
                      f"{work.counts['retried']} retried attempts, {work.counts['crashes']} crashes, "
                      f"{work.counts['shared']} shared ids, {work.counts['eras']} eras, "
                      f"{nemesis.injected} of {len(nemesis.log)} faults injected", flush=True)
            stop.set()
            await asyncio.to_thread(stop_hostile, peer, 30)  # its own report, when it gets to write it
            peer = None
            await faulting  # every fault healed
            await runner    # operations in flight acknowledged (or given up after --settle)
            final = await work.final_states()
        (out / "final.json").write_text(json.dumps(final))
    finally:
        for task in tasks:  # interrupted: the workload stops writing before its record closes
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_hostile(peer)
        if nemesis is not None:
            await nemesis.cancel()  # heals whatever an interruption left in force
            for text in nemesis.still_in_force():
                history.write(e="in_force", text=text)
        history.close()
        env.stop()
    if nemesis is not None:
        counts = ", ".join(f"{k} {i} of {a}" for k, (a, i) in nemesis.counts().items())
        print(f"chaos: faults injected/attempted: {counts or 'none'}")
    report = check.check(out)
    text = "\n".join(report.lines())
    (out / "report.txt").write_text(text + "\n")
    print(text)
    return (0 if report.ok else 1), report


def parse_skew(text: str | None, hosts: bool) -> dict[str, float]:
    """--skew: "h1=0,h2=600,h3=-300"; default that on three hosts, none on one; "none" for none."""
    if text is None:
        text = "h1=0,h2=600,h3=-300" if hosts else "none"
    if text == "none":
        return {}
    out = {}
    for part in text.split(","):
        host, _, offset = part.partition("=")
        out[host.strip()] = float(offset)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--minutes", type=float, default=None, help="a soak: overrides --seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", default=None, help="comma-separated (default: every one that applies)")
    p.add_argument("--hosts", action="store_true", help="three hosts as network namespaces, replicas = 1 (root)")
    p.add_argument("--control", action="store_true",
                   help="with --hosts: a [control] section (etcd on every host, the supervisor elected), and the "
                        "faults leaderhost, leadercut, etcdkill, etcdall")
    p.add_argument("--down", default="20,40", help="seconds a leaderhost fault keeps the leader's host down: MIN,MAX")
    p.add_argument("--concurrent", type=int, default=1, help="faults that may be active at once")
    p.add_argument("--every", default="1.5,4", help="seconds between faults: MIN,MAX (drawn uniformly)")
    p.add_argument("--duration", default="0.5,5",
                   help="seconds a stop, cut, loss, disk or llm fault lasts, and a host stays down: MIN,MAX")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--agents", type=int, default=12, help="ledgers and counters")
    p.add_argument("--conversations", type=int, default=2)
    p.add_argument("--settle", type=float, default=30.0, help="seconds operations in flight get after the faults end")
    p.add_argument("--lifecycle", type=int, default=2,
                   help="names the workload stops and spawns again, era after era (ledgers and counters)")
    p.add_argument("--burst", type=int, default=24,
                   help="concurrent operations on a lifecycle name in each era (more than --window)")
    p.add_argument("--window", type=int, default=8, help="the mesh's limits.dedup_window (replies kept per agent)")
    p.add_argument("--crash-rate", type=float, default=0.01, help="share of ledger and counter operations that crash it")
    p.add_argument("--share-rate", type=float, default=0.03,
                   help="share of ledger appends whose request id a second client uses too")
    p.add_argument("--skew", default=None,
                   help="wall-clock offsets per host, HOST=SECONDS,... (default with --hosts: h1=0,h2=600,h3=-300; "
                        "'none' for none); one host is called 'local'")
    p.add_argument("--hostile", action="store_true",
                   help="run twice, back to back, the same seed and length: without, then with scripts/fuzz_node.py "
                        "as a hostile peer against one node; report the honest clients' latency of both")
    p.add_argument("--unsafe", action="store_true", help="plant a bug: replies before commits (the checker must FAIL)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out faults that cannot be injected here (else the run refuses to start)")
    p.add_argument("--judge", default=None,
                   help="comma-separated fault kinds whose availability goal decides the verdict "
                        "(default: every kind with a goal, also KIND:supervisor for kill, stop and cut "
                        "of the supervisor's node or host; 'none' for none)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill or timeout clean up as Ctrl-C does
    try:
        return asyncio.run(chaos(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
