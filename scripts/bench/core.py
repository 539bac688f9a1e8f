"""The mesh's core figures, measured against the project's goals, with raw pyzmq as the floor.

    python3 scripts/bench/core.py                 # full run (a few minutes); prints the table
    python3 scripts/bench/core.py --quick         # smaller sizes, fewer runs
    python3 scripts/bench/core.py --only call     # one benchmark (raw, call, cast, durable, kill, idle)
    python3 scripts/bench/core.py --write         # also rewrite the core section of docs/benchmarks.md
    python3 scripts/bench/core.py --quick --baseline ../prev   # side by side with another checkout

Every mesh is a real `mesh up` of a generated config (free loopback ports, data in a temp
dir), driven through the public client API from this process. The machine is small and
shared, so each figure is measured several times and given as the median with its range;
ratios against raw pyzmq compare figures of the same run. Whatever this script starts it
ends, by pid, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
# the runtime measured: this checkout's, or another's (--baseline runs this script with it)
RUNTIME = Path(os.environ.get("MESH_BENCH_RUNTIME") or ROOT).resolve()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(RUNTIME))

import zmq  # noqa: E402

import mesh  # noqa: E402
from mesh import config as mesh_config, wire  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import evidence  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- core:begin (written by scripts/bench/core.py --write) -->", "<!-- core:end -->"
SCRIPT = "python3 scripts/bench/core.py"
BENCHES = ("raw", "call", "cast", "durable", "kill", "idle", "local", "state")

GET, ADD = {"op": "get"}, {"op": "add", "n": 1}

# Sizes of a full run and of a --quick one.
SIZES = {
    False: dict(runs=5, calls=3000, adds=1000, casts=200_000, durable=30_000, kill_trials=20,
                idle=100_000, idle_budget=120, raw_rt=5000, raw_oneway=300_000, state_bytes=10_000_000,
                state_calls=400),
    True: dict(runs=3, calls=1000, adds=300, casts=50_000, durable=10_000, kill_trials=5,
               idle=10_000, idle_budget=30, raw_rt=2000, raw_oneway=100_000, state_bytes=10_000_000,
               state_calls=200),
}
DURABLE_AGENTS, OUTSTANDING, KILL_AGENTS = 1000, 500, 10

CONFIG = """
[cluster]
name = "bench"
data_dir = "{data}"
call_timeout_s = 10

{limits}
[launcher]
max_restarts = 1000          # the kill benchmark restarts one node many times
period_s = 60

[kinds]
counter = "nodes.counter:Counter"
{kinds}
[hosts.local]
address = "127.0.0.1"

{nodes}
[supervisor]
node = "n1"
dynamic = "sessions"

[tree.sessions]
dynamic = true
intensity = 100
period_s = 10
"""


# --- small helpers ---------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median and range of one figure over several runs."""
    return statistics.median(values), min(values), max(values)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_ports(n: int) -> list[int]:
    """n consecutive free TCP ports on loopback (checked by binding them)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0])
    return out


def _env(log: str | None = None) -> dict:
    """The mesh's environment; its log level explains a lost write (see scripts/evidence.py)."""
    env = dict(os.environ)
    paths = (str(RUNTIME), str(ROOT / "scripts" / "bench"), env.get("PYTHONPATH", ""))  # bench_kinds too
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("MESH_LOG", log or evidence.LOG_LEVEL)
    return env


# --- a real mesh ------------------------------------------------------------------------------

