#!/usr/bin/env python3
"""The chaos checker: decides from the record alone whether anything was lost.

    python3 scripts/chaos/check.py RUN_DIR                  # reads RUN_DIR/history.jsonl, final.json, data/
    python3 scripts/chaos/check.py RUN_DIR --judge kill,stop  # judge only these kinds' availability goals

The history holds one JSON object per line:
    {"e": "run", "t": T, "faults": [...], "skipped": {KIND: WHY}, "judged": [...]}   (first line)
    {"e": "invoke", "op": ID, "t": T, "agent": A, "kind": "append"|"add"|"say"|"crash", "value": V,
     "rid": RID, "era": E}                                  (rid: the request id, when it is not ID;
                                                             era: of a name that is stopped and spawned again)
    {"e": "ok", "op": ID, "t": T, "result": R}
    {"e": "fail", "op": ID, "t": T, "error": "..."}          (an attempt failed; it may be retried)
    {"e": "refused", "op": ID, "t": T, "error": "BadRequest: ..."}   (final: not retried)
    {"e": "crashed", "op": ID, "t": T, "error": "..."}       (a crash asked for, answered AgentCrashed)
    {"e": "spawn", "agent": A, "era": E, "result": R}        (era E of A begins)
    {"e": "fresh", "agent": A, "era": E, "state": S}         (A read right after that spawn)
    {"e": "era", "agent": A, "era": E, "state": S}           (A read at the end of era E, before its stop)
    {"e": "stop", "agent": A, "era": E, "result": R}         (a stop of A answered R)
    {"e": "fault", "id": N, "t": T, "fault": KIND, "target": "...", "injected": true, "supervisor": B}
                                                            (T: when it really came into force)
    {"e": "fault", "id": N, "t": T, "fault": KIND, "injected": false, "error": "..."}
    {"e": "heal", "id": N, "t": T, ...}                     (T: when the heal took effect)
    {"e": "heal_failed", "id": N, "error": "..."}
    {"e": "in_force", "text": "..."}                        (the machine still showed a fault after the run)
An operation is retried with the same request id until it is acknowledged, refused or
the run ends. final.json holds every agent's final state (ledger values, counter value,
conversation history); for a name with eras, the state of its last era.

Verdict rules:
  ledger        every acknowledged append is there exactly once, at the index its reply
                gave; an append acknowledged before another was invoked comes first;
                appends never acknowledged appear at most once; nothing appears that was
                never sent
  counter       acknowledged increments <= value <= acknowledged + unacknowledged
  conversation  every acknowledged turn is in the history exactly once, in order
  eras          a name stopped and spawned again is checked era by era, each against the
                state read at its end (the last against final.json); a new era starts
                from nothing (its first read is empty), and each era before the last
                was ended by a stop that answered stopped
  shared ids    two different requests under one request id: never both acknowledged,
                the refused one (BadRequest "different request") has no effect; the same
                request repeated under its id gets the same reply; no other request is
                refused
  crashes       a crash asked for is no effect; its answer is AgentCrashed
  served        no name was answered for by two incarnations at once (the nodes' records)
  healed        every injected fault has its heal in the history, and none was seen after
  availability  per fault kind, the longest time any agent could not be served while a
                fault of that kind was the only one in force is within its goal (GOALS),
                for the kinds judged (a kill, stop or cut of the supervisor's node or
                host is judged on its own, as KIND:supervisor)
Exit status 1 on any violation.

The control plane's faults (run.py --control) have rows of their own: leadercut,
etcdkill and etcdall (no goal: measured), and leaderhost, split by where each agent was
when the leader's host was killed (its last answer before, in the served records):
leaderhost:others (agents of the other hosts, goal 1 s) and leaderhost:own (agents of
the killed host, or not yet served, goal 3 s). They are judged only when --judge names
them. Faults aimed at the supervisor by definition (supervisor, leaderhost, leadercut)
have no KIND:supervisor row.

Counts of faults are of the history's fault lines: attempted (every line) and injected
(those with "injected": true); nothing else is counted.

An agent "could not be served" from the moment an operation on it was waiting and the
agent had answered nothing since, until it answered one again (any operation, any
client); an operation never answered stretches the window to the end of the history.
A fault meets a window when it was in force (from its start to its heal) at some time
during it, or was healed less than AFTER (1 s) before the window began: a node ready
again, or a link up, is not yet the agents served again (the supervisor's view, leases
and restarts take their time, and that time is the fault's doing). A window counts for
the kind of the first fault it meets, from the later of its own start and that fault's
start, until the window ends or the next fault it meets begins: the time the agent went
unserved with that fault the only one since. A window that meets two or more faults (at
once, or one after the other) is also reported whole as "overlapping"; windows that
meet none as "no fault". The report gives each kind's longest fault (stop, cut, loss,
disk and llm last as long as --duration draws; a kill until the node is ready again; a
host until it is started again): a goal met only by faults shorter than it says little.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mesh.served import overlaps  # noqa: E402

# The longest an agent may go unserved while one fault of a kind is in force (seconds).
GOALS = {"kill": 0.5, "stop": 2.0, "cut": 2.0, "host": 3.0, "disk": 3.0}
# A kill, stop or cut aimed at the supervisor's node or host is its own row, KIND:supervisor,
# with the kind's goal: the runtime has one supervisor, and those faults take it away.
JUDGED = [*GOALS, "kill:supervisor", "stop:supervisor", "cut:supervisor"]
# The control plane's faults (--control). The leader's host killed (leaderhost) has two rows,
# with issue 14's goals (G8): the agents on the other hosts ("others") and the agents that
# were on the killed host ("own"). Not in JUDGED: on a loaded 2-core machine they are
# reported, and judged only when asked for (--judge leaderhost:others,...).
ROW_GOALS = {"leaderhost:others": 1.0, "leaderhost:own": 3.0}
ROWS = {"leaderhost": ("leaderhost:others", "leaderhost:own")}   # a kind -> its rows, where it has several
AT_SUPERVISOR = ("supervisor", "leaderhost", "leadercut")         # aimed at the supervisor by definition


def goal(key: str) -> float | None:
    if key in ROW_GOALS:
        return ROW_GOALS[key]
    return GOALS.get(key.split(":")[0]) if key.split(":")[0] not in ROWS else None
SHORT = 0.05  # windows shorter than this are not attributed to faults (they are ordinary latency)
AFTER = 1.0   # a fault still meets windows that begin this long after its heal (the mesh's own recovery)


def meeting(faults: list, w: "Window", t_end: float) -> list:
    """The faults (sorted by start) that meet window `w`: in force, or healed less than AFTER before it began."""
    return [f for f in faults if f.start < w.end and (f.end if f.end is not None else t_end) + AFTER > w.start]


@dataclass
class Op:
    id: str
    agent: str
    kind: str
    value: object
    invoked: float
    acked: float | None = None
    result: object = None
    failures: int = 0
    rid: str | None = None       # the request id (the op's id unless it shares another's)
    era: int = 0
    refused: str | None = None   # the BadRequest that refused it (final)
    crashed: bool = False        # a crash asked for, answered AgentCrashed

    @property
    def request_id(self) -> str:
        return self.rid or self.id

    @property
    def effect(self) -> bool:
        """An operation meant to change the agent (not a crash)."""
        return self.kind != "crash"


@dataclass
class Fault:
    id: object
    kind: str
    target: str | None
    injected: bool
    start: float
    end: float | None = None
    error: str | None = None
    on_supervisor: bool = False

    @property
    def key(self) -> str:
        """Its row in the availability verdicts (its kind's, for a kind with several rows)."""
        return f"{self.kind}:supervisor" if self.on_supervisor and self.kind not in AT_SUPERVISOR else self.kind

    @property
    def rows(self) -> tuple:
        return ROWS.get(self.kind, (self.key,))

    def row(self, agent: str, homes: "Homes") -> str:
        """The row a window of `agent` counts for: leaderhost's by where the agent was
        served last before the fault began (on the killed host, or not served yet: "own")."""
        if self.kind != "leaderhost":
            return self.key
        home = homes.at(agent, self.start)
        return "leaderhost:others" if home is not None and home != self.target else "leaderhost:own"

    def describe(self, t0: float) -> str:
        end = f"{self.end - t0:.2f}" if self.end is not None else "never healed"
        return f"#{self.id} {self.kind} on {self.target} ({self.start - t0:.2f}-{end} s)"


@dataclass
class Window:
    agent: str
    start: float
    end: float
    faults: list = field(default_factory=list)
    then: list = field(default_factory=list)  # faults that began while it went on (not counted to it)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class History:
    ops: dict
    faults: dict
    failed: int
    header: dict
    in_force: list
    t0: float
    t_end: float
    eras: dict = field(default_factory=dict)   # agent -> era -> {"spawn": t, "fresh": S, "end": S, "stops": [R]}


@dataclass
class Report:
    operations: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0
    failed_attempts: int = 0
    attempted: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    skipped: dict = field(default_factory=dict)
    in_force: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    phantom: list = field(default_factory=list)
    misordered: list = field(default_factory=list)
    overlaps: list = field(default_factory=list)
    crossed: list = field(default_factory=list)      # shared request ids answered wrongly
    refused_wrongly: list = field(default_factory=list)
    not_fresh: list = field(default_factory=list)    # an era that did not start from nothing
    not_stopped: list = field(default_factory=list)  # an era without a stop that answered stopped
    refused: int = 0
    shared_ids: int = 0
    crashes: int = 0
    crashed: int = 0
    eras: int = 0
    stops: int = 0
    outstanding: tuple = (0, "")                     # most operations in flight on one agent at once
    window: int | None = None                        # the run's dedup_window
    skew: dict = field(default_factory=dict)         # host -> wall-clock offset (s) injected
    unavailable: dict = field(default_factory=dict)  # agent -> longest wait of one operation (s)
    latencies: list = field(default_factory=list)
    hostile: str | None = None                       # the node a hostile peer attacked    # acknowledged operations: acked - invoked (s)
    worst: dict = field(default_factory=dict)        # fault kind, "overlapping" or "no fault" -> Window
    longest: dict = field(default_factory=dict)      # fault kind -> longest injected fault (s)
    measured: Counter = field(default_factory=Counter)  # availability row -> injected faults
    judged: set = field(default_factory=lambda: set(JUDGED))
    missed: list = field(default_factory=list)
    t0: float = 0.0

    @property
    def faults(self) -> Counter:
        """Injected faults per kind."""
        return +self.injected

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.phantom or self.misordered or self.overlaps
                    or self.in_force or self.missed or self.crossed or self.refused_wrongly or self.not_fresh
                    or self.not_stopped)

    def latency_line(self) -> str:
        if not self.latencies:
            return "latency      -"
        ordered = sorted(self.latencies)
        def q(p):
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000
        return (f"latency      p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {ordered[-1] * 1000:.0f} ms "
                f"({len(ordered)} acknowledged operations, invocation to acknowledgement, retries included)")

    def fault_line(self) -> str:
        kinds = ", ".join(f"{k} {self.injected[k]} of {self.attempted[k]}" for k in sorted(self.attempted))
        return (f"faults       {sum(self.injected.values())} injected of {sum(self.attempted.values())} attempted"
                f" ({kinds or 'none'})")

    def availability_lines(self) -> list[str]:
        out = ["availability longest time an agent could not be served, one fault in force (goal)"]
        attempted = {row for kind in self.attempted for row in ROWS.get(kind, (kind,))}
        rows = sorted((attempted | set(self.measured) | set(self.worst)) - {"overlapping", "no fault"})
        for kind in [*rows, "overlapping", "no fault"]:
            w = self.worst.get(kind)
            figure = f"{w.seconds:6.2f} s" if w else f"  <{SHORT:.2f} s"
            if kind in ("overlapping", "no fault"):
                verdict = "(not judged)"
                if kind == "overlapping" and not w:
                    figure = "     -  "
            elif not self.measured[kind]:
                figure, verdict = "     -  ", "(none injected: not measured)"
            elif goal(kind) is None:
                verdict = "(no goal)"
            elif kind not in self.judged:
                verdict = f"(goal {goal(kind):g} s: not judged)"
            else:
                verdict = f"(goal {goal(kind):g} s: {'met' if not w or w.seconds <= goal(kind) else 'MISSED'})"
            if kind in self.longest:
                verdict += f" longest fault {self.longest[kind]:.2f} s"
            where = ""
            if w:
                where = f"  {w.agent} {w.start - self.t0:.2f}-{w.end - self.t0:.2f} s"
                if w.faults:
                    where += ", " + " + ".join(f"#{f.id} {f.kind} on {f.target}" for f in w.faults)
                if w.then:
                    where += f" (unserved on into #{w.then[0].id} {w.then[0].kind})"
            out.append(f"  {kind:<15} {figure} {verdict}{where}")
        return out

    def lines(self) -> list[str]:
        worst = sorted(self.unavailable.items(), key=lambda kv: -kv[1])[:5]
        out = [
            f"verdict      {'PASS' if self.ok else 'FAIL'}",
            f"operations   {self.operations} ({self.acknowledged} acknowledged, "
            f"{self.unacknowledged} never acknowledged, {self.refused} refused, {self.crashes} crashes; "
            f"{self.failed_attempts} failed attempts retried)",
            self.fault_line(),
            self.latency_line(),
        ]
        if self.hostile:
            out.append(f"hostile peer scripts/fuzz_node.py --hostile against {self.hostile} throughout")
        if self.skipped:
            out.append("skipped      " + "; ".join(f"{k} ({why})" for k, why in sorted(self.skipped.items()))
                       + ": cannot be injected here, left out with --skip-missing")
        out += [
            f"in force     {len(self.in_force)} at the end",
            f"lost         {len(self.lost)}",
            f"duplicated   {len(self.duplicated)}",
            f"phantom      {len(self.phantom)}",
            f"misordered   {len(self.misordered)}",
            f"served twice {len(self.overlaps)}",
            f"shared ids   {self.shared_ids} ids used by two callers; {self.refused} requests refused "
            f"(BadRequest), {len(self.crossed) + len(self.refused_wrongly)} wrongly",
            f"crashes      {self.crashes} asked for, {self.crashed} answered AgentCrashed",
            f"eras         {self.eras} spawns of names stopped and spawned again, {self.stops} stops answered "
            f"stopped; {len(self.not_fresh)} not fresh, {len(self.not_stopped)} not stopped",
            f"outstanding  up to {self.outstanding[0]} operations in flight on one agent ({self.outstanding[1] or '-'})"
            + (f", reply window {self.window}" if self.window is not None else ""),
            *(["clock skew   " + ", ".join(f"{h} {o:+g} s" for h, o in sorted(self.skew.items()))
               + " (served records compared after taking each host's offset off)"] if self.skew else []),
            f"goals missed {len(self.missed)}",
            "longest wait " + (", ".join(f"{a} {s:.2f}s" for a, s in worst) or "-"),
            *self.availability_lines(),
        ]
        for label, items in (("IN FORCE", self.in_force), ("MISSED", self.missed), ("LOST", self.lost),
                             ("DUPLICATED", self.duplicated), ("PHANTOM", self.phantom),
                             ("MISORDERED", self.misordered), ("SERVED TWICE", self.overlaps),
                             ("SHARED ID", self.crossed), ("REFUSED", self.refused_wrongly),
                             ("NOT FRESH", self.not_fresh), ("NOT STOPPED", self.not_stopped)):
            out += [f"  {label}: {item}" for item in items[:10]]
        return out


