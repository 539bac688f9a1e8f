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


# --- the control plane's faults (--control) -------------------------------------------------------

def served(tmp_path, host, node, agent, times, offset=0.0):
    """Served records of `agent` on `host`'s node at these times (seconds after T0), written
    with the host's wall-clock offset as the nodes write them."""
    folder = tmp_path / "data" / host / "served"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{node}.log", "a") as f:
        for t in times:
            f.write(f"{T0 + t + offset:.6f} {agent} 7{host[1]}\n")


def test_the_leaders_host_killed_counts_its_own_agents_and_the_others_apart(tmp_path):
    rec = Recorder(tmp_path, skew={"h1": 0.0, "h2": 600.0})
    for agent in ("counter-1", "counter-2", "counter-3"):
        busy(rec, agent, 0, 40)
    served(tmp_path, "h1", "n1", "counter-1", [1.0, 4.9])          # on the leader's host when it died
    served(tmp_path, "h2", "n2", "counter-2", [1.0, 4.9], 600.0)   # elsewhere (its clock 600 s ahead)
    served(tmp_path, "h2", "n2", "counter-1", [8.0], 600.0)        # moved there after the kill
    rec.fault(1, "leaderhost", 5.0, 30.0, target="h1", supervisor=True)
    rec.gap("counter-1", 5.0, 8.5)   # the dead host's agent: 3.5 s
    rec.gap("counter-2", 5.2, 6.0)   # another host's: 0.8 s
    rec.gap("counter-3", 5.0, 6.5)   # never served before the kill: counted as the dead host's
    r = rec.check()
    assert round(r.worst["leaderhost:own"].seconds, 2) == 3.5 and r.worst["leaderhost:own"].agent == "counter-1"
    assert round(r.worst["leaderhost:others"].seconds, 2) == 0.8
    assert "leaderhost" not in r.worst and "leaderhost:supervisor" not in r.worst
    assert r.measured["leaderhost:own"] == r.measured["leaderhost:others"] == 1
    assert dict(r.injected) == {"leaderhost": 1}
    rows = {line.split()[0]: line for line in r.lines() if line.startswith("  leaderhost")}
    assert set(rows) == {"leaderhost:others", "leaderhost:own"}
    assert "(goal 3 s: not judged) longest fault 25.00 s" in rows["leaderhost:own"]  # not judged by default
    assert "(goal 1 s: not judged)" in rows["leaderhost:others"] and r.ok
    judged = rec.check(judged=["leaderhost:others", "leaderhost:own"])
    assert [m.split(":", 2)[:2] for m in judged.missed] == [["leaderhost", "own"]]
    assert "could not be served for 3.50 s" in judged.missed[0] and "#1 leaderhost on h1" in judged.missed[0]
    assert check.goal("leaderhost:others") == 1.0 and check.goal("leaderhost") is None
    each = check.each_fault(tmp_path)  # --each: one line per row
    assert [line.split()[1] for line in each] == ["leaderhost:others", "leaderhost:own"]
    assert "unserved  0.80 s  counter-2" in each[0] and "unserved  3.50 s  counter-1" in each[1]


def test_the_control_planes_other_faults_are_measured_without_a_goal(tmp_path):
    rec = Recorder(tmp_path)
    busy(rec, "counter-1", 0, 30)
    rec.fault(1, "leadercut", 2.0, 5.0, target="h2", supervisor=True)
    rec.gap("counter-1", 2.5, 6.0)
    rec.fault(2, "etcdall", 10.0, 10.2, target="h1,h2,h3")
    rec.gap("counter-1", 10.1, 13.0)
    rec.fault(3, "etcdkill", 20.0, 20.1, target="h3")
    rec.fault(4, "leaderhost", 25.0, injected=False)
    r = rec.check(judged=list(check.JUDGED))
    assert r.ok  # no goal, whatever the figures
    rows = {line.split()[0]: line for line in r.lines() if line.startswith("  ")}
    assert "3.50 s (no goal)" in rows["leadercut"] and "leadercut:supervisor" not in rows
    assert "2.90 s (no goal)" in rows["etcdall"] and "#2 etcdall on h1,h2,h3" in rows["etcdall"]
    assert "(no goal)" in rows["etcdkill"]
    assert "none injected: not measured" in rows["leaderhost:own"] and "leaderhost" not in rows