class Mesh:
    """`mesh up` of a generated config in a temp dir; every pid it showed is ended on exit.
    After an error, its output, config and data folder are kept (scripts/evidence.py) and
    the error's message says where."""

    READY = re.compile(r"node (\S+) ready \(pid (\d+)")

    limits = ""  # extra [limits] of every mesh of this run (--dedup-window)
    metrics = False  # every node serves Prometheus metrics (--metrics)

    def __init__(self, nodes: int, kinds: dict[str, str] | None = None, log: str | None = None, label: str = "bench",
                 extra: str = ""):
        """`kinds`: kinds to allow besides the counter, short name -> "module:Class";
        `log`: the mesh's log level unless MESH_LOG sets one; `label` names kept evidence;
        `extra`: more of the config (whole tables, such as [llm])."""
        self.log, self.label = log, label
        self.kept: Path | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
        ports = free_ports(2 * nodes if self.metrics else nodes)
        tables = "".join(f'[nodes.n{i + 1}]\nhost = "local"\nport = {ports[i]}\n'
                         + (f"metrics_port = {ports[nodes + i]}\n" if self.metrics else "") + "\n"
                         for i in range(nodes))
        kinds_text = "".join(f'{k} = "{v}"\n' for k, v in (kinds or {}).items())
        self.config = self.tmp / "bench.toml"
        self.config.write_text(CONFIG.format(data=self.tmp / "data", nodes=tables, limits=self.limits, kinds=kinds_text)
                               + extra)
        self.lines: list[str] = []
        self.pids: dict[str, int] = {}
        self.seen: set[int] = set()
        self.cond = threading.Condition()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Mesh":
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "up", "-c", str(self.config)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=_env(self.log), cwd=RUNTIME, start_new_session=True)
            self.seen.add(self.proc.pid)
            threading.Thread(target=self._read, daemon=True).start()
            self.wait_for("mesh ready", timeout=30)
        except BaseException as exc:  # a mesh that never got ready keeps its evidence too
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                m = self.READY.search(line)
                if m:
                    self.pids[m.group(1)] = int(m.group(2))
                    self.seen.add(int(m.group(2)))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 30) -> re.Match:
        """Wait for an output line from line `start` on matching `pattern`."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-20:])
                    raise TimeoutError(f"mesh: no line matching {pattern!r} within {timeout}s; last lines:\n{tail}")
                self.cond.wait(min(left, 0.5))

    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        """SIGTERM the launcher (it stops its nodes), then kill by pid whatever is left.
        After an error, the mesh's last lines of output go to stderr (they often tell why),
        and its output, config and data are kept; the error's message says where."""
        failed = exc_type is not None and not issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        if failed:
            with self.cond:
                tail = self.lines[-12:]
            say("mesh output before the error:\n  " + "\n  ".join(line[:300] for line in tail))
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.seen:
            if _ours(pid, str(self.config)):
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        break
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.wait(10)
            self.proc.stdout.close()
        if failed:  # an error may bring files of its own to keep (a client's history, say)
            self.keep(f"{exc_type.__name__}: {exc}", exc, getattr(exc, "evidence_files", None))
        shutil.rmtree(self.tmp, ignore_errors=True)

    def keep(self, why: str, exc: BaseException | None = None, extra: dict[str, str] | None = None) -> Path:
        """Keep this mesh's output, config and data (once), and `extra` files (name -> text);
        note where on `exc`. Call it once the mesh is stopped (as __exit__ does)."""
        if self.kept is None:
            with self.cond:
                lines = list(self.lines)
            self.kept = evidence.keep(evidence.new_folder(self.label), lines, self.config, why, extra)
            say(f"mesh evidence kept in {self.kept}")
        if exc is not None:
            evidence.note(exc, self.kept)
        return self.kept


def _ours(pid: int, marker: str) -> bool:
    """Whether pid is still a process of ours (its command line names our config or script)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


# --- the floor: raw pyzmq -----------------------------------------------------------------------

def raw_server(port: int) -> None:
    """A blocking ROUTER in its own process: echoes each message, except that b"count:N"
    makes it swallow the next N messages and answer b"done"."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        route, payload = sock.recv_multipart()
        if payload.startswith(b"count:"):
            for _ in range(int(payload[6:])):
                sock.recv_multipart()
            sock.send_multipart([route, b"done"])
        else:
            sock.send_multipart([route, payload])


def bench_raw(size: dict) -> dict:
    """DEALER->ROUTER round trip and one-way rate with blocking sockets, mesh-sized frames."""
    port = free_ports(1)[0]
    call = wire.encode(wire.Kind.CALL, "a1b2c3d4e5f6-1", "c0", "client:bench:1", 10000, GET, {"inc": 10**9 + 1})
    cast = wire.encode(wire.Kind.CAST, None, "c0", "client:bench:1", None, ADD)
    out = {"rt_p50": [], "rt_p99": [], "oneway": []}
    ctx = zmq.Context()
    server = subprocess.Popen([sys.executable, __file__, "--raw-server", str(port)], env=_env(),
                              start_new_session=True)
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(500):
            sock.send(call)
            sock.recv()
        for run in range(size["runs"]):
            times = []
            for _ in range(size["raw_rt"]):
                t = time.perf_counter()
                sock.send(call)
                sock.recv()
                times.append(time.perf_counter() - t)
            n = size["raw_oneway"]
            t = time.perf_counter()
            sock.send(b"count:%d" % n)
            for _ in range(n):
                sock.send(cast)
            assert sock.recv() == b"done"
            rate = n / (time.perf_counter() - t)
            out["rt_p50"].append(pct(times, 0.5) * 1e6)
            out["rt_p99"].append(pct(times, 0.99) * 1e6)
            out["oneway"].append(rate)
            say(f"raw: run {run + 1}: round trip p50 {out['rt_p50'][-1]:.0f} us, "
                f"p99 {out['rt_p99'][-1]:.0f} us; one-way {rate:,.0f} msg/s")
    finally:
        ctx.destroy(linger=0)
        server.kill()
        server.wait(10)
    return out


# --- goals 1 and 2: call round trip, casts into one node ----------------------------------------

