"""Side by side: the mesh's call and kill -9 shapes and the same shapes with Ray actors, on one machine.

    python3 scripts/bench/rayside.py            # core.py's full sizes (a few minutes)
    python3 scripts/bench/rayside.py --quick    # core.py's quick sizes
    python3 scripts/bench/rayside.py --write    # also rewrite its section of docs/benchmarks.md

The Ray side is a local Ray that this script starts (`ray.init` with 2 CPUs and no
dashboard, in a temp dir of its own, with an auth token of its own rather than one saved in
~/.ray), driven from this process: a counter actor for the calls, a second one with
unlimited restarts for kill -9. The mesh side is core.py's bench_call and bench_kill, in
the same run and with the same sizes. The shapes are alike, not equal: the table's notes
say how. Whatever Ray starts (gcs_server, raylet, agents, workers) ray.shutdown ends, and
what survives it is killed by pid, also on an error or Ctrl-C.

Ray is not a dependency of the project (`pip install ray`); without it the script says so
and stops, and --write records that in the section. The file is not named ray.py: it
would shadow the ray package.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

from core import SIZES, bench_call, bench_kill, cell, guarded, machine, pct, run_mesh, say, write_section  # noqa: E402

BEGIN, END = "<!-- ray:begin (written by scripts/bench/rayside.py --write) -->", "<!-- ray:end -->"
HEADING = "## Side by side: Ray"
SCRIPT = "python3 scripts/bench/rayside.py"
MESH_BENCHES = {"call": bench_call, "kill": bench_kill}
WARMUP_CALLS = 300  # as core.py's bench_call
KILL_PAUSE_S = 2.0
KILL_DEADLINE_S = 60.0


def exit_on_sigterm() -> None:
    """SIGTERM as an exit with 143, so the finally blocks end what we started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# --- the Ray side ---------------------------------------------------------------------------------

def import_ray():
    """The ray module, or the reason it cannot be imported (it is optional)."""
    try:
        import ray
        return ray
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]


@contextlib.contextmanager
def ray_environment():
    """Ray's settings for this run, in the environment its processes inherit, restored after.
    Ray reads them when it is imported, so the import goes inside too.

    Left alone, a new local Ray saves a token to ~/.ray/auth_token and reports usage
    statistics; a token in the environment keeps its default (token auth) without either."""
    wanted = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def processes_of(tmp: str) -> list[int]:
    """Pids of this run's Ray: their command line or an open file names its temp dir.

    Workers rename themselves (`ray::Counter`), so their command line no longer says; their
    log files under the temp dir do. The raylet puts each worker in a process group of its
    own, out of reach of ours."""
    marker, pids = tmp.encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes() or any(
                    os.readlink(fd).startswith(tmp) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    return total / 1024


def end_ray(ray, tmp: str, grace: float = 10) -> None:
    """ray.shutdown, then kill by pid what is left of this run's Ray, and say if anything survives."""
    try:
        ray.shutdown()
    except Exception:
        traceback.print_exc()
    deadline = time.monotonic() + grace
    while processes_of(tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_of(tmp)
    if left:
        say(f"ray: killing what ray.shutdown left: {left}")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    if processes_of(tmp):
        say(f"ray: processes of {tmp} are still there: {processes_of(tmp)}")
    shutil.rmtree(tmp, ignore_errors=True)


def counter_class(ray):
    """nodes.counter's get and add, as a Ray actor; `pid` finds its worker process to kill."""

    class Counter:
        def __init__(self):
            self.n = 0

        def get(self) -> int:
            return self.n

        def add(self, n: int = 1) -> int:
            self.n += n
            return self.n

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(Counter)


def timed_calls(ray, method, n: int, *args) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        ray.get(method.remote(*args), timeout=10)
        times.append(time.perf_counter() - t)
    return times


def ray_calls(ray, actor, size: dict) -> dict:
    """Sequential `ray.get(actor.method.remote())` from this process, as bench_call does for the mesh."""
    out = {"get_p50": [], "get_p99": [], "add_p50": [], "add_p99": []}
    timed_calls(ray, actor.get, WARMUP_CALLS)
    for run in range(size["runs"]):
        gets = timed_calls(ray, actor.get, size["calls"])
        adds = timed_calls(ray, actor.add, size["adds"], 1)
        for key, times in (("get", gets), ("add", adds)):
            out[f"{key}_p50"].append(pct(times, 0.5) * 1e6)
            out[f"{key}_p99"].append(pct(times, 0.99) * 1e6)
        say(f"ray call: run {run + 1}: get p50 {out['get_p50'][-1]:.0f} us p99 {out['get_p99'][-1]:.0f} us; "
            f"add p50 {out['add_p50'][-1]:.0f} us p99 {out['add_p99'][-1]:.0f} us")
    assert ray.get(actor.get.remote()) == size["runs"] * size["adds"]
    return out


def retryable(ray) -> tuple[type, ...]:
    names = ("RayActorError", "ActorUnavailableError", "GetTimeoutError")  # not every version has all three
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))


