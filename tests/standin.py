"""The stand-in model server (scripts/llm_server.py) as a real process for tests."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from procs import ROOT, env


class StandIn:
    def __init__(self, *flags: str):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "llm_server.py"), "--port", "0", *flags],
                                     stdout=subprocess.PIPE, text=True, env=env(), start_new_session=True)
        line = self.proc.stdout.readline()  # "listening on URL", or EOF if it failed
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"stand-in did not start: {line!r}")
        self.url = line.split()[-1]
        self.base = self.url.rsplit("/v1", 1)[0]

    def faults(self, **settings) -> None:
        req = urllib.request.Request(self.base + "/admin/faults", json.dumps(settings).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base + "/stats", timeout=5) as r:
            return json.load(r)

    def count(self, key: str) -> int:
        return self.stats()["counts"].get(key, 0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
