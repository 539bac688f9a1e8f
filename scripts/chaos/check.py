#!/usr/bin/env python3
"""The chaos checker: decides from the record alone whether anything was lost.

    python3 scripts/chaos/check.py RUN_DIR         # reads RUN_DIR/history.jsonl, final.json, data/

The history holds one JSON object per line:
    {"e": "invoke", "op": ID, "t": T, "agent": A, "kind": "append"|"add"|"say", "value": V}
    {"e": "ok", "op": ID, "t": T, "result": R}
    {"e": "fail", "op": ID, "t": T, "error": "..."}          (an attempt failed; it may be retried)
    {"e": "fault", "t": T, "fault": "...", "target": "..."}
An operation is retried with the same request id until it is acknowledged or the run
ends. final.json holds every agent's final state (ledger values, counter value,
conversation history).

Verdict rules:
  ledger        every acknowledged append is there exactly once, at the index its reply
                gave; an append acknowledged before another was invoked comes first;
                appends never acknowledged appear at most once; nothing appears that was
                never sent
  counter       acknowledged increments <= value <= acknowledged + unacknowledged
  conversation  every acknowledged turn is in the history exactly once, in order
  served        no name was answered for by two incarnations at once (the nodes' records)
Exit status 1 on any violation.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mesh.served import overlaps  # noqa: E402


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


@dataclass
class Report:
    operations: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0
    failed_attempts: int = 0
    faults: Counter = field(default_factory=Counter)
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    phantom: list = field(default_factory=list)
    misordered: list = field(default_factory=list)
    overlaps: list = field(default_factory=list)
    unavailable: dict = field(default_factory=dict)  # agent -> longest wait for an answer (s)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.phantom or self.misordered or self.overlaps)

    def lines(self) -> list[str]:
        worst = sorted(self.unavailable.items(), key=lambda kv: -kv[1])[:5]
        out = [
            f"verdict      {'PASS' if self.ok else 'FAIL'}",
            f"operations   {self.operations} ({self.acknowledged} acknowledged, "
            f"{self.unacknowledged} never acknowledged, {self.failed_attempts} failed attempts retried)",
            f"faults       {sum(self.faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(self.faults.items())) or 'none'})",
            f"lost         {len(self.lost)}",
            f"duplicated   {len(self.duplicated)}",
            f"phantom      {len(self.phantom)}",
            f"misordered   {len(self.misordered)}",
            f"served twice {len(self.overlaps)}",
            "longest wait " + (", ".join(f"{a} {s:.2f}s" for a, s in worst) or "-"),
        ]
        for label, items in (("LOST", self.lost), ("DUPLICATED", self.duplicated), ("PHANTOM", self.phantom),
                             ("MISORDERED", self.misordered), ("SERVED TWICE", self.overlaps)):
            out += [f"  {label}: {item}" for item in items[:10]]
        return out


def read_history(path: Path) -> tuple[dict[str, Op], Counter, int]:
    ops: dict[str, Op] = {}
    faults: Counter = Counter()
    failed = 0
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run was killed
            kind = e.get("e")
            if kind == "invoke":
                ops.setdefault(e["op"], Op(e["op"], e["agent"], e["kind"], e.get("value"), e["t"]))
            elif kind == "ok" and e["op"] in ops and ops[e["op"]].acked is None:
                ops[e["op"]].acked, ops[e["op"]].result = e["t"], e.get("result")
            elif kind == "fail" and e["op"] in ops:
                ops[e["op"]].failures += 1
                failed += 1
            elif kind == "fault":
                faults[e["fault"]] += 1
    return ops, faults, failed


def check(run_dir: Path) -> Report:
    ops, faults, failed = read_history(run_dir / "history.jsonl")
    final = json.loads((run_dir / "final.json").read_text())
    r = Report(operations=len(ops), failed_attempts=failed, faults=faults)
    by_agent: dict[str, list[Op]] = defaultdict(list)
    for op in ops.values():
        by_agent[op.agent].append(op)
        if op.acked is None:
            r.unacknowledged += 1
        else:
            r.acknowledged += 1
            wait = op.acked - op.invoked
            r.unavailable[op.agent] = max(r.unavailable.get(op.agent, 0.0), wait)
    for agent, agent_ops in by_agent.items():
        state = final.get(agent)
        if state is None:
            r.lost.append(f"{agent}: no final state could be read")
            continue
        kind = agent_ops[0].kind
        if kind == "append":
            _check_ledger(r, agent, agent_ops, state)
        elif kind == "add":
            _check_counter(r, agent, agent_ops, state)
        elif kind == "say":
            _check_conversation(r, agent, agent_ops, state)
    data = run_dir / "data"
    if data.exists():
        r.overlaps = [str(o) for o in overlaps(str(data))]
    return r


def _check_ledger(r: Report, agent: str, ops: list[Op], values: list) -> None:
    sent = {json.dumps(op.value): op for op in ops}
    counts = Counter(json.dumps(v) for v in values)
    for key, n in counts.items():
        op = sent.get(key)
        if op is None:
            r.phantom.append(f"{agent}: {key} was never sent")
        elif n > 1:
            r.duplicated.append(f"{agent}: {key} appears {n} times")
    for op in ops:
        key = json.dumps(op.value)
        if op.acked is not None:
            if counts.get(key, 0) == 0:
                r.lost.append(f"{agent}: acknowledged append {key} (index {op.result}) is missing")
            elif op.result is not None and (not isinstance(op.result, int) or op.result >= len(values)
                                            or json.dumps(values[op.result]) != key):
                r.misordered.append(f"{agent}: {key} was acknowledged at index {op.result}, but is not there")
    # an append acknowledged before another was invoked must come first
    position = {json.dumps(v): i for i, v in enumerate(values)}
    acked = sorted((op for op in ops if op.acked is not None and json.dumps(op.value) in position),
                   key=lambda op: position[json.dumps(op.value)])
    later_min_ack = float("inf")
    for op in reversed(acked):
        if later_min_ack < op.invoked:
            r.misordered.append(f"{agent}: {json.dumps(op.value)} is placed after an append acknowledged before it was sent")
        later_min_ack = min(later_min_ack, op.acked)


def _check_counter(r: Report, agent: str, ops: list[Op], value: int) -> None:
    acked = sum(op.value for op in ops if op.acked is not None)
    maybe = sum(op.value for op in ops if op.acked is None)
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
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    report = check(Path(argv[0]))
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