def first_answer(ray, actor, t0: float) -> tuple[int, float]:
    """Call `get` until it succeeds; its value and the time since t0. Ray retries the call
    itself (max_task_retries=-1); this loop is for the errors it raises anyway."""
    while True:
        try:
            value = ray.get(actor.get.remote(), timeout=KILL_DEADLINE_S)
            return value, time.perf_counter() - t0
        except retryable(ray) as exc:
            if time.perf_counter() - t0 > KILL_DEADLINE_S:
                raise TimeoutError(f"the actor did not answer within {KILL_DEADLINE_S:g} s of its kill") from exc
            time.sleep(0.001)


def ray_kill(ray, counter, size: dict) -> dict:
    """kill -9 of the actor's worker process; time until a call succeeds, and what state it answers with."""
    out = {"ms": [], "before": [], "after": []}
    actor = counter.options(max_restarts=-1, max_task_retries=-1).remote()
    for trial in range(size["kill_trials"]):
        before = ray.get(actor.add.remote(trial + 1), timeout=30)
        pid = ray.get(actor.pid.remote(), timeout=30)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        after, took = first_answer(ray, actor, t0)
        new_pid = ray.get(actor.pid.remote(), timeout=30)
        assert new_pid != pid, f"ray kill: pid {pid} answered after its kill"
        out["ms"].append(took * 1000)
        out["before"].append(before)
        out["after"].append(after)
        say(f"ray kill: trial {trial + 1}: pid {pid} -> {new_pid}: {took * 1000:.0f} ms; "
            f"state {before} before, {after} after")
        time.sleep(KILL_PAUSE_S)  # for Ray to start its idle workers again, as core.py waits for the node
    ray.kill(actor)
    return out


def run_ray(ray, size: dict) -> dict:
    """Start a local Ray, run both benchmarks, end it; figures as in core.py, plus "info".
    A failed benchmark is recorded as its error; a Ray that does not start fails them all."""
    tmp = tempfile.mkdtemp(prefix="mesh-ray-")
    try:
        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _temp_dir=tmp)
        init_s = time.perf_counter() - t
        exit_on_sigterm()  # ray.init put its own in place
        counter = counter_class(ray)
        actor = counter.remote()
        ray.get(actor.get.remote(), timeout=60)
        procs = processes_of(tmp)
        results = {"info": dict(version=ray.__version__, init_s=init_s, procs=len(procs), rss_mb=rss_mb(procs))}
        say(f"ray: started in {init_s:.1f} s; {len(procs)} processes, {rss_mb(procs):,.0f} MB RSS in all")
        results["call"] = guarded(ray_calls, ray, actor, size)
        ray.kill(actor)
        results["kill"] = guarded(ray_kill, ray, counter, size)
    finally:
        end_ray(ray, tmp)
    return results