async def _calls(m, name: str, msg: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await m.call(name, msg, timeout=10)
        times.append(time.perf_counter() - t)
    return times


def bench_call(size: dict) -> dict:
    """Sequential calls from this process to a counter on a node of a 3-node mesh."""
    out = {"get_p50": [], "get_p99": [], "add_p50": [], "add_p99": []}

    async def go(cfg):
        async with mesh.connect(cfg) as m:
            placed = [await m.spawn(f"c{i}", "counter") for i in range(3)]
            name = next(p["name"] for p in placed if p["node"] != "n1")  # not on the supervisor's node
            await _calls(m, name, GET, 300)
            for run in range(size["runs"]):
                gets = await _calls(m, name, GET, size["calls"])
                adds = await _calls(m, name, ADD, size["adds"])
                for key, times in (("get", gets), ("add", adds)):
                    out[f"{key}_p50"].append(pct(times, 0.5) * 1e6)
                    out[f"{key}_p99"].append(pct(times, 0.99) * 1e6)
                say(f"call: run {run + 1}: get p50 {out['get_p50'][-1]:.0f} us p99 {out['get_p99'][-1]:.0f} us; "
                    f"add p50 {out['add_p50'][-1]:.0f} us p99 {out['add_p99'][-1]:.0f} us")
            assert await m.call(name, GET) == size["runs"] * size["adds"]

    with Mesh(3, label="bench-call") as mh:
        asyncio.run(go(mh.config))
    return out


def bench_cast(size: dict) -> dict:
    """Casts to one counter in a loop, until a call shows every one of them applied."""
    out = {"rate": [], "lost": [], "n": size["casts"]}

    async def go(cfg):
        async with mesh.connect(cfg) as m:
            placed = [await m.spawn(f"c{i}", "counter") for i in range(3)]
            name = next(p["name"] for p in placed if p["node"] != "n1")
            await m.call(name, GET)
            expected = 0
            for run in range(size["runs"]):
                n = size["casts"]
                t = time.perf_counter()
                for _ in range(n):
                    await m.cast(name, ADD)
                value = await m.call(name, GET, timeout=60)
                took = time.perf_counter() - t
                expected += n
                out["rate"].append(n / took)
                out["lost"].append(expected - value)
                expected = value
                say(f"cast: run {run + 1}: {n / took:,.0f} msg/s end to end"
                    + (f"; {out['lost'][-1]} casts LOST" if out["lost"][-1] else ""))

    with Mesh(3, label="bench-cast") as mh:
        asyncio.run(go(mh.config))
    return out


# --- goal 3: durable calls over 1,000 agents in one node -----------------------------------------

async def _spread(n: int, names: list[str], fn) -> None:
    """Run fn(names[i % len]) for i < n, OUTSTANDING at a time."""
    async def worker(w: int):
        for i in range(w, n, OUTSTANDING):
            await fn(names[i % len(names)])
    await asyncio.gather(*(worker(w) for w in range(min(OUTSTANDING, n))))


def bench_durable(size: dict) -> dict:
    """add calls (fsync'd group commit) spread over 1,000 counters of a single-node mesh."""
    out = {"rate": []}

    async def go(cfg):
        async with mesh.connect(cfg) as m:
            names = [f"d{i}" for i in range(DURABLE_AGENTS)]
            await _spread(len(names), names, lambda name: m.spawn(name, "counter", timeout=30))
            # warm up until every agent's reply window (dedup_window) is full, as in a long life
            warm = (mesh_config.load(cfg).limits.dedup_window + 8) * len(names)
            await _spread(warm, names, lambda name: m.call(name, ADD, timeout=30))
            for run in range(size["runs"]):
                t = time.perf_counter()
                await _spread(size["durable"], names, lambda name: m.call(name, ADD, timeout=30))
                rate = size["durable"] / (time.perf_counter() - t)
                out["rate"].append(rate)
                say(f"durable: run {run + 1}: {rate:,.0f} calls/s over {len(names)} agents")
            values = {}

            async def read(name):
                values[name] = await m.call(name, GET, timeout=30)
            await _spread(len(names), names, read)
            assert sum(values.values()) == warm + size["runs"] * size["durable"], "durable: the counters do not add up"

    with Mesh(1, label="bench-durable") as mh:
        asyncio.run(go(mh.config))
    return out


# --- goal 4: kill -9 of a node until its agents answer again --------------------------------------

def bench_kill(size: dict) -> dict:
    """kill -9 a non-supervisor node of 3; time until each of its agents answers with its state."""
    out = {"first": [], "all": [], "agents": []}

    async def go(mh: Mesh):
        async with mesh.connect(mh.config) as m:
            want: dict[str, int] = {}
            while True:
                name = f"k{len(want)}"
                await m.spawn(name, "counter")
                want[name] = await m.call(name, {"op": "add", "n": len(want) + 1})
                where = await _placement(m, want)
                if max((len(v) for n, v in where.items() if n != "n1"), default=0) >= KILL_AGENTS:
                    break
            for trial in range(size["kill_trials"]):
                where = await _placement(m, want)
                victim = max((n for n in where if n != "n1"), key=lambda n: len(where[n]))
                names = where[victim]
                mark, pid = mh.mark(), mh.pids[victim]
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)

                async def get(name):
                    value = await m.call(name, GET, timeout=15)
                    if value != want[name]:
                        raise AssertionError(f"kill: {name} answered {value}, not {want[name]} (trial {trial + 1}, "
                                             f"{victim} pid {pid} killed; now at {await m.whereis(name)})")
                    return time.perf_counter() - t0
                took = await asyncio.gather(*(get(n) for n in names))
                out["first"].append(min(took) * 1000)
                out["all"].append(max(took) * 1000)
                out["agents"].append(len(names))
                say(f"kill: trial {trial + 1}: {victim} ({len(names)} agents): first {min(took) * 1000:.0f} ms, "
                    f"all {max(took) * 1000:.0f} ms")
                await asyncio.to_thread(mh.wait_for, rf"node {victim} ready", mark, 30)

    with Mesh(3, label="bench-kill") as mh:
        asyncio.run(go(mh))
    return out