def read_history(path: Path) -> History:
    ops: dict[str, Op] = {}
    eras: dict = defaultdict(dict)
    faults: dict = {}
    in_force: list = []
    header: dict = {}
    failed = 0
    t0 = t_end = None
    legacy = 0
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run was killed
            kind, t = e.get("e"), e.get("t")
            if isinstance(t, (int, float)):
                t0 = t if t0 is None else min(t0, t)
                t_end = t if t_end is None else max(t_end, t)
            if kind == "run":
                header = e
            elif kind == "invoke":
                ops.setdefault(e["op"], Op(e["op"], e["agent"], e["kind"], e.get("value"), e["t"],
                                           rid=e.get("rid"), era=e.get("era", 0)))
            elif kind == "ok" and e["op"] in ops and ops[e["op"]].acked is None:
                ops[e["op"]].acked, ops[e["op"]].result = e["t"], e.get("result")
            elif kind == "refused" and e["op"] in ops:
                ops[e["op"]].refused = e.get("error") or "refused"
            elif kind == "crashed" and e["op"] in ops:
                ops[e["op"]].crashed = True
            elif kind in ("spawn", "fresh", "era", "stop"):
                era = eras[e["agent"]].setdefault(e.get("era", 0), {"stops": []})
                if kind == "spawn":
                    era["spawn"] = e.get("t")
                elif kind == "fresh":
                    era["fresh"] = e.get("state")
                elif kind == "era":
                    era["end"] = e.get("state")
                else:
                    era["stops"].append(e.get("result"))
            elif kind == "fail" and e["op"] in ops:
                ops[e["op"]].failures += 1
                failed += 1
            elif kind == "fault":
                if "id" not in e:  # an older history: its faults were written before being tried
                    legacy += 1
                fid = e.get("id", f"old{legacy}")
                faults[fid] = Fault(fid, e["fault"], e.get("target"), bool(e.get("injected", True)), e["t"],
                                    error=e.get("error"), on_supervisor=bool(e.get("supervisor")))
            elif kind == "heal":
                fid = e.get("id")
                if fid is None:  # older history: the earliest fault of that kind and target still open
                    fid = next((k for k, x in faults.items() if x.kind == e.get("fault") and x.end is None
                                and x.target == e.get("target")), None)
                if fid in faults:
                    faults[fid].end = e["t"]
            elif kind == "heal_failed" and e.get("id") in faults:
                faults[e["id"]].error = e.get("error")
            elif kind == "in_force":
                in_force.append(e.get("text", "?"))
    return History(ops, faults, failed, header, in_force, t0 or 0.0, t_end or 0.0, dict(eras))


