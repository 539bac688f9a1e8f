"""`mesh demo`: conversations that survive a node being killed.

It starts the stand-in model server (or uses --llm-url), a three-node mesh on loopback
in a temporary folder, and one conversation agent per simulated user. The users talk;
part way through, the node holding the most conversations is killed with SIGKILL. The
demo shows each interrupted conversation coming back, checks that every agent still
remembers what its user said before the kill, and ends with a summary. It stops
everything it started, also on Ctrl-C. Exit status 0 means no turn was lost or doubled.
"""

from __future__ import annotations

import asyncio
import os
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
from dataclasses import dataclass, field
from pathlib import Path

from .client import Client
from .config import load
from .errors import CallError

NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Donald", "Frances", "John",
         "Radia", "Leslie", "Niklaus", "Sophie", "Tim", "Whitfield"]
THINGS = ["tea", "chess", "sailing", "jazz", "rust", "mountains", "poetry", "bread", "maps", "kites"]
NOTES = ["the meeting is at noon", "the key is under the mat", "call the plumber", "buy more coffee",
         "the password hint is blue", "water the plants"]

SCRIPT = [
    ("Hello!", None),
    ("My name is {name}.", None),
    ("I like {thing}.", None),
    ("Remember that {note}.", None),
    ("What is my name?", "{name}"),
    ("What do I like?", "{thing}"),
    ("What did I ask you to remember?", "{note}"),
    ("Thanks, that is all.", None),
]

CONFIG = """
[cluster]
name = "demo"
data_dir = "{data}"
heartbeat_ms = 250
liveness = 4
call_timeout_s = 10

[kinds]
conversation = "nodes.conversation:ConversationAgent"

[llm]
base_url = "{llm_url}"
model = "{model}"
read_timeout_s = 30
total_timeout_s = 30

[hosts.local]
address = "127.0.0.1"

{nodes}

[supervisor]
node = "n1"
dynamic = "users"

[tree.users]
dynamic = true
intensity = 100
period_s = 10
"""


def free_ports(n: int) -> list[int]:
    """n free, consecutive TCP ports on loopback (checked by binding each)."""
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
    raise RuntimeError("no free ports on 127.0.0.1")


@dataclass
class User:
    name: str
    agent: str
    lines: list[tuple[str, str | None]]
    done: int = 0
    answers: list[str] = field(default_factory=list)
    remembered: int = 0
    questions: int = 0
    waiting_since: float | None = None
    recovered_in: float | None = None