# --- the table -----------------------------------------------------------------------------------------

def ratio(mesh_value: float | None, ray_value: float | None) -> str:
    """mesh/Ray: above 1 the mesh takes longer, below 1 Ray does."""
    if not mesh_value or not ray_value:
        return ""
    r = mesh_value / ray_value
    return (f"{r:,.0f}" if r >= 10 else f"{r:.1f}" if r >= 1 else f"{r:.2g}") + "×"


def restarted_with(counts: list[int]) -> str:
    """What the restarted actors answered: `0 every time` when none kept its state."""
    return f"{counts[0]} every time" if len(set(counts)) == 1 else f"{min(counts)}–{max(counts)}"


def rows(ray_results: dict | str, mesh: dict, q: str) -> list[tuple[str, str, str, str, str]]:
    """(shape, mesh, Ray, ratio, reproduce) per row."""
    call, kill = (mesh.get(name, "not run") for name in ("call", "kill"))
    ray_call, ray_kill = ((ray_results.get(name, "not run") if isinstance(ray_results, dict) else ray_results)
                          for name in ("call", "kill"))
    calls, kills, r_calls, r_kills = (r if isinstance(r, dict) else {} for r in (call, kill, ray_call, ray_kill))
    reproduce = f"`{SCRIPT}{q}`"
    out = []

    def row(shape, mesh_cell, ray_cell):
        (mc, mv), (rc, rv) = mesh_cell, ray_cell
        out.append((shape, mc, rc, ratio(mv, rv), reproduce))

    for op in ("get", "add"):
        for q_ in ("p50", "p99"):
            row(f"call round trip, `{op}`, {q_}", cell(call, calls.get(f"{op}_{q_}"), "µs"),
                cell(ray_call, r_calls.get(f"{op}_{q_}"), "µs"))
    for q_, frac in (("p50", 0.5), ("p99", 0.99)):
        first = [pct(kills["first"], frac)] if kills else None
        every = f" (all {statistics.median(kills['agents']):.0f}: {pct(kills['all'], frac):,.0f} ms)" if kills else ""
        lost = f" (count after the restart: {restarted_with(r_kills['after'])})" if r_kills else ""
        row(f"kill -9, until a call succeeds, {q_}", cell(kill, first, "ms", every),
            cell(ray_kill, [pct(r_kills["ms"], frac)] if r_kills else None, "ms", lost))
    return out


def failures(ray_results: dict | str, mesh: dict) -> list[str]:
    named = {"Ray": ray_results, **{f"mesh {name}": r for name, r in mesh.items()}}
    if isinstance(ray_results, dict):
        named.update({f"Ray {name}": r for name, r in ray_results.items() if name != "info"})
    return [f"- {name} failed: {r}" for name, r in named.items() if isinstance(r, str)]