async def _placement(m, names) -> dict[str, list[str]]:
    """node -> the names it hosts, as the mesh answers now."""
    where: dict[str, list[str]] = {}
    for name in names:
        body = await m.whereis(name)
        where.setdefault(body.get("node"), []).append(name)
    return where


# --- goal 5: 100,000 idle agents in one node --------------------------------------------------------

def bench_idle(size: dict) -> dict:
    """Spawn many counters into a single-node mesh; the node's resident memory before and after.

    Spawning stops at the time budget if it is reached first: the figure per agent is then
    measured on fewer agents, and the table says so."""
    out = {}

    async def go(mh: Mesh):
        async with mesh.connect(mh.config) as m:
            pid = mh.pids["n1"]
            await m.status()
            before = proc_status(pid)
            n, budget = size["idle"], size["idle_budget"]
            names, done, last = [f"i{i}" for i in range(n)], [], [None]
            t = time.perf_counter()
            stop_at = t + budget if budget > 0 else float("inf")

            async def worker(w: int):
                for i in range(w, n, OUTSTANDING):
                    if time.perf_counter() > stop_at:
                        return
                    await m.spawn(names[i], "counter", timeout=60)
                    done.append(time.perf_counter())
                    last[0] = names[i]
            await asyncio.gather(*(worker(w) for w in range(OUTSTANDING)))
            count, took = len(done), done[-1] - t
            assert await m.call(last[0], GET) == 0
            await asyncio.sleep(1)  # let the node settle: the figure is for idle agents
            after = proc_status(pid)
            tenth = max(1, count // 10)
            out.update(n=n, count=count, before=before, after=after, spawn_s=took, spawn_rate=count / took,
                       first_rate=tenth / (done[tenth - 1] - t),
                       last_rate=tenth / (done[-1] - done[-tenth - 1]) if count > tenth else count / took)
            say(f"idle: {count:,} agents spawned in {took:.1f} s ({count / took:,.0f}/s; first tenth "
                f"{out['first_rate']:,.0f}/s, last tenth {out['last_rate']:,.0f}/s); node RSS "
                f"{before['VmRSS'] / 1024:.0f} MB before, {after['VmRSS'] / 1024:.0f} MB after")

    # WARNING, not INFO: 100,000 spawns would log two lines each and slow the figure measured
    with Mesh(1, log="WARNING", label="bench-idle") as mh:
        asyncio.run(go(mh))
    return out


# --- calls between two agents of one node; reads and changes of a large state --------------------

def bench_local(size: dict) -> dict:
    """Sequential calls from one agent to another in the same node (no socket between them),
    timed inside the calling agent's handler."""
    out = {"p50": [], "p99": []}

    async def go(cfg):
        async with mesh.connect(cfg) as m:
            await m.spawn("target", "counter")
            await m.spawn("pinger", "pinger")
            ping = {"op": "ping", "target": "target", "n": 300}
            await m.call("pinger", ping, timeout=60)
            for run in range(size["runs"]):
                times = await m.call("pinger", dict(ping, n=size["calls"]), timeout=60)
                out["p50"].append(pct(times, 0.5))
                out["p99"].append(pct(times, 0.99))
                say(f"local: run {run + 1}: agent to agent in one node, p50 {out['p50'][-1]:.0f} us "
                    f"p99 {out['p99'][-1]:.0f} us")

    with Mesh(1, kinds={"pinger": "bench_kinds:Pinger"}, label="bench-local") as mh:
        asyncio.run(go(mh.config))
    return out


def bench_state(size: dict) -> dict:
    """A ledger grown to `state_bytes` of values: sequential reads (`len`, a small reply) and
    durable appends of one small item; each a round trip from this process. The floor: the
    same reads of a ledger holding nothing, in the same mesh, interleaved with them."""
    out = {"read_p50": [], "small_p50": [], "append_p50": [], "bytes": size["state_bytes"]}

    async def go(cfg):
        async with mesh.connect(cfg) as m:
            await m.spawn("big", "ledger")
            await m.spawn("small", "ledger")
            chunk, left = 1_000_000, size["state_bytes"]
            while left > 0:
                await m.call("big", {"op": "append", "value": b"x" * min(chunk, left)}, timeout=60)
                left -= chunk
            for run in range(size["runs"]):
                reads = await _calls(m, "big", {"op": "len"}, size["state_calls"])
                small = await _calls(m, "small", {"op": "len"}, size["state_calls"])
                appends = await _calls(m, "big", {"op": "append", "value": 0}, max(5, size["state_calls"] // 4))
                out["read_p50"].append(pct(reads, 0.5) * 1e6)
                out["small_p50"].append(pct(small, 0.5) * 1e6)
                out["append_p50"].append(pct(appends, 0.5) * 1e6)
                say(f"state: run {run + 1}: {size['state_bytes'] / 1e6:g} MB state: read p50 "
                    f"{out['read_p50'][-1]:,.0f} us (empty: {out['small_p50'][-1]:,.0f} us), durable append p50 {out['append_p50'][-1]:,.0f} us")

    with Mesh(1, kinds={"ledger": "nodes.ledger:Ledger"}, label="bench-state") as mh:
        asyncio.run(go(mh.config))
    return out


# --- the table -------------------------------------------------------------------------------------

def fmt_range(values: list[float], unit: str = "", digits: int = 0) -> str:
    med, lo, hi = summary(values)
    f = f"{{:,.{digits}f}}"
    return f"{f.format(med)}{unit} [{f.format(lo)}–{f.format(hi)}]"


def guarded(bench: Callable[..., dict], *args) -> dict | str:
    """bench(*args), or its error as one line (a side-by-side table shows it below)."""
    try:
        return bench(*args)
    except Exception as exc:
        traceback.print_exc()
        return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    """An error as one line of at most 200 characters, plus where its evidence is kept."""
    notes = "".join(f" ({n})" for n in getattr(exc, "__notes__", ()))
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200] + notes


def run_mesh(benches: dict[str, Callable[[dict], dict]], size: dict) -> dict:
    """The mesh side of a side-by-side run; a failed benchmark is recorded as its error."""
    results = {}
    for name, bench in benches.items():
        say(f"--- mesh {name}")
        results[name] = guarded(bench, size)
    return results


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def spread(values: list[float], unit: str) -> str:
    """Median [range] over runs, as in the tables here."""
    if len(values) == 1:
        return f"{number(values[0])} {unit}"
    return f"{number(statistics.median(values))} {unit} [{number(min(values))}–{number(max(values))}]"


def cell(result: dict | str, values: list[float] | None, unit: str, extra: str = "",
         scale: float = 1.0) -> tuple[str, float | None]:
    """A side-by-side table cell, and the median it shows times `scale` (so both sides of
    a ratio share a unit)."""
    if isinstance(result, str):
        return "failed (below)", None
    if not values:
        return "missing", None
    return spread(values, unit) + extra, statistics.median(values) * scale


def verdict(value: float, goal: float, lower_is_better: bool) -> str:
    ok = value <= goal if lower_is_better else value >= goal
    if ok:
        return "met"
    off = (value / goal - 1) if lower_is_better else (1 - value / goal)
    return f"**missed** by {off:.0%}"


def rows(results: dict, q: str) -> list[tuple[str, str, str, str, str]]:
    """(what, figure, goal, verdict, command) per row; failed benchmarks get a row saying so.
    `q` holds the options of this run that a reproducing command needs too."""
    cmd = lambda b: f"`{SCRIPT} --only {b}{q}`"  # noqa: E731
    out = []
    for bench, res in results.items():
        if isinstance(res, str):
            out.append((bench, f"failed: {res}", "", "", cmd(bench)))
    raw, call, cast = results.get("raw"), results.get("call"), results.get("cast")
    raw = raw if isinstance(raw, dict) else None
    if isinstance(call, dict):
        p50 = summary(call["get_p50"])[0]
        out.append(("call round trip, read `get`, p50", fmt_range(call["get_p50"], " µs"), "≤ 250 µs",
                    verdict(p50, 250, True), cmd("call")))
        out.append(("call round trip, read `get`, p99", fmt_range(call["get_p99"], " µs"), "", "", cmd("call")))
        out.append(("call round trip, durable `add`, p50 / p99",
                    f"{fmt_range(call['add_p50'], ' µs')} / {fmt_range(call['add_p99'], ' µs')}", "", "", cmd("call")))
    if isinstance(cast, dict):
        rate = summary(cast["rate"])[0]
        lost = sum(cast["lost"])
        sent = len(cast["rate"]) * cast["n"]
        out.append(("casts into one node, end to end", fmt_range(cast["rate"], " msg/s")
                    + (f"; **{lost:,} of {sent:,} LOST**" if lost else ""), "≥ 150,000 msg/s",
                    "**missed**: casts lost" if lost else verdict(rate, 150_000, False), cmd("cast")))
    durable = results.get("durable")
    if isinstance(durable, dict):
        rate = summary(durable["rate"])[0]
        out.append((f"durable `add` calls over {DURABLE_AGENTS:,} agents in one node, {OUTSTANDING} outstanding",
                    fmt_range(durable["rate"], " calls/s"), "≥ 20,000/s", verdict(rate, 20_000, False), cmd("durable")))
    kill = results.get("kill")
    if isinstance(kill, dict):
        n, agents = len(kill["all"]), statistics.median(kill["agents"])
        p50 = pct(kill["all"], 0.5)
        out.append((f"kill -9 of a node until all its {agents:.0f} agents answer with their state, p50 / p99 of {n} trials",
                    f"{p50:.0f} ms / {pct(kill['all'], 0.99):.0f} ms [{min(kill['all']):.0f}–{max(kill['all']):.0f}]",
                    "p50 ≤ 100 ms", verdict(p50, 100, True), cmd("kill")))
        out.append(("… until the first of them answers, p50 / p99",
                    f"{pct(kill['first'], 0.5):.0f} ms / {pct(kill['first'], 0.99):.0f} ms", "", "", cmd("kill")))
    idle = results.get("idle")
    if isinstance(idle, dict):
        rss, base, count = idle["after"]["VmRSS"], idle["before"]["VmRSS"], idle["count"]
        per = (rss - base) / count
        scaled = "" if count >= 100_000 else f"; {(base + per * 100_000) / 1024:,.0f} MB at 100,000 if linear"
        short = "" if count == idle["n"] else f" (the {idle['n']:,} asked for did not fit the time budget)"
        out.append((f"{count:,} idle agents in one node{short}: node RSS (anon / file)",
                    f"{rss / 1024:,.0f} MB ({idle['after'].get('RssAnon', 0) / 1024:,.0f} / "
                    f"{idle['after'].get('RssFile', 0) / 1024:,.0f}); {per:.2f} KB per agent above the "
                    f"{base / 1024:.0f} MB baseline{scaled}",
                    "≤ 1 GB for 100,000", verdict(base + per * 100_000, 1024 * 1024, True)
                    + (" (extrapolated)" if scaled else ""),
                    cmd("idle") + (" (add `--idle-budget 0` for all of them)" if short else "")))
        out.append((f"… spawning them, {OUTSTANDING} outstanding",
                    f"{idle['spawn_rate']:,.0f} spawns/s ({idle['spawn_s']:.1f} s); first tenth "
                    f"{idle['first_rate']:,.0f}/s, last tenth {idle['last_rate']:,.0f}/s", "", "", cmd("idle")))
    if raw:
        out.append(("raw pyzmq DEALER→ROUTER round trip, blocking echo, p50 / p99",
                    f"{fmt_range(raw['rt_p50'], ' µs')} / {fmt_range(raw['rt_p99'], ' µs')}", "", "", cmd("raw")))
        out.append(("raw pyzmq one-way, blocking", fmt_range(raw["oneway"], " msg/s"), "", "", cmd("raw")))
        if isinstance(call, dict):
            out.append(("ratio mesh `get` p50 / raw round trip p50",
                        f"{summary(call['get_p50'])[0] / summary(raw['rt_p50'])[0]:.1f}×", "", "", f"`{SCRIPT}{q}`"))
        if isinstance(cast, dict):
            out.append(("ratio mesh casts / raw one-way",
                        f"{summary(cast['rate'])[0] / summary(raw['oneway'])[0]:.2f}×", "", "", f"`{SCRIPT}{q}`"))
    return out


def table(results: dict, q: str) -> str:
    lines = ["| what | figure: median [range] over runs | goal | | reproduce |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results, q)]
    return "\n".join(lines)


def machine(load_at_start: float) -> list[str]:
    def first(path: str, key: str) -> str:
        try:
            with open(path) as f:
                return next((l.split(":", 1)[1].strip() for l in f if l.startswith(key)), "?")
        except OSError:
            return "?"
    import lmdb
    import msgpack
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    tmp = tempfile.gettempdir()
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; source: `{rev}`",
        f"cores (nproc): {os.cpu_count()}; CPU: {first('/proc/cpuinfo', 'model name')}; "
        f"memory: {int(first('/proc/meminfo', 'MemTotal').split()[0]) / 2**20:.0f} GB; "
        f"load average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f}",
        f"Linux {platform.release()}; data dirs under {_fs_type(tmp)} (fsync on, the default)",
        f"Python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
        f"lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))}), msgpack {'.'.join(map(str, msgpack.version))}",
    ]


def _fs_type(path: str) -> str:
    """The type of the file system holding `path` (longest mount point in /proc/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return f"a {kind} file system"


def write_doc(text: str) -> None:
    write_section(BEGIN, END, text, "## Core figures")


def write_section(begin: str, end: str, text: str, heading: str) -> None:
    """Replace one section of docs/benchmarks.md (between its markers), or add it under
    `heading`; starts the file if there is none."""
    section = f"{begin}\n{text}\n{end}"
    if DOC.exists():
        old = DOC.read_text()
        if begin in old and end in old:
            new = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
        else:
            new = old.rstrip("\n") + f"\n\n{heading}\n\n{section}\n"
    else:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        new = f"# Benchmarks\n\n{heading}\n\n{section}\n"
    DOC.write_text(new)


def report(results: dict, size: dict, q: str, took: float, load_at_start: float) -> str:
    return "\n".join([
        f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {took / 60:.1f} min in all. "
        f"{size['runs']} runs per figure (kill -9: {size['kill_trials']} trials; idle agents: one spawn of "
        f"{size['idle']:,} at most, {size['idle_budget']:g} s at most)."
        + (f" Config: {Mesh.limits.strip().replace(chr(10), ' ')}." if Mesh.limits else ""),
        "",
        *[f"- {line}" for line in machine(load_at_start)],
        "",
        table(results, q),
    ])


# --- side by side with another checkout --------------------------------------------------------

# (benchmark, figure, what, unit, True when lower is better): the figures a change is judged by
KEY_FIGURES = [
    ("raw", "rt_p50", "raw pyzmq round trip p50", "µs", True),
    ("call", "get_p50", "call `get` p50", "µs", True),
    ("call", "get_p99", "call `get` p99", "µs", True),
    ("call", "add_p50", "call durable `add` p50", "µs", True),
    ("cast", "rate", "casts into one node", "msg/s", False),
    ("durable", "rate", f"durable `add` over {DURABLE_AGENTS:,} agents", "calls/s", False),
    ("kill", "all", "kill -9 until all answer (ms, median)", "ms", True),
    ("idle", "spawn_rate", "spawns into one node", "/s", False),
    ("local", "p50", "call between two agents of one node p50", "µs", True),
    ("state", "read_p50", "read of a 10 MB state p50", "µs", True),
    ("state", "small_p50", "read of an empty state p50 (its floor)", "µs", True),
    ("state", "append_p50", "durable append to a 10 MB state p50", "µs", True),
]


def side_by_side(args, baseline: Path) -> int:
    """Each benchmark on the baseline's runtime, then on this checkout's, alternating, each
    in a process of its own (this script, with MESH_BENCH_RUNTIME naming the runtime);
    prints the medians and the ratio this / baseline."""
    if not (baseline / "mesh" / "__init__.py").is_file():
        say(f"--baseline {baseline}: not a checkout of the mesh (no mesh/__init__.py there)")
        return 2
    flags = [f for f in ("--quick",) if getattr(args, f[2:])] + [
        x for key in ("runs", "idle", "idle_budget", "dedup_window") if getattr(args, key) is not None
        for x in (f"--{key.replace('_', '-')}", f"{getattr(args, key):g}")]
    sides = {"baseline": baseline.resolve(), "this": RUNTIME}
    results: dict[str, dict] = {side: {} for side in sides}
    t, load = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mesh-bench-side-") as tmp:
        for bench in args.only or BENCHES:
            # Whichever side runs second in a pair runs slower (by about 10% for `get`, the
            # same code on both sides): each side runs first in one of two rounds, and a
            # figure's runs from both rounds are pooled.
            for order in (list(sides), list(sides)[::-1]):
                for side in order:
                    runtime = sides[side]
                    say(f"--- {bench} on {side} ({runtime})")
                    out = Path(tmp) / f"{side}-{bench}.json"
                    env = dict(os.environ, MESH_BENCH_RUNTIME=str(runtime))
                    extra = ["--metrics"] if args.metrics and side == "this" else []
                    proc = subprocess.run([sys.executable, __file__, "--only", bench, *flags, *extra,
                                           "--json", str(out)], env=env, cwd=ROOT)
                    got = json.loads(out.read_text()).get(bench) if out.exists() else f"exited {proc.returncode}"
                    results[side][bench] = _pooled(results[side].get(bench), got)
    lines = [f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {(time.monotonic() - t) / 60:.1f} min in all; "
             f"baseline `{_describe(sides['baseline'])}`, this `{_describe(RUNTIME)}`.", "",
             *[f"- {line}" for line in machine(load)], "",
             "| figure: median over runs | baseline | this | this / baseline |", "| --- | --- | --- | --- |"]
    for bench, key, what, unit, lower in KEY_FIGURES:
        a, b = results["baseline"].get(bench), results["this"].get(bench)
        if a is None and b is None:
            continue
        va, vb = _median_of(a, key), _median_of(b, key)
        ratio = f"{vb / va:.2f}× ({'lower' if lower else 'higher'} is better)" if va and vb else ""
        lines.append(f"| {what} | {_shown(a, va, unit)} | {_shown(b, vb, unit)} | {ratio} |")
    print("\n".join(lines))
    return 1 if any(isinstance(r, str) for side in results.values() for r in side.values()) else 0


def _pooled(first, second):
    """Two rounds' results of one benchmark as one: lists of runs joined; a failure wins."""
    if first is None or isinstance(first, str):
        return second if first is None else first
    if isinstance(second, str):
        return second
    return {key: first[key] + second[key] if isinstance(first.get(key), list) and isinstance(second.get(key), list)
            else second.get(key, first.get(key)) for key in first.keys() | second.keys()}


def _median_of(result, key: str) -> float | None:
    if not isinstance(result, dict) or key not in result:
        return None
    value = result[key]
    return statistics.median(value) if isinstance(value, list) and value else (value if isinstance(value, (int, float)) else None)


def _shown(result, value: float | None, unit: str) -> str:
    if isinstance(result, str):
        return f"failed: {result[:80]}"
    return "missing" if value is None else f"{number(value)} {unit}"


def _describe(path: Path) -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=path, capture_output=True,
                              text=True, timeout=10).stdout.strip() or str(path.name)
    except (OSError, subprocess.SubprocessError):
        return path.name


RUNNERS = {"raw": bench_raw, "call": bench_call, "cast": bench_cast, "durable": bench_durable,
           "kill": bench_kill, "idle": bench_idle, "local": bench_local, "state": bench_state}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Progress goes to stderr; the table to stdout.")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and 3 runs (a minute or two)")
    ap.add_argument("--only", action="append", choices=BENCHES, help="run only this benchmark (repeatable)")
    ap.add_argument("--runs", type=int, help="runs per figure (default 5, or 3 with --quick)")
    ap.add_argument("--idle", type=int, help="idle agents to spawn (default 100,000, or 10,000 with --quick)")
    ap.add_argument("--idle-budget", type=float,
                    help="seconds of spawning at most (default 120, or 30 with --quick; 0: no limit)")
    ap.add_argument("--dedup-window", type=int, metavar="N",
                    help="set [limits] dedup_window in every mesh (default: the mesh's own default)")
    ap.add_argument("--metrics", action="store_true",
                    help="every node serves Prometheus metrics (with --baseline: this side only, so that "
                         "--baseline . measures their cost)")
    ap.add_argument("--write", action="store_true", help="rewrite the core section of docs/benchmarks.md")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also measure the runtime of another checkout (say, the previous commit's), each "
                         "benchmark alternating between the two, and print them side by side")
    ap.add_argument("--json", metavar="PATH", help=argparse.SUPPRESS)  # results, for --baseline
    ap.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return 0
    if args.write and (args.only or args.dedup_window is not None or args.metrics):
        ap.error("--write is for a run of every benchmark with the default config: leave out --only, "
                 "--dedup-window and --metrics")
    if args.write and args.baseline:
        ap.error("--write records this checkout alone: leave out --baseline")
    if args.baseline:
        return side_by_side(args, Path(args.baseline))
    Mesh.metrics = args.metrics
    if args.dedup_window is not None:
        Mesh.limits = f"[limits]\ndedup_window = {args.dedup_window}\n"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks end what we started
    size = dict(SIZES[args.quick])
    for key in ("runs", "idle", "idle_budget"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    results: dict = {}
    t, load = time.monotonic(), os.getloadavg()[0]
    for bench in args.only or BENCHES:
        say(f"--- {bench}")
        try:
            results[bench] = RUNNERS[bench](size)
        except Exception as exc:
            traceback.print_exc()
            results[bench] = _one_line(exc)
    q = "".join(f" {flag}" for flag in ("--quick",) if args.quick) + "".join(
        f" --{key.replace('_', '-')} {getattr(args, key):g}" for key in ("runs", "idle", "idle_budget", "dedup_window")
        if getattr(args, key) is not None)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
        return 0
    text = report(results, size, q, time.monotonic() - t, load)
    print(text)
    if args.write:
        write_doc(text)
        say(f"wrote {DOC.relative_to(ROOT)}")
    return 1 if any(isinstance(r, str) for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
