#!/usr/bin/env python3
"""Repeat the kill benchmark's shape until an acknowledged write is lost, or time is up.

    python3 scripts/stress_kill.py --minutes 10 --seed 1
    python3 scripts/stress_kill.py --minutes 10 --burners 4 --duty 0.6   # Ray-like CPU pressure

Each round is a fresh three-node `mesh up` of core.py's kill benchmark config (scripts/
bench/core.py's Mesh: data in a temp dir, every pid ended on exit). A round spawns counters
and adds to each, then repeats trials: kill -9 the non-supervisor node hosting the most
agents, read every agent back, and check each value against what was acknowledged. Load
varies per trial, drawn from --seed: a quiet kill (the benchmark's own), a kill while new
agents are being spawned and given their first add, a kill while adds are in flight, or
both; and per round, how many burner processes spin (--burners at most, each busy --duty
of every 100 ms; started for the round and killed at its end) to take the CPU from the
mesh as Ray's own processes did on two cores.

A value below the sum of the adds acknowledged is a lost write; above the sum of every
add sent (acknowledged or not), a doubled one. Either is a violation: the run stops there,
keeps the mesh's output, config, data and this script's history of the round (the
folder is printed; see scripts/evidence.py), and exits 1. Agents that do not answer
within 15 s of a kill are counted (not a violation); the first time, that round ends with
its evidence kept too. At the end it prints kills,
violations, the rate per 1,000 kills, minutes and the load average. Everything it starts
(meshes, burners) is ended by pid on every exit: the end of time, a violation, an error,
Ctrl-C or SIGTERM; a burner also ends by itself when this script is gone or time is up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "bench"), str(HERE)]

import mesh  # noqa: E402
from mesh.errors import CallError  # noqa: E402
from core import Mesh, say  # noqa: E402

GET = {"op": "get"}
MODES = ("quiet", "spawning", "adding", "both")
MAX_BURNERS = 8
MAX_AGENTS = 80           # per round; then spawning stops
CALL_TIMEOUT_S = 15.0
BURN_PERIOD_S = 0.1


class Violation(AssertionError):
    """An acknowledged write was lost (or an add applied twice)."""

    def __init__(self, text: str, history: list[str]):
        super().__init__(text)
        self.evidence_files = {"history.log": "\n".join(history) + "\n"}


class Stuck(Exception):
    """Agents that did not answer after a kill (not a violation: nothing acknowledged is
    contradicted); the first time, its round ends and its evidence is kept."""

    def __init__(self, text: str, history: list[str]):
        super().__init__(text)
        self.evidence_files = {"history.log": "\n".join(history) + "\n"}


class Round:
    """One mesh's life: its agents, what was acknowledged, and a history for evidence."""

    def __init__(self, mh: Mesh, m, rng: random.Random, stats: dict):
        self.mh, self.m, self.rng, self.stats = mh, m, rng, stats
        self.lo: dict[str, int] = {}   # name -> sum of acknowledged adds
        self.hi: dict[str, int] = {}   # name -> sum of every add sent
        self.busy: set[str] = set()    # one operation per agent at a time
        self.history: list[str] = []
        self.t0 = time.monotonic()
        self.next_name = 0

    def log(self, text: str) -> None:
        self.history.append(f"{time.monotonic() - self.t0:9.3f} {text}")

    async def spawn_and_add(self) -> None:
        name = f"k{self.next_name}"
        self.next_name += 1
        n = self.next_name
        self.busy.add(name)
        try:
            try:
                placed = await self.m.spawn(name, "counter", timeout=CALL_TIMEOUT_S)
            except CallError as err:
                self.log(f"spawn {name}: {type(err).__name__}: {err}")
                self.stats["spawn_errors"] += 1
                return
            self.log(f"spawn {name}: on {placed.get('node')} as {placed.get('incarnation')}")
            self.lo[name] = self.hi[name] = 0
            await self.add(name, n)
        finally:
            self.busy.discard(name)

    async def add(self, name: str, n: int) -> None:
        self.hi[name] += n
        try:
            value = await self.m.call(name, {"op": "add", "n": n}, timeout=CALL_TIMEOUT_S)
        except CallError as err:
            self.log(f"add {name} {n}: {type(err).__name__}: {err} (maybe applied)")
            self.stats["add_errors"] += 1
            return
        self.lo[name] += n
        self.log(f"add {name} {n}: acknowledged {value}")
        self.check(name, value, f"the reply to add {n}")

    def check(self, name: str, value, what: str) -> None:
        if not isinstance(value, int) or not self.lo[name] <= value <= self.hi[name]:
            kind = "lost" if isinstance(value, int) and value < self.lo[name] else "doubled or wrong"
            text = (f"{name}: {what} was {value!r}; acknowledged adds sum to {self.lo[name]}, all adds sent to "
                    f"{self.hi[name]} ({kind})")
            self.log("VIOLATION " + text)
            raise Violation(text, self.history)

    async def adders(self, until: asyncio.Event) -> None:
        """Adds to random idle agents, a few at a time, until `until` is set."""
        async def one():
            while not until.is_set():
                idle = [n for n in self.lo if n not in self.busy]
                if not idle:
                    await asyncio.sleep(0.005)
                    continue
                name = self.rng.choice(idle)
                self.busy.add(name)
                try:
                    await self.add(name, self.rng.randint(1, 9))
                finally:
                    self.busy.discard(name)
        await asyncio.gather(*(one() for _ in range(self.rng.randint(1, 8))))

    async def placement(self) -> dict[str, list[str]]:
        names = list(self.lo)
        answers = await asyncio.gather(*(self.m.whereis(n, timeout=CALL_TIMEOUT_S) for n in names),
                                       return_exceptions=True)
        where: dict[str, list[str]] = {}
        for name, body in zip(names, answers):
            if isinstance(body, dict) and body.get("node"):
                where.setdefault(body["node"], []).append(name)
        return where

    async def trial(self, number: int) -> None:
        rng = self.rng
        mode = rng.choice(MODES)
        where = await self.placement()
        others = [n for n in where if n != "n1"]
        if not others:  # everything on the supervisor's node: spawn more first
            await asyncio.gather(*(self.spawn_and_add() for _ in range(5)))
            return
        victim = max(others, key=lambda n: len(where[n]))
        stop = asyncio.Event()
        tasks = []
        if mode in ("spawning", "both") and len(self.lo) < MAX_AGENTS:
            tasks += [asyncio.ensure_future(self.spawn_and_add()) for _ in range(rng.randint(1, 6))]
        if mode in ("adding", "both"):
            tasks.append(asyncio.ensure_future(self.adders(stop)))
        delay = rng.choice((0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.05))) if tasks else 0.0
        if delay:
            await asyncio.sleep(delay)  # lets the load get under way: the kill lands inside it
        mark, pid = self.mh.mark(), self.mh.pids[victim]
        self.log(f"trial {number} ({mode}, +{delay * 1000:.1f} ms): kill -9 {victim} pid {pid} "
                 f"hosting {len(where[victim])}: {' '.join(sorted(where[victim]))}")
        os.kill(pid, signal.SIGKILL)
        self.stats["kills"] += 1
        if tasks:
            await asyncio.sleep(rng.uniform(0, 0.05))
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        await self.read_all()
        await asyncio.to_thread(self.mh.wait_for, rf"node {victim} ready", mark, 30)

    async def read_all(self) -> None:
        names, failed = list(self.lo), []

        async def read(name):
            try:
                value = await self.m.call(name, GET, timeout=CALL_TIMEOUT_S)
            except CallError as err:
                self.log(f"get {name}: {type(err).__name__}: {err}")
                self.stats["read_errors"] += 1
                failed.append(f"{name}: {type(err).__name__}: {err}")
                return
            self.log(f"get {name}: {value}")
            self.check(name, value, "get")
        results = await asyncio.gather(*(read(n) for n in names), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        if failed:
            say(f"stress: {len(failed)} of {len(names)} agents not read back, e.g. {failed[0]}")
            if not self.stats["stuck_kept"]:  # the first time: the round ends, its evidence kept
                self.stats["stuck_kept"] = True
                raise Stuck(f"{len(failed)} agents not read back within {CALL_TIMEOUT_S:g} s: {failed[0]}",
                            self.history)


# --- CPU pressure ----------------------------------------------------------------------------------

def burn(until: float, duty: float) -> None:
    """A burner: busy `duty` of every period until `until` (wall clock) or its parent is gone."""
    parent = os.getppid()
    while time.time() < until and os.getppid() == parent:
        t = time.monotonic()
        while time.monotonic() - t < duty * BURN_PERIOD_S:
            pass
        time.sleep((1 - duty) * BURN_PERIOD_S)


class Burners:
    """Up to MAX_BURNERS burner processes, for one round (never stopped, so that each can
    see its deadline and its parent's exit)."""

    def __init__(self, count: int, duty: float, until: float):
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(min(count, MAX_BURNERS)):
                self.procs.append(subprocess.Popen([sys.executable, __file__, "--burn", f"{until:.0f}", str(duty)],
                                                   start_new_session=True))
        except BaseException:
            self.end()
            raise

    def end(self) -> None:
        for p in self.procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    break
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


# --- the run -----------------------------------------------------------------------------------------

async def one_round(mh: Mesh, rng: random.Random, stats: dict, stop_at: float) -> None:
    async with mesh.connect(mh.config) as m:
        r = Round(mh, m, rng, stats)
        first = rng.randint(10, 40)
        for _ in range(first):  # spawned one at a time, as the benchmark does
            await r.spawn_and_add()
        for number in range(1, rng.randint(10, 40) + 1):
            if time.monotonic() >= stop_at:
                break
            await r.trial(number)
            if stats["kills"] % 100 == 0:
                say(f"stress: {stats['kills']} kills, {stats['violations']} violations, "
                    f"{(time.monotonic() - stats['t0']) / 60:.1f} min, load {os.getloadavg()[0]:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the load's choices (default: random, printed)")
    ap.add_argument("--burners", type=int, default=0,
                    help=f"CPU burner processes at most, 0-{MAX_BURNERS} (default 0); each round runs 0..N of them")
    ap.add_argument("--duty", type=float, default=0.5, help="busy fraction of each burner (default 0.5)")
    ap.add_argument("--burn", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.burn:
        burn(float(args.burn[0]), float(args.burn[1]))
        return 0
    if not 0 <= args.burners <= MAX_BURNERS or not 0 < args.duty <= 1 or args.minutes <= 0:
        ap.error(f"--burners must be 0-{MAX_BURNERS}, --duty in (0, 1], --minutes > 0")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks end what we started
    t0 = time.monotonic()
    stop_at = t0 + args.minutes * 60
    stats = {"kills": 0, "violations": 0, "rounds": 0, "spawn_errors": 0, "add_errors": 0, "read_errors": 0,
             "stuck_kept": False, "t0": t0}
    load0 = os.getloadavg()[0]
    until = time.time() + args.minutes * 60 + 120  # a burner ends by itself then at the latest
    failure = stuck = None
    code = 0
    try:
        while time.monotonic() < stop_at:
            stats["rounds"] += 1
            burners = Burners(rng.randint(0, args.burners), args.duty, until)
            try:
                with Mesh(3, label="stress-kill") as mh:
                    asyncio.run(one_round(mh, rng, stats, stop_at))
            except Violation as exc:
                stats["violations"] += 1
                failure = exc
                break
            except Stuck as exc:
                stuck = exc
            finally:
                burners.end()
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, SIGTERM: what ran is still reported
        say("stress: interrupted")
        code = 143 if isinstance(exc, SystemExit) else 130
    minutes = (time.monotonic() - t0) / 60
    kills, violations = stats["kills"], stats["violations"]
    rate = 1000 * violations / kills if kills else float("nan")
    cmd = " ".join(["python3 scripts/stress_kill.py", f"--minutes {args.minutes:g}", f"--seed {seed}",
                    *([f"--burners {args.burners} --duty {args.duty:g}"] if args.burners else [])])
    print(f"command     {cmd}")
    print(f"minutes     {minutes:.1f}")
    print(f"rounds      {stats['rounds']}")
    print(f"kills       {kills}")
    print(f"violations  {violations}")
    print(f"rate        {rate:.2f} per 1,000 kills")
    print(f"errors      spawn {stats['spawn_errors']}, add {stats['add_errors']} (outcome unknown), "
          f"get {stats['read_errors']}")
    print(f"load        1-min average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{os.cpu_count()} cores; burners {args.burners}")
    if stuck is not None:
        print(f"not read    {stuck}" + "".join(f" ({n})" for n in getattr(stuck, "__notes__", ())))
    if failure is not None:
        print(f"violation   {failure}")
        for note in getattr(failure, "__notes__", ()):
            print(f"            {note}")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
