"""Side by side: the mesh's core shapes and the same shapes in Erlang/OTP, on one machine.

    python3 scripts/bench/beam.py            # core.py's full sizes (a minute or two)
    python3 scripts/bench/beam.py --quick    # core.py's quick sizes
    python3 scripts/bench/beam.py --write    # also rewrite its section of docs/benchmarks.md

The Erlang side is scripts/bench/beam_bench.erl, compiled with erlc into a temp dir and run
by `erl` as a node on loopback, with its own epmd; it starts a second node with `peer` for
the cross-node call. The mesh side is core.py's bench_call, bench_cast and bench_kill, in
the same run and with the same sizes. The shapes are alike, not equal: the table's notes say
how. Whatever this script starts (epmd, erl, the peer node) it ends, by pid, also on an
error or Ctrl-C. Needs erl, erlc and epmd (Debian: erlang-nox).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

from core import (SIZES, bench_call, bench_cast, bench_kill, bench_local, cell, free_ports, guarded, machine, number,  # noqa: E402
                  pct, run_mesh, say, write_section)

BEGIN, END = "<!-- beam:begin (written by scripts/bench/beam.py --write) -->", "<!-- beam:end -->"
SCRIPT = "python3 scripts/bench/beam.py"
MODULE = HERE / "beam_bench.erl"
ERLANG_TOOLS = ("erl", "erlc", "epmd")
MESH_BENCHES = {"call": bench_call, "local": bench_local, "cast": bench_cast, "kill": bench_kill}


# --- the Erlang side ------------------------------------------------------------------------------

def missing_erlang() -> list[str]:
    return [tool for tool in ERLANG_TOOLS if shutil.which(tool) is None]


def compile_module(out: Path) -> None:
    done = subprocess.run(["erlc", "-o", str(out), str(MODULE)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"erlc failed: {(done.stdout + done.stderr).strip()}")


def processes_named(marker: str) -> list[int]:
    """Pids whose command line holds `marker` (our unique node name): the erl node and its
    peer, which `peer` starts in a session of its own, out of reach of our process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def end_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