# --- what the workload does besides calling (issue 12): eras, crashes, shared request ids ----


class Raw:
    """A history written line by line, with times from 0 (T0), and final states."""

    def __init__(self, tmp_path, **header):
        self.dir, self.t = tmp_path, 0.0
        self.lines = [{"e": "run", "t": T0, "faults": [], "skipped": {}, "judged": [], **header}]

    def add(self, e, **fields):
        self.t += 0.01
        self.lines.append({"e": e, "t": T0 + self.t, **fields})

    def append(self, op, agent, value=None, result=None, era=None, rid=None, refused=None):
        """An append invoked and then acknowledged with `result` (or refused, or neither)."""
        extra = {k: v for k, v in (("era", era), ("rid", rid)) if v is not None}
        self.add("invoke", op=op, agent=agent, kind="append", value=op if value is None else value, **extra)
        if refused is not None:
            self.add("refused", op=op, error=refused)
        elif result is not None:
            self.add("ok", op=op, result=result)

    def check(self, final):
        (self.dir / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.lines))
        (self.dir / "final.json").write_text(json.dumps(final))
        return check.check(self.dir)


DIFFERENT = "BadRequest: request id 'a1' was used before for a different request: a request id names one request"


def lifecycle(tmp_path, fresh=(), era0_end=("a1", "a2"), stop=None, final=("b1",)):
    """life-0: era 0 appends a1, a2; read; stopped; era 1 starts (fresh read), appends b1."""
    h = Raw(tmp_path)
    h.add("spawn", agent="life-0", era=0, result={"node": "n1"})
    h.add("fresh", agent="life-0", era=0, state=[])
    h.append("a1", "life-0", result=0, era=0)
    h.append("a2", "life-0", result=1, era=0)
    h.add("era", agent="life-0", era=0, state=list(era0_end))
    h.add("stop", agent="life-0", era=0, result={"name": "life-0", "stopped": True} if stop is None else stop)
    h.add("spawn", agent="life-0", era=1, result={"node": "n2"})
    h.add("fresh", agent="life-0", era=1, state=list(fresh))
    h.append("b1", "life-0", result=0, era=1)
    return h.check({"life-0": list(final)})


def test_a_name_stopped_and_spawned_again_is_checked_era_by_era(tmp_path):
    r = lifecycle(tmp_path)
    assert r.ok, r.lines()
    assert r.eras == 2 and r.stops == 1
    assert "eras         2 spawns of names stopped and spawned again, 1 stops answered stopped; " \
           "0 not fresh, 0 not stopped" in r.lines()


def test_an_era_that_does_not_start_from_nothing_fails(tmp_path):
    r = lifecycle(tmp_path, fresh=["a1", "a2"], final=["a1", "a2", "b1"])
    assert not r.ok
    assert r.not_fresh == ['life-0 era 1: spawned again, it started from ["a1", "a2"] instead of nothing']
    assert len(r.phantom) == 2 and "life-0 era 1: \"a1\" was never sent" in r.phantom  # old values in the new era
    assert r.misordered  # b1 was acknowledged at index 0, where the old a1 is


def test_an_acknowledged_append_missing_at_the_end_of_its_era_is_lost(tmp_path):
    r = lifecycle(tmp_path, era0_end=["a1"])
    assert not r.ok and r.lost == ['life-0 era 0: acknowledged append "a2" (index 1) is missing']


def test_an_era_without_a_confirmed_stop_fails(tmp_path):
    r = lifecycle(tmp_path, stop={"name": "life-0", "stopped": False})
    assert not r.ok and len(r.not_stopped) == 1 and r.not_stopped[0].startswith("life-0 era 0: spawned again")
    gone = lifecycle(tmp_path, stop={"name": "life-0", "gone": "no agent named 'life-0'"})
    assert gone.ok, gone.lines()  # a repeat of a stop that was done; the fresh read shows it was