def table(ray_results: dict | str, mesh: dict, q: str) -> str:
    lines = ["| shape | mesh | Ray | mesh/Ray | reproduce |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(ray_results, mesh, q)]
    return "\n".join(lines)


NOTES = """\
How to read it: figures are the median [range] over runs (kill rows: p50/p99 over all
trials). "mesh/Ray" is the mesh's figure over Ray's: above 1× the mesh takes longer. The
shapes are alike, not equal:

- **call**: `ray.get(actor.get.remote())` in a loop from the driver (this process): the
  driver's core worker sends the task over gRPC straight to the actor's worker process and
  waits for its result. Ray listens on the machine's address rather than 127.0.0.1 (it
  turns 127.0.0.1 into that), which stays inside the kernel all the same. The mesh's call
  leaves this process over ZeroMQ on TCP loopback for a node's, and comes back.
- **`add`**: the mesh commits the new state to LMDB with fsync (a group commit) before it
  replies; the Ray actor's state is an attribute in its worker's memory.
- **kill -9**: in Ray, SIGKILL of the actor's worker process (found by the actor's own
  `os.getpid()`), one actor made with `max_restarts=-1, max_task_retries=-1`; the call
  made right after the kill is retried by Ray until the restarted actor answers. Ray does
  not keep actor state: the restarted actor runs `__init__` again and its count starts
  again at 0 ("count after the restart" is what it answered; it held 1, 2, … before).
  Keeping state across a restart is the application's work in Ray. In the mesh, `kill -9`
  of a whole node, an OS process with several agents: its launcher starts it again and
  each agent reloads its last committed state from disk; the figure is the first of them
  to answer with its state, all of them in parentheses. Between trials, each side waits:
  the mesh for the launcher's "ready" line, Ray 2 s for its pool of idle workers to fill
  again.
- **Ray** runs locally with `num_cpus=2`, no dashboard, logs not sent to the driver,
  token auth (its default) with a token of the run's own."""


def ray_line(ray_results: dict | str, version: str) -> str:
    info = ray_results.get("info") if isinstance(ray_results, dict) else None
    if not info:
        return f"Ray {version}"
    return (f"Ray {info['version']}, local: `ray.init` took {info['init_s']:.1f} s; with the actors up, "
            f"{info['procs']} processes of its own (gcs_server, raylet, agents, workers), "
            f"{info['rss_mb']:,.0f} MB RSS in all")


def report(ray_results: dict | str, mesh: dict, size: dict, q: str, took: float, load: float, version: str) -> str:
    return "\n".join([
        f"Run: `{' '.join([SCRIPT, *sys.argv[1:]])}`, {took / 60:.1f} min in all. {size['runs']} runs of "
        f"{size['calls']:,} `get` / {size['adds']:,} `add` calls each; {size['kill_trials']} kills on each side.",
        "",
        *[f"- {line}" for line in machine(load)],
        f"- {ray_line(ray_results, version)}",
        "",
        table(ray_results, mesh, q),
        *failures(ray_results, mesh),
        "",
        NOTES,
    ])


def not_installed(reason: str, load: float) -> str:
    return "\n".join([
        f"Not run: Ray could not be imported when `{' '.join([SCRIPT, *sys.argv[1:]])}` ran ({reason}). "
        "Ray is not a dependency of the project: `pip install ray`, then run it again.",
        "",
        *[f"- {line}" for line in machine(load)],
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Progress goes to stderr; the table to stdout.")
    ap.add_argument("--quick", action="store_true", help="core.py's quick sizes (a minute or two)")
    ap.add_argument("--write", action="store_true", help="rewrite the ray section of docs/benchmarks.md")
    args = ap.parse_args()
    size = dict(SIZES[args.quick])
    q = " --quick" if args.quick else ""
    t, load = time.monotonic(), os.getloadavg()[0]
    exit_on_sigterm()
    try:
        with ray_environment():
            ray = import_ray()
            if isinstance(ray, str):
                print(f"rayside: Ray is not installed ({ray}): `pip install ray` to run this benchmark",
                      file=sys.stderr)
                if args.write:
                    write_section(BEGIN, END, not_installed(ray, load), HEADING)
                    say("wrote docs/benchmarks.md (Ray not installed)")
                return 0
            say("--- ray")
            with contextlib.redirect_stdout(sys.stderr):  # Ray prints its workers' deaths to stdout
                ray_results = guarded(run_ray, ray, size)
        mesh = run_mesh(MESH_BENCHES, size)
    except KeyboardInterrupt:
        say("rayside: interrupted")
        return 130
    text = report(ray_results, mesh, size, q, time.monotonic() - t, load, ray.__version__)
    print(text)
    if args.write:
        write_section(BEGIN, END, text, HEADING)
        say("wrote docs/benchmarks.md")
    failed = isinstance(ray_results, str) or any(isinstance(r, str) for r in (*ray_results.values(), *mesh.values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