class Homes:
    """Where each agent was served, from the nodes' served records (DATA/HOST/served/NODE.log,
    each time less its host's known clock offset): `at(agent, t)` is the host of its last
    answer at or before t. Read once, when first asked."""

    def __init__(self, data: Path | None, offsets: dict[str, float] | None = None):
        self.data, self.offsets = data, offsets or {}
        self._by_name: dict[str, tuple[list[float], list[str]]] | None = None

    def _read(self) -> dict:
        found: dict[str, list[tuple[float, str]]] = defaultdict(list)
        if self.data is not None:
            for path in self.data.glob("*/served/*.log"):
                host = path.parent.parent.name
                skew = self.offsets.get(host, 0.0)
                with open(path) as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) == 3:
                            try:
                                found[parts[1]].append((float(parts[0]) - skew, host))
                            except ValueError:
                                continue  # a line cut short by a kill
        out = {}
        for name, seen in found.items():
            seen.sort()
            out[name] = ([t for t, _ in seen], [h for _, h in seen])
        return out

    def at(self, agent: str, t: float) -> str | None:
        if self._by_name is None:
            self._by_name = self._read()
        times, hosts = self._by_name.get(agent, ([], []))
        i = bisect.bisect_right(times, t)
        return hosts[i - 1] if i else None