def test_two_requests_under_one_id_one_refused_the_other_acknowledged(tmp_path):
    h = Raw(tmp_path)
    h.append("a1", "ledger-0", result=0)
    h.append("r2", "ledger-0", rid="a1", refused=DIFFERENT)             # another client, another body
    h.append("a3", "ledger-0", result=1)
    h.append("r4", "ledger-0", value="a3", rid="a3", result=1)            # a repeat of a3, same body
    r = h.check({"ledger-0": ["a1", "a3"]})
    assert r.ok, r.lines()
    assert r.shared_ids == 2 and r.refused == 1 and r.acknowledged == 3
    assert "shared ids   2 ids used by two callers; 1 requests refused (BadRequest), 0 wrongly" in r.lines()


def test_a_shared_id_answered_with_the_other_requests_reply_fails(tmp_path):
    h = Raw(tmp_path)
    h.append("a1", "ledger-0", result=0)
    h.append("r2", "ledger-0", rid="a1", result=0)   # given a1's reply: its own append never happened
    r = h.check({"ledger-0": ["a1"]})
    assert not r.ok
    assert any("request id a1 acknowledged for 2 different requests" in c for c in r.crossed), r.crossed
    assert r.lost and "r2" in r.lost[0]


def test_a_refused_request_that_took_effect_or_a_repeat_answered_differently_fails(tmp_path):
    h = Raw(tmp_path)
    h.append("a1", "ledger-0", result=0)
    h.append("r2", "ledger-0", rid="a1", refused=DIFFERENT)
    h.append("a3", "ledger-0", result=2)
    h.append("r4", "ledger-0", value="a3", rid="a3", result=1)  # the same request, another reply
    r = h.check({"ledger-0": ["a1", "r2", "a3"]})
    assert not r.ok
    assert 'ledger-0: "r2" was refused (BadRequest), yet it was appended' in r.phantom
    assert any("one request, answered differently" in c for c in r.crossed), r.crossed


def test_a_request_refused_though_its_id_was_its_own_fails(tmp_path):
    h = Raw(tmp_path)
    h.append("a1", "ledger-0", refused="BadRequest: request id 'a1' was used before for a different request")
    r = h.check({"ledger-0": []})
    assert not r.ok and len(r.refused_wrongly) == 1 and "no other request used its id" in r.refused_wrongly[0]


def test_crashes_asked_for_are_no_effects_and_no_unserved_time(tmp_path):
    h = Raw(tmp_path)
    h.append("a1", "ledger-0", result=0)
    h.add("invoke", op="k2", agent="ledger-0", kind="crash", value=None)
    h.add("crashed", op="k2", error="ledger-0: RuntimeError: asked to crash")
    h.add("invoke", op="k3", agent="ledger-0", kind="crash", value=None)
    h.add("fail", op="k3", error="CallTimeout: no answer")                # never answered: not a window
    h.append("a4", "ledger-0")                                             # in the batch: AgentCrashed ...
    h.add("fail", op="a4", error="AgentCrashed: ledger-0: RuntimeError: asked to crash")
    h.add("ok", op="a4", result=1)                                         # ... retried, appended once
    h.add("note", text="the end")
    h.t += 5
    h.add("note", text="five seconds later")
    r = h.check({"ledger-0": ["a1", "a4"]})
    assert r.ok, r.lines()
    assert (r.crashes, r.crashed, r.operations - r.crashes) == (2, 1, 2)
    assert "crashes      2 asked for, 1 answered AgentCrashed" in r.lines()
    assert "no fault" not in r.worst  # the unanswered crash kept nothing "unserved"
    h.add("invoke", op="k5", agent="ledger-0", kind="crash", value=None)
    h.add("ok", op="k5", result=None)
    assert not h.check({"ledger-0": ["a1", "a4"]}).ok  # a crash must not be acknowledged


def test_more_operations_outstanding_on_one_agent_than_the_reply_window_are_reported(tmp_path):
    h = Raw(tmp_path, dedup_window=8)
    for i in range(12):
        h.add("invoke", op=f"o{i}", agent="life-0", kind="append", value=f"o{i}")
    for i in range(12):
        h.add("ok", op=f"o{i}", result=i)
    r = h.check({"life-0": [f"o{i}" for i in range(12)]})
    assert r.ok and r.outstanding == (12, "life-0")
    assert "outstanding  up to 12 operations in flight on one agent (life-0), reply window 8" in r.lines()