class Epmd:
    """An epmd of our own, on a free loopback port, ended on exit.

    `erl -sname` otherwise starts the system's epmd (port 4369) as a daemon that outlives
    the run and is shared with every other Erlang node of the machine; this one is ours to
    end. Nodes find it through ERL_EPMD_PORT and start none themselves (-start_epmd false).
    An epmd on 4369 that `pgrep -af epmd` shows after a run is someone else's: that is normal."""

    def __init__(self):
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Epmd":
        self.proc = subprocess.Popen(["epmd", "-port", str(self.port), "-address", "127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_until_listening()
        except BaseException:
            end_process(self.proc)
            raise
        return self

    def _wait_until_listening(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"epmd did not listen on port {self.port}")
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        end_process(self.proc)


def erl_command(node: str, cookie: str, code_dir: Path, size: dict) -> list[str]:
    sizes = [size["calls"], size["adds"], size["casts"], size["kill_trials"], size["runs"]]
    return ["erl", "-noshell", "-sname", f"{node}@localhost", "-setcookie", cookie, "-start_epmd", "false",
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}",  # distribution on loopback only
            "-pa", str(code_dir), "-run", "beam_bench", "main", *map(str, sizes)]


def run_erlang(size: dict, timeout: float) -> dict:
    """Compile and run beam_bench; its figures as {name: [value per run]}, plus "info"."""
    node = f"beam_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="mesh-beam-") as tmp, Epmd() as epmd:
        compile_module(Path(tmp))
        env = {**os.environ, "ERL_EPMD_PORT": str(epmd.port)}
        proc = subprocess.Popen(erl_command(node, secrets.token_hex(16), Path(tmp), size), cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"erl did not finish within {timeout:g} s") from None
        finally:
            end_process(proc)
            end_leftovers(node)
    results = parse(out)
    if proc.returncode != 0 or "error" in results:
        raise RuntimeError(f"erl exited with {proc.returncode}: {results.get('error') or out[-500:]}")
    return results


def end_leftovers(node: str) -> None:
    """Kill what is left of this run's nodes (the peer halts by itself when its origin goes;
    this is for when it does not), and say if anything survives."""
    for pid in processes_named(node):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    if processes_named(node):
        say(f"beam: processes of node {node} are still there: {processes_named(node)}")


def parse(out: str) -> dict:
    """`result NAME VALUE UNIT` lines into {NAME: [VALUE, ...]}; `info`/`error` lines kept whole."""
    results: dict = {}
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "result":
            name, value, _unit = rest.split()
            results.setdefault(name, []).append(float(value))
        elif kind in ("info", "error"):
            results[kind] = rest
    return results


# --- the table -----------------------------------------------------------------------------------------

def ratio(mesh_value: float | None, erl_value: float | None, higher_is_better: bool) -> str:
    """How many times slower the mesh is: mesh/Erlang for times, Erlang/mesh for rates."""
    if not mesh_value or not erl_value:
        return ""
    return number(erl_value / mesh_value if higher_is_better else mesh_value / erl_value) + "×"


def rows(erl: dict | str, mesh: dict) -> list[tuple[str, str, str, str]]:
    """(shape, Erlang, mesh, ratio) per row."""
    call, local, cast, kill = (mesh.get(name, "not run") for name in ("call", "local", "cast", "kill"))
    e, calls, locals_, casts, kills = (r if isinstance(r, dict) else {} for r in (erl, call, local, cast, kill))
    out = []

    def row(shape, erl_cell, mesh_cell, higher_is_better=False):
        (ec, ev), (mc, mv) = erl_cell, mesh_cell
        out.append((shape, ec, mc, ratio(mv, ev, higher_is_better)))

    for op in ("get", "add"):
        for q in ("p50", "p99"):
            row(f"call round trip, `{op}`, {q}", cell(erl, e.get(f"call_{op}_{q}"), "µs"),
                cell(call, calls.get(f"{op}_{q}"), "µs"))
    for q in ("p50", "p99"):
        row(f"call from one process (agent) to another in one VM (node), `get`, {q}",
            cell(erl, e.get(f"call_get_{q}"), "µs", " (the `get` above)"), cell(local, locals_.get(q), "µs"))
    for q in ("p50", "p99"):
        row(f"call to another OS process on loopback, `get`, {q}", cell(erl, e.get(f"remote_get_{q}"), "µs"),
            cell(call, calls.get(f"get_{q}"), "µs", " (the `get` above)"))
    lost = sum(casts.get("lost", []))
    row("casts into one server, end to end", cell(erl, e.get("cast_rate"), "msg/s"),
        cell(cast, casts.get("rate"), "msg/s", f"; **{lost:,} LOST**" if lost else ""), higher_is_better=True)
    for q, frac in (("p50", 0.5), ("p99", 0.99)):
        first = [pct(kills["first"], frac)] if kills else None
        every = f" (all {statistics.median(kills['agents']):.0f}: {pct(kills['all'], frac):,.0f} ms)" if kills else ""
        row(f"killed, until it answers again, {q}", cell(erl, e.get(f"restart_{q}"), "µs", scale=1e-3),
            cell(kill, first, "ms", every))
    return out


def failures(erl: dict | str, mesh: dict) -> list[str]:
    named = {"Erlang": erl, **{f"mesh {name}": r for name, r in mesh.items()}}
    return [f"- {name} failed: {r}" for name, r in named.items() if isinstance(r, str)]


def table(erl: dict | str, mesh: dict) -> str:
    lines = ["| shape | Erlang/OTP | mesh | mesh slower by |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(erl, mesh)]
    return "\n".join(lines)


NOTES = """\
How to read it: figures are the median [range] over runs (kill rows: p50/p99 over all
trials). "mesh slower by" is mesh/Erlang for times and Erlang/mesh for rates. The shapes
are alike, not equal:

- **call**: an Erlang call here is a message between two processes of one VM. Every mesh
  call, `get` included, leaves the client's OS process over ZeroMQ on TCP loopback for a
  node's, and comes back: its nearest Erlang shape is the call to another node.
- **`add`**: the mesh commits the new state to LMDB with fsync (a group commit) before it
  replies; Erlang's state is a term in the process's heap, gone with the VM.
- **casts**: Erlang's are sends inside one VM; the mesh's are encoded (msgpack) and batched
  over ZeroMQ from another OS process. Both end with a call whose reply counts them all.
- **killed**: in Erlang, `exit(Pid, kill)` of one process in a live VM, restarted by its
  one_for_one supervisor with fresh in-memory state (its count starts again at 0). In the
  mesh, `kill -9` of a whole node, an OS process with several agents: its launcher starts
  it again, the supervisor places the agents again and each reloads its last committed
  state from disk; the figure is the first of them to answer, all of them in parentheses.
- **in one VM (node)**: the mesh's call from an agent to another agent of the same node,
  timed inside the calling agent's handler: no socket, the message and the reply packed
  and unpacked once each (the copy that isolation needs), the call's deadline and its
  request id kept as for any call.
- **the Erlang node to node call**: a second node started with `peer`, Erlang distribution
  over TCP on loopback, its own epmd."""


def report(erl: dict | str, mesh: dict, size: dict, took: float, load: float) -> str:
    info = erl.get("info", "Erlang/OTP: ?") if isinstance(erl, dict) else "Erlang/OTP: ?"
    return "\n".join([
        f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {took / 60:.1f} min in all. {size['runs']} runs of "
        f"{size['calls']:,} `get` / {size['adds']:,} `add` calls and {size['casts']:,} casts each; "
        f"{size['kill_trials']} kills.",
        "",
        *[f"- {line}" for line in machine(load)],
        f"- {info}",
        "",
        table(erl, mesh),
        *failures(erl, mesh),
        "",
        NOTES,
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Progress goes to stderr; the table to stdout.")
    ap.add_argument("--quick", action="store_true", help="core.py's quick sizes (about half a minute)")
    ap.add_argument("--write", action="store_true", help="rewrite the beam section of docs/benchmarks.md")
    args = ap.parse_args()
    missing = missing_erlang()
    if missing:
        print(f"beam: {', '.join(missing)} not found: install Erlang/OTP (Debian: apt-get install erlang-nox)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks end what we started
    size = dict(SIZES[args.quick])
    t, load = time.monotonic(), os.getloadavg()[0]
    try:
        say("--- erlang")
        erl = guarded(run_erlang, size, 120 if args.quick else 600)
        mesh = run_mesh(MESH_BENCHES, size)
    except KeyboardInterrupt:
        say("beam: interrupted")
        return 130
    text = report(erl, mesh, size, time.monotonic() - t, load)
    print(text)
    if args.write:
        write_section(BEGIN, END, text, "## Side by side: the BEAM")
        say("wrote docs/benchmarks.md")
    return 1 if isinstance(erl, str) or any(isinstance(r, str) for r in mesh.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