def unserved_windows(ops: list[Op], t_end: float) -> list[Window]:
    """An agent's windows without an answer while an operation on it waited (see the docstring)."""
    events = [(op.invoked, 0, i) for i, op in enumerate(ops)]
    events += [(op.acked, 1, i) for i, op in enumerate(ops) if op.acked is not None]
    events.sort()
    waiting: list[tuple[float, int]] = []  # (invoked, index): a heap, answered ones dropped lazily
    answered: set[int] = set()
    last_answer = float("-inf")
    out = []
    for t, what, i in events:
        if what == 0:
            heapq.heappush(waiting, (t, i))
            continue
        while waiting and waiting[0][1] in answered:
            heapq.heappop(waiting)
        start = max(last_answer, waiting[0][0] if waiting else t)
        out.append(Window(ops[i].agent, start, t))
        answered.add(i)
        last_answer = t
    while waiting and waiting[0][1] in answered:
        heapq.heappop(waiting)
    if waiting:
        out.append(Window(ops[0].agent, max(last_answer, waiting[0][0]), max(t_end, waiting[0][0])))
    return out


def availability(r: Report, h: History, by_agent: dict[str, list[Op]], homes: Homes | None = None) -> None:
    faults = sorted((f for f in h.faults.values() if f.injected), key=lambda f: f.start)
    homes = homes or Homes(None)
    for agent_ops in by_agent.values():
        agent_ops = [op for op in agent_ops if op.effect and op.refused is None]
        if not agent_ops:
            continue
        for w in unserved_windows(agent_ops, h.t_end):
            if w.seconds < SHORT:
                continue
            met = meeting(faults, w, h.t_end)
            candidates = []
            if not met:
                candidates.append(("no fault", w))
            else:
                # what came before the first fault was not its doing; what came after the
                # next one began is not its doing alone
                first, start = met[0], max(w.start, met[0].start)
                solo_end = min(w.end, met[1].start) if len(met) > 1 else w.end
                candidates.append((first.row(w.agent, homes), Window(w.agent, start, solo_end, [first], met[1:])))
                if len(met) > 1:
                    candidates.append(("overlapping", Window(w.agent, start, w.end, met)))
            for key, c in candidates:
                if c.seconds >= SHORT and (key not in r.worst or c.seconds > r.worst[key].seconds):
                    r.worst[key] = c
    for kind in sorted(r.judged):
        w = r.worst.get(kind)
        if goal(kind) is not None and w is not None and w.seconds > goal(kind):
            f = w.faults[0]
            r.missed.append(f"{kind}: {w.agent} could not be served for {w.seconds:.2f} s "
                            f"({w.start - h.t0:.2f}-{w.end - h.t0:.2f} s after the start; goal {goal(kind):g} s) "
                            f"during {f.describe(h.t0)}"
                            + (f", until #{w.then[0].id} {w.then[0].kind} began" if w.then else ""))


