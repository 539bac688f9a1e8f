"""Run every benchmark, one after another, and write each one's section of docs/benchmarks.md.

    sudo python3 scripts/bench/all.py            # everything (about half an hour)
    sudo python3 scripts/bench/all.py --quick    # the short sizes (a few minutes)

One benchmark at a time, so that none measures another's load: core.py (latency,
throughput, kill -9, memory), beam.py (Erlang/OTP side by side; needs erl), rayside.py
(Ray side by side; needs `pip install ray`), failover.py (detection and recovery
across namespaced hosts; needs root), upgrades.py (a rolling restart under calls, a kind's
new code for 10,000 agents) and scaling.py (how cost grows, with plots when
matplotlib is installed). A benchmark whose tools are missing is skipped, saying why;
one that fails is reported at the end, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

LIMIT_S = 3600  # for any one benchmark (a full scaling.py takes about 10 minutes)
# (script, takes --quick, needs root)
BENCHES = [("core.py", True, False), ("beam.py", True, False), ("rayside.py", True, False),
           ("failover.py", False, True), ("scaling.py", True, False), ("upgrades.py", False, False)]


def missing(script: str, needs_root: bool) -> str | None:
    """Why `script` cannot run here, or None."""
    if needs_root and os.geteuid() != 0:
        return "it makes network namespaces: run as root"
    if script == "beam.py" and shutil.which("erl") is None:
        return "no erl: install Erlang/OTP (Debian: apt-get install erlang-nox)"
    if script == "rayside.py" and importlib.util.find_spec("ray") is None:
        return "no ray: pip install ray"
    return None


def command(script: str, quick_flag: bool, quick: bool) -> list[str]:
    if quick and script == "failover.py":  # its section is written from 20 trials or more
        return [sys.executable, str(HERE / script), "--trials", "5"]
    cmd = [sys.executable, str(HERE / script), "--write"]
    if quick and quick_flag:
        cmd.append("--quick")
    return cmd


def run(cmd: list[str], limit: float) -> int:
    """One benchmark, ended with SIGTERM (each one ends what it started on SIGTERM) if it
    runs past `limit`, and killed if that does not stop it within a minute."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"== {Path(cmd[1]).name}: still running after {limit:.0f} s: stopping it", flush=True)
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(60)
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="each benchmark's short sizes")
    ap.add_argument("--skip", action="append", default=[], metavar="SCRIPT",
                    help="leave one out, e.g. --skip scaling.py (repeatable)")
    args = ap.parse_args()
    failed = []
    for script, quick_flag, needs_root in BENCHES:
        if script in args.skip:
            continue
        why = missing(script, needs_root)
        if why:
            print(f"== {script}: skipped ({why})", flush=True)
            continue
        cmd = command(script, quick_flag, args.quick)
        print(f"== {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        code = run(cmd, LIMIT_S)
        print(f"== {script}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
