"""The chaos checker over recorded histories: fault counts, faults left in force, and
availability verdicts per fault kind. Small synthetic histories, no processes."""

import json
import sys

from procs import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "chaos"))
import check  # noqa: E402

T0 = 1_000.0


class Recorder:
    """Writes a history the way the chaos run does, with times given by the test."""

    def __init__(self, tmp_path, **header):
        self.dir = tmp_path
        self.lines = [{"e": "run", "t": T0, "faults": [], "skipped": {}, "judged": list(check.JUDGED), **header}]
        self.ops = []  # [agent, invoked, acked or None]

    def op(self, agent, invoked, acked=None):
        self.ops.append([agent, invoked, acked])

    def gap(self, agent, start, end):
        """`agent` answers nothing from start to end, with one operation waiting throughout."""
        self.ops = [o for o in self.ops if not (o[0] == agent and o[1] < end and (o[2] is None or o[2] > start))]
        self.op(agent, start, end)

    def fault(self, fid, kind, start, end=None, injected=True, target="n2", supervisor=False):
        if not injected:
            self.lines.append({"e": "fault", "id": fid, "fault": kind, "target": None, "injected": False,
                               "error": "RuntimeError: no", "t": T0 + start})
            return
        self.lines.append({"e": "fault", "id": fid, "fault": kind, "target": target, "injected": True, "t": T0 + start,
                           "supervisor": supervisor})
        if end is not None:
            self.lines.append({"e": "heal", "id": fid, "fault": kind, "target": target, "t": T0 + end})

    def check(self, judged=None):
        lines, final = list(self.lines), {}
        for n, (agent, invoked, acked) in enumerate(self.ops):
            lines.append({"e": "invoke", "op": f"c0-{n}", "agent": agent, "kind": "add", "value": 1, "t": T0 + invoked})
            final.setdefault(agent, 0)
            if acked is not None:  # a counter's value is its acknowledged increments
                lines.append({"e": "ok", "op": f"c0-{n}", "result": n, "t": T0 + acked})
                final[agent] += 1
        lines.sort(key=lambda e: e["t"])  # a history is written in time order
        (self.dir / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
        (self.dir / "final.json").write_text(json.dumps(final))
        return check.check(self.dir, judged)


def busy(rec, agent, start, end, step=0.01):
    """An agent answering every `step` seconds from start to end (ordinary service)."""
    for k in range(round((end - start) / step)):
        t = start + k * step
        rec.op(agent, t, t + step / 2)


def test_counts_are_the_injected_faults_of_the_history(tmp_path):
    rec = Recorder(tmp_path, skipped={"loss": "needs nftables (the nft command)"})
    rec.fault(1, "kill", 1.0, 1.2)
    rec.fault(2, "kill", 2.0, injected=False)
    rec.fault(3, "disk", 3.0, injected=False)
    rec.fault(4, "disk", 4.0, injected=False)
    rec.fault(5, "disk", 5.0, 5.5, target="h2")
    rec.fault(6, "stop", 6.0, 6.5)
    busy(rec, "counter-1", 0, 8)
    r = rec.check()
    assert dict(r.attempted) == {"kill": 2, "disk": 3, "stop": 1}
    assert dict(r.injected) == {"kill": 1, "disk": 1, "stop": 1}
    lines = r.lines()
    assert "faults       3 injected of 6 attempted (disk 1 of 3, kill 1 of 2, stop 1 of 1)" in lines
    assert any(line.startswith("skipped      loss (needs nftables") and "--skip-missing" in line for line in lines)
    assert "in force     0 at the end" in lines
    assert r.ok, lines


def test_the_recorded_run_matches_its_summary(tmp_path):
    """The summary's counts are those of the history's fault lines, whatever they are."""
    rec = Recorder(tmp_path)
    kinds = ["kill", "stop", "disk", "llm", "cut", "host", "loss", "supervisor"]
    expected_attempted, expected_injected = {}, {}
    for i in range(40):
        kind = kinds[(i * 7) % len(kinds)]
        injected = i % 3 != 0
        rec.fault(i + 1, kind, i * 0.5, i * 0.5 + 0.1 if injected else None, injected=injected)
        expected_attempted[kind] = expected_attempted.get(kind, 0) + 1
        expected_injected[kind] = expected_injected.get(kind, 0) + injected
    busy(rec, "counter-1", 0, 21, step=0.02)
    r = rec.check()
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    faults = [e for e in history if e["e"] == "fault"]
    assert sum(r.attempted.values()) == len(faults) == 40
    assert sum(r.injected.values()) == sum(e["injected"] for e in faults) == 26
    assert dict(r.attempted) == expected_attempted and dict(r.injected) == expected_injected


def test_a_fault_without_its_heal_fails_the_run(tmp_path):
    rec = Recorder(tmp_path)
    rec.fault(1, "disk", 1.0, None, target="h2")
    rec.lines.append({"e": "in_force", "text": "#2 cut: the link of h3 is still down", "t": T0 + 9})
    busy(rec, "counter-1", 0, 3)
    r = rec.check(judged=[])
    assert not r.ok
    assert len(r.in_force) == 2 and "#1 disk on h2" in r.in_force[0] and "no heal" in r.in_force[0]
    assert "verdict      FAIL" in r.lines() and "in force     2 at the end" in r.lines()


def test_availability_per_fault_kind_with_goals(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "counter-1", 0, 30)
    busy(rec, "counter-2", 0, 30)
    # kill #1 at 5: counter-1 waits from 5.00 to 5.40 (goal 0.5 s: met)
    rec.fault(1, "kill", 5.0, 5.3)
    rec.gap("counter-1", 5.0, 5.4)
    # stop #2 from 10 to 12: counter-2 waits from 10.1 to 12.6 (goal 2 s: missed by 0.5 s)
    rec.fault(2, "stop", 10.0, 12.0, target="n3")
    rec.gap("counter-2", 10.1, 12.6)
    # disk #3 and llm #4 overlap from 20 to 21; counter-1 waits 20.2 to 24.2 (overlapping, not judged)
    rec.fault(3, "disk", 20.0, 22.0, target="h2")
    rec.fault(4, "llm", 19.0, 21.0, target="model API")
    rec.gap("counter-1", 20.2, 24.2)
    # no fault: counter-2 waits 0.3 s at 26
    rec.gap("counter-2", 26.0, 26.3)
    r = rec.check()
    assert round(r.worst["kill"].seconds, 2) == 0.4 and r.worst["kill"].agent == "counter-1"
    assert round(r.worst["stop"].seconds, 2) == 2.5 and r.worst["stop"].agent == "counter-2"
    assert round(r.worst["overlapping"].seconds, 2) == 4.0
    assert {f.id for f in r.worst["overlapping"].faults} == {3, 4}
    assert round(r.worst["no fault"].seconds, 2) == 0.3
    assert "disk" not in r.worst  # its only window overlapped another fault
    assert not r.ok and len(r.missed) == 1
    miss = r.missed[0]
    assert miss.startswith("stop: counter-2 could not be served for 2.50 s (10.10-12.60 s after the start")
    assert "#2 stop on n3" in miss
    lines = r.lines()
    assert "goals missed 1" in lines
    kill = next(line for line in lines if line.startswith("  kill "))
    assert "0.40 s" in kill and "(goal 0.5 s: met)" in kill
    stop = next(line for line in lines if line.startswith("  stop "))
    assert "MISSED" in stop and "counter-2 10.10-12.60 s" in stop and "#2 stop on n3" in stop
    over = next(line for line in lines if line.startswith("  overlapping"))
    assert "4.00 s" in over and "#3 disk on h2" in over and "#4 llm on model API" in over


def test_kinds_left_out_of_judging_are_reported_not_judged(tmp_path):
    rec = Recorder(tmp_path, judged=["kill"])
    busy(rec, "counter-1", 0, 12)
    rec.fault(1, "stop", 5.0, 7.0)
    rec.gap("counter-1", 5.0, 8.0)
    r = rec.check()  # the run's own choice, from its first line
    assert r.ok and round(r.worst["stop"].seconds, 2) == 3.0
    stop = next(line for line in r.lines() if line.startswith("  stop "))
    assert "(goal 2 s: not judged)" in stop
    assert not rec.check(judged=["kill", "stop"]).ok  # the checker may be asked to judge it after all


def test_an_operation_never_answered_is_unserved_until_the_end(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "counter-1", 0, 2)
    rec.fault(1, "cut", 2.5, 3.0, target="h2")
    rec.op("counter-1", 2.5)                 # never answered
    rec.lines.append({"e": "note", "text": "the end", "t": T0 + 6.0})  # the history ends at 6
    r = rec.check()
    assert round(r.worst["cut"].seconds, 2) == 3.5 and not r.ok
    assert r.unacknowledged == 1


def test_an_unserved_window_starts_at_the_last_answer_not_at_the_oldest_wait():
    ops = [check.Op("a", "x", "add", 1, invoked=0.0, acked=10.0),   # one slow call
           check.Op("b", "x", "add", 1, invoked=1.0, acked=2.0),
           check.Op("c", "x", "add", 1, invoked=3.0, acked=4.0)]
    windows = check.unserved_windows(ops, t_end=10.0)
    assert [(w.start, w.end) for w in windows] == [(0.0, 2.0), (2.0, 4.0), (4.0, 10.0)]


def test_a_window_is_counted_from_the_fault_when_the_agent_was_already_waiting(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "counter-1", 0, 10)
    rec.gap("counter-1", 4.0, 5.4)        # a slow call from 4.0; the kill comes at 5.0
    rec.fault(1, "kill", 5.0, 5.05)
    r = rec.check()
    w = r.worst["kill"]
    assert round(w.seconds, 2) == 0.4 and round(w.start - T0, 2) == 5.0
    kill = next(line for line in r.lines() if line.startswith("  kill "))
    assert "(goal 0.5 s: met) longest fault 0.05 s" in kill


def test_a_window_through_two_faults_counts_for_the_first_until_the_second_began(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "ledger-4", 0, 15)
    rec.fault(1, "stop", 5.0, 7.0, target="n1")
    rec.fault(2, "cut", 8.0, 9.0, target="h1")
    rec.gap("ledger-4", 5.0, 9.5)  # not served again until after the cut
    r = rec.check()
    assert round(r.worst["stop"].seconds, 2) == 3.0  # 5.0 until the cut began at 8.0
    assert "cut" not in r.worst                      # never the only fault of a window
    assert round(r.worst["overlapping"].seconds, 2) == 4.5
    [miss] = r.missed
    assert miss.startswith("stop: ledger-4 could not be served for 3.00 s (5.00-8.00 s after the start")
    assert miss.endswith("until #2 cut began")


def test_a_fault_on_the_supervisors_node_is_judged_on_its_own_row(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "counter-1", 0, 20)
    busy(rec, "counter-2", 0, 20)
    rec.fault(1, "stop", 2.0, 3.0, target="n2")
    rec.gap("counter-1", 2.0, 3.2)
    rec.fault(2, "stop", 6.0, 10.0, target="n1", supervisor=True)
    rec.gap("counter-2", 6.0, 10.3)
    r = rec.check()
    assert dict(r.attempted) == {"stop": 2} and dict(r.injected) == {"stop": 2}  # counted by kind
    assert round(r.worst["stop"].seconds, 2) == 1.2 and round(r.worst["stop:supervisor"].seconds, 2) == 4.3
    assert [m.split(":", 2)[:2] for m in r.missed] == [["stop", "supervisor"]]
    rows = {line.split()[0]: line for line in r.lines() if line.startswith("  stop")}
    assert "(goal 2 s: met)" in rows["stop"] and "(goal 2 s: MISSED)" in rows["stop:supervisor"]
    assert "#2 stop on n1" in rows["stop:supervisor"]
    judged = rec.check(judged=["stop"])  # what a run that judges only what the runtime meets asks
    assert judged.ok
    rows = {line.split()[0]: line for line in judged.lines() if line.startswith("  stop")}
    assert "(goal 2 s: not judged)" in rows["stop:supervisor"] and "(goal 2 s: met)" in rows["stop"]


def test_a_window_that_begins_just_after_the_heal_is_still_the_faults(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "counter-1", 0, 20)
    rec.fault(1, "kill", 5.0, 5.1)            # the node is ready again at 5.1 ...
    rec.gap("counter-1", 5.3, 6.5)            # ... its agent is not served from 5.3 to 6.5
    rec.gap("counter-1", 12.0, 12.2)          # long after: ordinary latency
    r = rec.check()
    assert round(r.worst["kill"].seconds, 2) == 1.2 and round(r.worst["no fault"].seconds, 2) == 0.2
    assert r.missed and r.missed[0].startswith("kill: counter-1 could not be served for 1.20 s")