def each_fault(run_dir: Path) -> list[str]:
    """One line per injected fault (per row, for a kind with several): how long it lasted,
    and the agent it kept unserved longest (counted as for its kind, see the docstring)."""
    h = read_history(run_dir / "history.jsonl")
    faults = sorted((f for f in h.faults.values() if f.injected), key=lambda f: f.start)
    header = h.header.get("skew") or {}
    homes = Homes(run_dir / "data" if (run_dir / "data").exists() else None,
                  {k: float(v) for k, v in header.items()})
    worst: dict = {}
    by_agent: dict[str, list[Op]] = defaultdict(list)
    for op in h.ops.values():
        if op.effect and op.refused is None:
            by_agent[op.agent].append(op)
    for agent_ops in by_agent.values():
        for w in unserved_windows(agent_ops, h.t_end):
            met = meeting(faults, w, h.t_end)
            if met:
                solo = Window(w.agent, max(w.start, met[0].start), min(w.end, met[1].start) if len(met) > 1 else w.end)
                key = (met[0].id, met[0].row(w.agent, homes))
                if solo.seconds > worst.get(key, Window("", 0, 0)).seconds:
                    worst[key] = solo
    out = []
    for f in faults:
        lasted = (f.end if f.end is not None else h.t_end) - f.start
        for row in f.rows:
            w = worst.get((f.id, row))
            out.append(f"#{f.id:<4} {row:<17} {str(f.target):<9.9} {f.start - h.t0:8.2f} s  lasted {lasted:5.2f} s  "
                       + (f"unserved {w.seconds:5.2f} s  {w.agent}" if w else "unserved  -"))
    return out