class Demo:
    def __init__(self, users: int, turns: int, llm_url: str | None, model: str, say=print, keep: bool = False):
        self.n_users, self.turns, self.llm_url, self.model = users, turns, llm_url, model
        self.say, self.keep = say, keep
        self.tmp = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
        self.procs: list[subprocess.Popen] = []
        self.node_pids: dict[str, int] = {}
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.killed: tuple[str, int, list[str]] | None = None
        self.killed_at: float | None = None

    # --- processes ---------------------------------------------------------------------------

    def start_llm(self) -> str:
        script = Path(__file__).resolve().parent.parent / "scripts" / "llm_server.py"
        if not script.exists():
            raise SystemExit("mesh demo: the stand-in model server (scripts/llm_server.py) is not here; "
                             "pass --llm-url URL --model NAME to use a real endpoint")
        proc = subprocess.Popen([sys.executable, str(script), "--port", "0", "--latency-ms", "150"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"mesh demo: the stand-in model server did not start ({line.strip()!r})")
        return line.split()[-1]

    def write_config(self, llm_url: str) -> Path:
        ports = free_ports(3)
        nodes = "\n".join(f'[nodes.n{i + 1}]\nhost = "local"\nport = {p}\n' for i, p in enumerate(ports))
        path = self.tmp / "demo.toml"
        path.write_text(CONFIG.format(data=self.tmp / "data", llm_url=llm_url, model=self.model, nodes=nodes))
        return path

    def start_mesh(self, config: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "up", "-c", str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        self.procs.append(proc)
        threading.Thread(target=self._read_mesh, args=(proc,), daemon=True).start()
        if not self.ready.wait(30):
            raise SystemExit("mesh demo: the mesh did not come up within 30 s:\n" + "\n".join(self.lines))

    def _read_mesh(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip())
            m = re.search(r"node (\S+) ready \(pid (\d+)", line)
            if m:
                self.node_pids[m.group(1)] = int(m.group(2))
            if "mesh ready" in line:
                self.ready.set()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        for pid in self.node_pids.values():  # a node outlives its launcher only if something broke
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the conversations -------------------------------------------------------------------

    async def run(self) -> int:
        llm_url = self.llm_url or self.start_llm()
        config = self.write_config(llm_url)
        self.say(f"model API: {llm_url} ({'stand-in' if not self.llm_url else self.model})")
        self.start_mesh(config)
        cfg = load(config)
        self.say(f"mesh up: 3 nodes on 127.0.0.1:{cfg.nodes['n1'].port}-{cfg.nodes['n3'].port}, data in {self.tmp}")
        rng = random.Random(7)
        users = []
        async with Client(cfg) as mesh:
            for i in range(self.n_users):
                name = NAMES[i % len(NAMES)]
                facts = {"name": name, "thing": rng.choice(THINGS), "note": rng.choice(NOTES)}
                lines = [(text.format(**facts), None if check is None else check.format(**facts))
                         for text, check in (SCRIPT * (self.turns // len(SCRIPT) + 1))[:self.turns]]
                user = User(name, f"user-{i + 1}", lines)
                placed = await mesh.spawn(user.agent, "conversation",
                                          {"system": f"You are {name}'s assistant. Be brief."})
                users.append(user)
                self.say(f"  spawned {user.agent} ({name}) on {placed['node']}")
            t0 = time.monotonic()
            progress = asyncio.ensure_future(self._progress(users))
            total = self.n_users * self.turns
            kill_at = max(1, int(total * 0.4))
            await asyncio.gather(*(self._talk(mesh, u, users, kill_at) for u in users))
            progress.cancel()
            elapsed = time.monotonic() - t0
            return await self._summary(mesh, users, elapsed)

    async def _talk(self, mesh: Client, user: User, users: list[User], kill_at: int) -> None:
        for i, (text, expect) in enumerate(user.lines):
            if self.killed is None and sum(u.done for u in users) >= kill_at:
                await self._kill(mesh)
            rid = f"{user.agent}-turn-{i}"
            while True:
                try:
                    reply = await mesh.call(user.agent, {"op": "say", "text": text}, timeout=10, request_id=rid)
                    break
                except CallError as err:  # the node was killed under it: the same id again is safe
                    if user.waiting_since is None:
                        user.waiting_since = time.monotonic()
                    self.say(f"  {user.agent}: {type(err).__name__}, retrying turn {i + 1} with the same request id")
            if user.waiting_since is not None or (self.killed and user.agent in self.killed[2] and user.recovered_in is None):
                since = user.waiting_since or self.killed_at
                user.recovered_in = time.monotonic() - since
                user.waiting_since = None
                self.say(f"  {user.agent} answered again after {user.recovered_in * 1000:.0f} ms, "
                         f"remembering {2 * i} earlier messages")
            user.done += 1
            user.answers.append(reply["reply"])
            if expect is not None:
                user.questions += 1
                user.remembered += expect.lower() in reply["reply"].lower()

    async def _kill(self, mesh: Client) -> None:
        self.killed = ("?", 0, [])  # claimed before the await, so only one user kills
        status = await mesh.status()
        holding: dict[str, list[str]] = {}
        for a in status["agents"]:
            if a["node"] and a["node"] != "n1":  # leave the supervisor's node alone; any works
                holding.setdefault(a["node"], []).append(a["name"])
        node = max(holding, key=lambda n: len(holding[n])) if holding else "n2"
        pid = self.node_pids[node]
        self.killed = (node, pid, holding.get(node, []))
        self.killed_at = time.monotonic()
        self.say(f"kill -9 node {node} (pid {pid}), which holds {', '.join(holding.get(node, [])) or 'nothing'}")
        os.kill(pid, signal.SIGKILL)

    async def _progress(self, users: list[User]) -> None:
        total = self.n_users * self.turns
        while True:
            await asyncio.sleep(0.5)
            done = sum(u.done for u in users)
            self.say(f"  ... {done}/{total} turns answered")

    def play(self) -> int:
        """Run the scene; its exit status. Whatever it started is stopped, Ctrl-C too."""
        try:
            return asyncio.run(self.run())
        except KeyboardInterrupt:
            self.say("interrupted")
            return 130
        finally:
            self.stop()

    def summary(self, rows: list[tuple[str, str]]) -> None:
        """The closing table: one row per figure, names aligned."""
        self.say("")
        self.say("summary")
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.say(f"  {key.ljust(width)}  {value}")

    async def _summary(self, mesh: Client, users: list[User], elapsed: float) -> int:
        lost = doubled = 0
        for user in users:
            history = await mesh.call(user.agent, {"op": "history"})
            said = [m["content"] for m in history if m["role"] == "user"]
            expected = [text for text, _ in user.lines]
            lost += sum(1 for t in expected if t not in said)
            doubled += len(said) - len(set(said)) if len(set(expected)) == len(expected) else max(0, len(said) - len(expected))
        status = await mesh.status()
        restarts = sum(a["restarts"] for a in status["agents"])
        recovered = [u.recovered_in for u in users if u.recovered_in is not None]
        questions = sum(u.questions for u in users)
        remembered = sum(u.remembered for u in users)
        turns = sum(u.done for u in users)
        rows = [
            ("conversations", f"{len(users)}"),
            ("turns answered", f"{turns} in {elapsed:.1f} s"),
            ("node killed", f"{self.killed[0]} (pid {self.killed[1]}), holding {len(self.killed[2])} conversations"
             if self.killed else "none"),
            ("agent restarts", f"{restarts}"),
            ("time to recover", f"{statistics.median(recovered) * 1000:.0f} ms median, {max(recovered) * 1000:.0f} ms max"
             if recovered else "-"),
            ("memory checks", f"{remembered}/{questions} answers used earlier turns"),
            ("turns lost", f"{lost}"),
            ("turns doubled", f"{doubled}"),
        ]
        self.summary(rows)
        ok = lost == 0 and doubled == 0 and remembered == questions and turns == len(users) * self.turns
        self.say("\nall conversations intact" if ok else "\nSOMETHING WAS LOST: see above")
        return 0 if ok else 1


def run(users: int = 6, turns: int = 8, llm_url: str | None = None, model: str = "stand-in",
        keep: bool = False, say=print) -> int:
    return Demo(users, turns, llm_url, model, say, keep).play()