def test_served_records_of_skewed_hosts_are_compared_after_taking_the_offsets_off(tmp_path):
    """h2's wall clock runs 600 s ahead: its records, read as they are, would put its later
    incarnation's replies before h1's earlier ones' last (or the reverse); with the offsets
    the run injected taken off, the order is the real one."""
    from mesh.served import overlaps
    data = tmp_path / "data"
    for host, node, lines in (("h1", "n1", [(100.0, 1), (101.0, 1)]),        # incarnation 1 until 101
                              ("h3", "n3", [(102.0 - 300, 2), (103.0 - 300, 2)]),  # then 2 on h3 (300 s behind)
                              ("h2", "n2", [(104.0 + 600, 3)])):                 # then 3 on h2 (600 s ahead)
        (data / host / "served").mkdir(parents=True)
        (data / host / "served" / f"{node}.log").write_text("".join(f"{t:.6f} life-0 {inc}\n" for t, inc in lines))
    assert [o.newer for o in overlaps(str(data))] == [2]                    # read as they are: wrong
    assert overlaps(str(data), offsets={"h1": 0, "h2": 600, "h3": -300}) == []
    h = Raw(tmp_path, skew={"h1": 0, "h2": 600, "h3": -300})
    h.append("a1", "life-0", result=0)
    r = h.check({"life-0": ["a1"]})
    assert r.ok and r.overlaps == [], r.lines()
    assert "clock skew   h1 +0 s, h2 +600 s, h3 -300 s (served records compared after taking each host's " \
           "offset off)" in r.lines()


def test_a_hosts_wall_clock_offset_is_read_from_one_place(tmp_path, monkeypatch):
    """$MESH_WALL_OFFSET_S skews Clock.wall and the served records (the chaos suite's
    clock skew per host); nothing else of the clock moves."""
    import time
    from mesh import clock
    from mesh.served import ServedLog, intervals
    monkeypatch.setattr(clock, "_wall_offset", None)
    monkeypatch.setenv(clock.WALL_OFFSET_ENV, "600")
    c = clock.Clock()
    assert abs(c.wall() - time.time() - 600) < 1 and abs(c.now() - time.monotonic()) < 1
    ServedLog(str(tmp_path / "data" / "h2"), "n2").record("x", 7)
    (first, _), = intervals(str(tmp_path / "data"))["x"].values()
    assert abs(first - time.time() - 600) < 1
    import logging
    from mesh.serve import configure_logging
    factory = logging.getLogRecordFactory()
    try:
        configure_logging()
        configure_logging()  # again, as a node forked from its launcher does: the offset counts once
        record = logging.getLogRecordFactory()("t", logging.WARNING, "f", 1, "m", (), None)
        assert abs(record.created - time.time() - 600) < 1
    finally:
        logging.setLogRecordFactory(factory)
    monkeypatch.setattr(clock, "_wall_offset", None)
    monkeypatch.setenv(clock.WALL_OFFSET_ENV, "soon")
    import pytest
    with pytest.raises(ValueError, match="MESH_WALL_OFFSET_S"):
        clock.wall()
    monkeypatch.setattr(clock, "_wall_offset", None)


def test_the_report_gives_the_honest_clients_latency(tmp_path):
    h = Raw(tmp_path, hostile="n2")
    for i in range(100):
        h.add("invoke", op=f"o{i}", agent="ledger-0", kind="append", value=f"o{i}")
        h.t += 0.001 * (i + 1) - 0.01          # op i waits i + 1 ms
        h.add("ok", op=f"o{i}", result=i)
    r = h.check({"ledger-0": [f"o{i}" for i in range(100)]})
    assert r.ok, r.lines()
    assert r.latency_line().startswith("latency      p50 51.0 ms, p99 100.0 ms, max 100 ms (100 acknowledged")
    assert "hostile peer scripts/fuzz_node.py --hostile against n2 throughout" in r.lines()