def check(run_dir: Path, judged=None) -> Report:
    h = read_history(run_dir / "history.jsonl")
    final = json.loads((run_dir / "final.json").read_text())
    if judged is None:
        judged = h.header.get("judged", JUDGED)
    r = Report(operations=len(h.ops), failed_attempts=h.failed, skipped=dict(h.header.get("skipped", {})),
               judged=set(judged), t0=h.header.get("t", h.t0), window=h.header.get("dedup_window"),
               skew={k: float(v) for k, v in (h.header.get("skew") or {}).items()},
               hostile=h.header.get("hostile"))
    for f in h.faults.values():
        r.attempted[f.kind] += 1
        r.injected[f.kind] += f.injected
        if f.injected:
            lasted = (f.end if f.end is not None else h.t_end) - f.start
            for row in f.rows:
                r.longest[row] = max(r.longest.get(row, 0.0), lasted)
                r.measured[row] += 1
        if f.injected and f.end is None:
            r.in_force.append(f"{f.describe(r.t0)}: no heal in the history" + (f" ({f.error})" if f.error else ""))
    r.in_force += h.in_force
    by_agent: dict[str, list[Op]] = defaultdict(list)
    for op in h.ops.values():
        by_agent[op.agent].append(op)
        if op.kind == "crash":
            r.crashes += 1
            r.crashed += op.crashed
            if op.acked is not None:
                r.crossed.append(f"{op.agent}: crash {op.id} was acknowledged ({op.result!r}), not AgentCrashed")
            continue
        if op.refused is not None:
            r.refused += 1
        elif op.acked is None:
            r.unacknowledged += 1
        else:
            r.acknowledged += 1
            wait = op.acked - op.invoked
            r.unavailable[op.agent] = max(r.unavailable.get(op.agent, 0.0), wait)
            r.latencies.append(wait)
    data = run_dir / "data"
    availability(r, h, by_agent, Homes(data if data.exists() else None, r.skew))
    r.outstanding = most_outstanding(h.ops.values())
    _check_shared_ids(r, h.ops.values())
    for agent, agent_ops in by_agent.items():
        eras = h.eras.get(agent, {})
        last = max(eras, default=0)
        by_era: dict[int, list[Op]] = defaultdict(list)
        for op in agent_ops:
            if op.effect:
                by_era[op.era].append(op)
        for era in sorted(set(by_era) | set(eras)):
            label = agent if not eras else f"{agent} era {era}"
            era_ops = by_era.get(era, [])
            info = eras.get(era, {})
            state = final.get(agent) if era == last and "end" not in info else info.get("end")
            if era == last and "end" not in info and any(isinstance(s, dict) and s.get("stopped")
                                                         for s in info.get("stops", [])):
                continue  # stopped at the very end and not spawned again: no state to read
            if not era_ops:
                continue
            if state is None:
                r.lost.append(f"{label}: no final state could be read")
                continue
            kind = era_ops[0].kind
            if kind == "append":
                _check_ledger(r, label, era_ops, state)
            elif kind == "add":
                _check_counter(r, label, era_ops, state)
            elif kind == "say":
                _check_conversation(r, label, era_ops, state)
        _check_eras(r, agent, eras)
    if data.exists():
        r.overlaps = [str(o) for o in overlaps(str(data), offsets=r.skew)]
    return r


