"""The `mesh` command's quick path (mesh/quick.py): `mesh call` and `mesh status` without
asyncio against a real mesh; a call the quick path hands to the full client (a handler
slower than QUICK_S) keeps its request id and runs once."""

import json
import subprocess
import sys


import mesh
import procs
from mesh.quick import QUICK_S
from procs import mesh_cmd

NO_ASYNCIO = """
import sys
from mesh.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("asyncio" in sys.modules, file=sys.stderr)
"""


def _cli_in_one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_ASYNCIO, *args], capture_output=True, text=True,
                          env=procs.env(), cwd=procs.ROOT, timeout=60)


async def test_call_and_status_take_the_quick_path(local_mesh):
    cfg, _ = local_mesh
    async with mesh.connect(cfg) as m:
        for i in range(3):  # some on the supervisor's node, some elsewhere (a redirect first)
            await m.spawn(f"q{i}", "counter")
    for i in range(3):
        r = _cli_in_one_process("call", "-c", str(cfg), f"q{i}", '{"op": "add", "n": 2}')
        assert r.returncode == 0 and json.loads(r.stdout) == 2, r.stderr
        assert r.stderr.strip() == "False"  # no asyncio imported
    r = _cli_in_one_process("status", "-c", str(cfg))
    assert r.returncode == 0 and all(f"q{i}" in r.stdout for i in range(3)) and r.stderr.strip() == "False"
    r = _cli_in_one_process("call", "-c", str(cfg), "nobody", "{}")
    assert "NoSuchAgent" in r.stderr and r.stderr.strip().endswith("False")


async def test_a_slow_call_is_handed_over_and_runs_once(local_mesh):
    cfg, _ = local_mesh
    async with mesh.connect(cfg) as m:
        await m.spawn("w1", "waiter")
    seconds = QUICK_S + 0.5  # past the quick path's wait: the full client takes over
    r = mesh_cmd("call", "-c", str(cfg), "w1", json.dumps({"op": "slow_add", "seconds": seconds}))
    assert r.returncode == 0 and json.loads(r.stdout) == 1, r.stderr
    r = mesh_cmd("call", "-c", str(cfg), "w1", '{"op": "get"}')
    assert json.loads(r.stdout) == 1  # the repeat with the same id joined the first run
