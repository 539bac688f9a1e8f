"""`mesh demo --scene pool`: a pool of embedding models that keeps serving through a kill -9.

It builds the small real model of scripts/make_model.py, starts a three-node mesh on
loopback in a temporary folder, and spawns a process group of three `local_embedder`
agents, one per node. Callers embed sentences through the group; part way through, the
node of one member is killed with SIGKILL. The group passes over it at once (the calls
are marked idempotent: an embedding may be computed twice), the member is restarted and
loads its model again, and the summary says how many texts were embedded, how many
calls failed (none, or the demo fails) and the longest wait for an answer after the
kill. It ends with a check that the vectors mean something: a question finds the
sentence on its topic. Needs the `serving` extra.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .client import Client
from .config import load
from .demo import Demo, free_ports
from .errors import CallError

CONFIG = """
[cluster]
name = "demo-pool"
data_dir = "{data}"
heartbeat_ms = 250
liveness = 4
call_timeout_s = 10

[kinds]
local_embedder = "nodes.local_embedder:LocalEmbedder"

[hosts.local]
address = "127.0.0.1"

{nodes}

[supervisor]
node = "n1"
dynamic = "pools"

[tree.pools]
dynamic = true
intensity = 100
period_s = 10
"""

SENTENCES = [
    "a storm with thunder and heavy rain", "cold wind and snow in the mountains", "the sun is hot today",
    "the server crashed with an error", "python code with a bug in the loop", "the laptop needs more memory",
    "fresh bread and cheese for lunch", "a bowl of hot soup", "the football match ended in a draw",
    "she plays the piano and the guitar",
]
QUESTION, TOPIC = "will it rain with thunder tonight", "a storm with thunder and heavy rain"


class PoolDemo(Demo):
    def __init__(self, callers: int, seconds: float, say=print, keep: bool = False):
        super().__init__(0, 0, None, "", say, keep)
        self.callers, self.seconds = callers, seconds

    def build_model(self) -> Path:
        script = Path(__file__).resolve().parent.parent / "scripts" / "make_model.py"
        out = self.tmp / "model"
        done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit("mesh demo --scene pool needs the serving extra (pip install -e '.[serving]'): "
                             + (done.stderr.strip().splitlines() or ["make_model.py failed"])[-1])
        return out

    def write_config(self, _llm_url: str = "") -> Path:
        ports = free_ports(3)
        nodes = "\n".join(f'[nodes.n{i + 1}]\nhost = "local"\nport = {p}\n' for i, p in enumerate(ports))
        path = self.tmp / "demo.toml"
        path.write_text(CONFIG.format(data=self.tmp / "data", nodes=nodes))
        return path

    async def run(self) -> int:
        model = self.build_model()
        config = self.write_config()
        self.start_mesh(config)
        cfg = load(config)
        self.say(f"mesh up: 3 nodes on 127.0.0.1:{cfg.nodes['n1'].port}-{cfg.nodes['n3'].port}, data in {self.tmp}")
        async with Client(cfg) as mesh:
            members = await mesh.spawn_group("embed", "local_embedder", 3, {"model_dir": str(model), "batch_size": 32,
                                                                            "batch_timeout_ms": 2})
            for m in members:
                self.say(f"  spawned {m['name']} on {m['node']}")
            victim = next(m for m in members if m["node"] != "n1")  # leave the supervisor's node alone
            done: list[float] = []
            failed: list[str] = []
            stop = asyncio.Event()

            async def caller(i: int) -> None:
                while not stop.is_set():
                    try:
                        await mesh.call_group("embed", {"text": SENTENCES[i % len(SENTENCES)]}, idempotent=True)
                        done.append(time.monotonic())
                    except CallError as err:
                        failed.append(f"{type(err).__name__}: {err}")
                    i += self.callers
            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(caller(i)) for i in range(self.callers)]
            await asyncio.sleep(self.seconds * 0.4)
            pid = self.node_pids[victim["node"]]
            self.say(f"kill -9 node {victim['node']} (pid {pid}), which holds {victim['name']}")
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(self.seconds * 0.6)
            stop.set()
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
            after = [killed] + sorted(t for t in done if t >= killed)
            gap = max(b - a for a, b in zip(after, after[1:])) if len(after) > 1 else float("inf")
            back = await self._back(mesh, victim["name"])
            question, *texts = await mesh.call_group("embed", {"texts": [QUESTION, *SENTENCES]}, idempotent=True)
            nearest = max(range(len(texts)), key=lambda k: sum(x * y for x, y in zip(question, texts[k])))
        rows = [
            ("pool", "embed: 3 local_embedder agents, one per node"),
            ("texts embedded", f"{len(done):,} in {elapsed:.1f} s by {self.callers} callers"),
            ("node killed", f"{victim['node']} (pid {pid}), holding {victim['name']}"),
            ("longest wait after", f"{gap * 1000:.0f} ms"),
            ("failed calls", f"{len(failed)}"),
            (f"{victim['name']} now", back),
            ("nearest to the question", f"{SENTENCES[nearest]!r}"),
        ]
        self.summary(rows)
        for why in failed[:3]:
            self.say(f"  failed: {why}")
        ok = not failed and SENTENCES[nearest] == TOPIC and done
        self.say("\nthe pool served every call" if ok else "\nSOMETHING FAILED: see above")
        return 0 if ok else 1

    async def _back(self, mesh: Client, name: str) -> str:
        """Where the killed member runs again, once it does (it may take a few seconds)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            member = next(m for m in await mesh.members("embed") if m["name"] == name)
            if member["status"] == "running":
                return f"running on {member['node']}, restarted {member['restarts']} time(s)"
            await asyncio.sleep(0.2)
        return "not running again within 20 s"


def run(callers: int = 16, seconds: float = 4.0, keep: bool = False, say=print) -> int:
    return PoolDemo(callers, seconds, say, keep).play()