def most_outstanding(ops) -> tuple[int, str]:
    """The most operations in flight on one agent at once (invoked, neither answered nor
    given up), and that agent: more than the reply window means the window alone could not
    have kept every reply a retry may ask for."""
    best, where = 0, ""
    events: dict[str, list] = defaultdict(list)
    for op in ops:
        if not op.effect:
            continue
        events[op.agent].append((op.invoked, 1))
        if op.acked is not None:
            events[op.agent].append((op.acked, -1))
    for agent, ev in events.items():
        n = 0
        for _, d in sorted(ev, key=lambda x: (x[0], x[1])):
            n += d
            if n > best:
                best, where = n, agent
    return best, where


def _check_shared_ids(r: Report, ops) -> None:
    """Requests that share a request id: at most one body is acknowledged per id, the
    refused ones were refused as "different request", a same-body repeat gets the same
    reply; a request whose id nobody else used is never refused."""
    by_rid: dict[tuple, list[Op]] = defaultdict(list)
    for op in ops:
        if op.effect:
            by_rid[(op.agent, op.era, op.request_id)].append(op)
    for (agent, _, rid), group in by_rid.items():
        bodies = {json.dumps(op.value) for op in group}
        if len(group) > 1:
            r.shared_ids += 1
        for op in group:
            if op.refused is None:
                continue
            if len(bodies) < 2:
                r.refused_wrongly.append(f"{agent}: {op.id} (request id {rid}) was refused though no other "
                                         f"request used its id: {op.refused}")
            elif "different request" not in op.refused:
                r.refused_wrongly.append(f"{agent}: {op.id} (request id {rid}) was refused, but not as a "
                                         f"different request: {op.refused}")
        acked = [op for op in group if op.acked is not None]
        acked_bodies = {json.dumps(op.value) for op in acked}
        if len(acked_bodies) > 1:
            r.crossed.append(f"{agent}: request id {rid} acknowledged for {len(acked_bodies)} different requests "
                             f"({', '.join(op.id for op in acked)}: {', '.join(repr(op.result) for op in acked)})")
        for body in acked_bodies:
            results = {json.dumps(op.result) for op in acked if json.dumps(op.value) == body}
            if len(results) > 1:
                r.crossed.append(f"{agent}: request id {rid}, one request, answered differently: "
                                 + ", ".join(f"{op.id} {op.result!r}" for op in acked if json.dumps(op.value) == body))


def _check_eras(r: Report, agent: str, eras: dict) -> None:
    """Each era starts from nothing; each but the last ends with a stop that answered stopped."""
    last = max(eras, default=0)
    for era, info in sorted(eras.items()):
        if "spawn" in info:
            r.eras += 1
        fresh = info.get("fresh", None)
        if "fresh" in info and fresh not in ([], 0):
            shown = json.dumps(fresh)
            r.not_fresh.append(f"{agent} era {era}: spawned again, it started from {shown[:120]} instead of nothing")
        # stopped: true, or NoSuchAgent for a repeat of a stop whose answer was lost (the
        # next era's fresh read shows whether the name was really gone)
        stopped = [s for s in info.get("stops", []) if isinstance(s, dict) and (s.get("stopped") or s.get("gone"))]
        r.stops += len(stopped)
        if era < last and not stopped:
            r.not_stopped.append(f"{agent} era {era}: spawned again (era {era + 1}) without a stop that "
                                 f"answered stopped ({info.get('stops')})")


def _check_ledger(r: Report, agent: str, ops: list[Op], values: list) -> None:
    """Requests with the same body under one id (a repeat) are one append; a refused
    request is no append."""
    groups: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        groups[json.dumps(op.value)].append(op)
    counts = Counter(json.dumps(v) for v in values)
    for key, n in counts.items():
        group = groups.get(key)
        if group is None:
            r.phantom.append(f"{agent}: {key} was never sent")
        elif all(op.refused is not None for op in group):
            r.phantom.append(f"{agent}: {key} was refused (BadRequest), yet it was appended")
        elif n > 1:
            r.duplicated.append(f"{agent}: {key} appears {n} times")
    first_ack: dict[str, Op] = {}
    for key, group in groups.items():
        for op in sorted((o for o in group if o.acked is not None), key=lambda o: o.acked):
            first_ack.setdefault(key, op)
            if counts.get(key, 0) == 0:
                r.lost.append(f"{agent}: acknowledged append {key} (index {op.result}) is missing")
                break
            if op.result is not None and (not isinstance(op.result, int) or op.result >= len(values)
                                          or json.dumps(values[op.result]) != key):
                r.misordered.append(f"{agent}: {key} was acknowledged at index {op.result}, but is not there")
    # an append acknowledged before another was invoked must come first
    position = {json.dumps(v): i for i, v in enumerate(values)}
    acked = sorted((op for key, op in first_ack.items() if key in position), key=lambda op: position[json.dumps(op.value)])
    invoked = {key: min(o.invoked for o in group) for key, group in groups.items()}
    later_min_ack = float("inf")
    for op in reversed(acked):
        if later_min_ack < invoked[json.dumps(op.value)]:
            r.misordered.append(f"{agent}: {json.dumps(op.value)} is placed after an append acknowledged "
                                "before it was sent")
        later_min_ack = min(later_min_ack, op.acked)


def _check_counter(r: Report, agent: str, ops: list[Op], value: int) -> None:
    acked = sum(op.value for op in ops if op.acked is not None)
    maybe = sum(op.value for op in ops if op.acked is None and op.refused is None)
    if value < acked:
        r.lost.append(f"{agent}: value {value} < {acked} acknowledged increments")
    elif value > acked + maybe:
        r.duplicated.append(f"{agent}: value {value} > {acked} acknowledged + {maybe} unacknowledged increments")


def _check_conversation(r: Report, agent: str, ops: list[Op], history: list) -> None:
    said = [m.get("content") for m in history if isinstance(m, dict) and m.get("role") == "user"]
    counts = Counter(said)
    sent = {op.value for op in ops}
    for text, n in counts.items():
        if text not in sent:
            r.phantom.append(f"{agent}: turn {text!r} was never sent")
        elif n > 1:
            r.duplicated.append(f"{agent}: turn {text!r} is in the history {n} times")
    for op in ops:
        if op.acked is not None and counts.get(op.value, 0) == 0:
            r.lost.append(f"{agent}: acknowledged turn {op.value!r} is missing")
        if op.acked is not None and isinstance(op.result, dict) and op.result.get("turn") is not None:
            turn = op.result["turn"]
            if not (0 < turn <= len(said) and said[turn - 1] == op.value):
                r.misordered.append(f"{agent}: turn {op.value!r} was acknowledged as turn {turn}, but is not there")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--judge", default=None,
                   help="comma-separated fault kinds whose availability goal decides the verdict "
                        "(default: what the run was told; 'none' for none)")
    p.add_argument("--each", action="store_true", help="also list every injected fault and its longest unserved agent")
    a = p.parse_args(argv)
    judged = None if a.judge is None else [k for k in a.judge.split(",") if k and k != "none"]
    report = check(Path(a.run_dir), judged)
    print("\n".join(report.lines()))
    if a.each:
        print("\n".join(each_fault(Path(a.run_dir))))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
