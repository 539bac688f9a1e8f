"""The chaos suite's parts on their own: which faults can be injected here, a fault that
is recorded as injected only once it is, healed on every path; the workload's clients
not held up by one stuck agent; a run that refuses to start when a fault cannot be made."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from procs import ROOT, env

sys.path.insert(0, str(ROOT / "scripts" / "chaos"))
import nemesis as nemesis_mod  # noqa: E402
import run as run_mod  # noqa: E402
from workload import Workload  # noqa: E402

RUN = ROOT / "scripts" / "chaos" / "run.py"


class Events:
    def __init__(self):
        self.events = []

    def write(self, **event):
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if e["e"] == kind]


class FakeEnv:
    def __init__(self, disk_dir=None, pids=None):
        self.disk_dir, self.pids, self.hosts = disk_dir, pids or {}, None
        self.supervisor_node, self.supervisor_host = "n1", "h1"

    def node_names(self):
        return sorted(self.pids)

    def signal_node(self, node, sig):
        pid = self.pids.get(node)
        if pid:
            os.kill(pid, sig)
        return pid


def nemesis_for(env, faults):
    return nemesis_mod.Nemesis(env, faults, seed=1, history=Events())


# --- what can be injected here --------------------------------------------------------------

def test_missing_names_every_fault_that_cannot_be_made_and_why():
    every = list(nemesis_mod.HOSTS)
    assert nemesis_mod.missing(every, hosts=True, root=True, which=lambda cmd: f"/bin/{cmd}") == {}
    one_host = nemesis_mod.missing(every, hosts=False, root=True, which=lambda cmd: f"/bin/{cmd}")
    assert set(one_host) == {"cut", "loss", "host"} and "--hosts" in one_host["cut"]
    no_nft = nemesis_mod.missing(every, hosts=True, root=True, which=lambda cmd: None if cmd == "nft" else cmd)
    assert no_nft == {"loss": "needs nftables (the nft command)"}
    no_root = nemesis_mod.missing(every, hosts=True, root=False, which=lambda cmd: cmd)
    assert set(no_root) == {"disk", "cut", "loss", "host"} and "root" in no_root["disk"]


def test_a_fault_that_cannot_be_injected_stops_the_run_before_it_starts(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with iproute2 but without nft
    bin_dir.mkdir()
    for tool in ("ip", "mount", "umount"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found:
            (bin_dir / tool).symlink_to(found)
    e = env()
    e["PATH"] = str(bin_dir)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(RUN), "--out", str(out), "--hosts", "--faults", "kill,loss",
                        "--seconds", "5"], capture_output=True, text=True, env=e, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "fault loss cannot be injected here" in r.stderr and "not started" in r.stderr
    assert not out.exists()  # nothing was made: no record, no hosts, no mesh
    r = subprocess.run([sys.executable, str(RUN), "--out", str(out), "--faults", "kill,cut", "--seconds", "5"],
                       capture_output=True, text=True, env=env(), timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "fault cut cannot be injected here: needs --hosts" in r.stderr
    assert not out.exists()


# --- faults recorded as they really were -------------------------------------------------------

async def test_a_fault_that_could_not_be_made_is_attempted_not_injected():
    nem = nemesis_for(FakeEnv(disk_dir=None), ["disk"])
    fault = await nem.one("disk", 0.1)
    assert not fault.injected and "space-limited" in fault.error
    assert nem.counts() == {"disk": (1, 0)} and nem.injected == 0 and nem.in_force() == []
    [event] = nem.history.events
    assert event["e"] == "fault" and event["injected"] is False and event["fault"] == "disk"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, mounted here and unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def free(path):
    return os.statvfs(path).f_bavail


async def test_the_disk_fault_fills_the_disk_and_gives_the_space_back(small_disk):
    (small_disk / "data").write_bytes(b"x" * 100_000)  # the store's own file stays
    before = free(small_disk)
    nem = nemesis_for(FakeEnv(disk_dir=small_disk), ["disk"])
    seen = {}

    async def hold(duration):
        seen["free"], seen["filler"] = free(small_disk), (small_disk / "filler").exists()
        with pytest.raises(OSError):  # the store cannot write while the fault is in force
            (small_disk / "more").write_bytes(b"y" * 100_000)

    nem.hold = hold
    fault = await nem.one("disk", 1.0)
    assert seen == {"free": 0, "filler": True}
    assert fault.injected and fault.end is not None and fault.end >= fault.start
    (small_disk / "more").unlink(missing_ok=True)
    assert free(small_disk) == before and not (small_disk / "filler").exists()
    assert (small_disk / "data").read_bytes() == b"x" * 100_000
    assert [e["e"] for e in nem.history.events] == ["fault", "heal"]
    assert nem.history.events[0]["injected"] is True and nem.in_force() == [] and nem.still_in_force() == []


async def test_the_disk_fault_heals_when_its_holding_is_cut_short(small_disk):
    before = free(small_disk)
    nem = nemesis_for(FakeEnv(disk_dir=small_disk), ["disk"])
    in_force = asyncio.Event()

    async def hold(duration):
        in_force.set()
        await asyncio.Event().wait()  # until cancelled

    nem.hold = hold
    task = nem.spawn("disk", 5.0)
    await in_force.wait()
    assert free(small_disk) == 0
    await nem.cancel()  # what an interrupted run does
    assert task.done() and free(small_disk) == before
    assert [e["e"] for e in nem.history.events] == ["fault", "heal"] and nem.in_force() == []


async def test_a_stopped_node_is_continued_when_the_fault_ends_early(tmp_path):
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        nem = nemesis_for(FakeEnv(pids={"n1": proc.pid}), ["stop"])
        in_force = asyncio.Event()

        async def hold(duration):
            in_force.set()
            raise RuntimeError("something broke while the fault was in force")

        nem.hold = hold
        await nem.spawn("stop", 5.0)
        assert in_force.is_set() and not nemesis_mod._stopped(proc.pid)
        [fault] = nem.log
        assert fault.injected and fault.end is not None and nem.in_force() == []
        assert nem.still_in_force() == []
        assert nem.history.of("fault")[0]["supervisor"] is True  # n1 is the supervisor's node
    finally:
        proc.kill()
        proc.wait(5)


async def test_a_heal_that_fails_leaves_the_fault_in_force():
    nem = nemesis_for(FakeEnv(), ["llm"])

    class StandIn:
        def faults(self, error_rate, latency_ms):
            if error_rate == 0:
                raise ConnectionError("the model API is gone")

    nem.env.standin = StandIn()

    async def hold(duration):
        pass

    nem.hold = hold
    await nem.one("llm", 0.1)
    [fault] = nem.in_force()
    assert "heal failed" in fault.error and nem.history.of("heal_failed")


async def test_restart_is_in_force_until_the_restart_returns_and_a_failed_one_says_why():
    env = FakeEnv(pids={"n1": 1, "n2": 2, "n3": 3})
    asked, outcomes = [], ["pid 2 -> 9, 4 agents moved", RuntimeError("not restarted: [{'agent': 'c1'}]")]

    async def restart_node(node):
        asked.append(node)
        assert nem.history.events[-1]["e"] == "fault"  # in force while the restart runs
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    env.restart_node = restart_node
    nem = nemesis_for(env, ["restart"])
    first = await nem.one("restart", 0.1)
    second = await nem.one("restart", 0.1)
    assert first.injected and first.end is not None and first.note == "pid 2 -> 9, 4 agents moved"
    assert second.injected and second.end is not None and second.note.startswith("restart failed: RuntimeError")
    assert [f.target for f in (first, second)] == asked and nem.in_force() == []


# --- the control plane's faults (--control) -------------------------------------------------------

class FakeHosts:
    """Three hosts whose kills, cuts and heals are only recorded."""

    def __init__(self):
        self.hosts = {"h1": "10.9.9.1", "h2": "10.9.9.2", "h3": "10.9.9.3"}
        self.killed, self.cuts, self.heals = [], [], []

    def kill(self, host):
        self.killed.append(host)
        return [1]

    def cut(self, host):
        self.cuts.append(host)

    def heal(self, host):
        self.heals.append(host)


class ControlEnv:
    """A mesh with [control] as the nemesis sees it: the leader is whichever node the test
    says; each etcd member is a `sleep` process, which its "launcher" (etcd_back) starts
    again once it is dead; a host restart blocks for `restart_s` and is recorded."""

    def __init__(self, leader="n2", control=True, restart_s=0.0, pids=None):
        self.leader, self.control, self.restart_s = leader, control, restart_s
        self.hosts, self.pids, self.disk_dir = FakeHosts(), pids or {}, None
        self.restarted, self.restart_threads = [], []
        self.etcd = {h: _sleeper() for h in self.hosts.hosts}
        self.every = list(self.etcd.values())

    @property
    def supervisor_node(self):
        return self.leader

    @property
    def supervisor_host(self):
        return f"h{self.leader[1]}"

    def node_names(self):
        return sorted(self.pids)

    def signal_node(self, node, sig):
        return FakeEnv.signal_node(self, node, sig)

    def restart_host(self, host):
        import threading
        self.restart_threads.append(threading.current_thread())
        time.sleep(self.restart_s)
        self.restarted.append(host)

    def etcd_hosts(self):
        return list(self.etcd)

    def etcd_pid(self, host):
        return self.etcd[host].pid

    def mark_host(self, host):
        return host

    async def etcd_back(self, host, mark, timeout):
        self.etcd[host].wait(timeout)  # killed: its launcher starts it again
        self.etcd[host] = _sleeper()
        self.every.append(self.etcd[host])
        return None

    def end(self):
        for proc in self.every:
            proc.kill()
            proc.wait(5)


def _sleeper():
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


@pytest.fixture
def control_env():
    made = []

    def make(**kw):
        made.append(ControlEnv(**kw))
        return made[-1]
    yield make
    for each in made:
        each.end()


def test_the_control_planes_faults_need_control():
    every = list(nemesis_mod.EVERY)
    def which(cmd):
        return f"/bin/{cmd}"
    assert nemesis_mod.missing(every, hosts=True, root=True, which=which, control=True) == {}
    without = nemesis_mod.missing(every, hosts=True, root=True, which=which)
    assert set(without) == set(nemesis_mod.CONTROL) and all("--control" in why for why in without.values())
    no_root = nemesis_mod.missing(list(nemesis_mod.CONTROL), hosts=True, root=False, which=which, control=True)
    assert set(no_root) == set(nemesis_mod.CONTROL) and "root" in no_root["etcdkill"]


async def test_leaderhost_kills_the_leaders_host_keeps_it_down_then_starts_it_again(control_env):
    env = control_env(leader="n2")
    nem = nemesis_mod.Nemesis(env, ["leaderhost"], seed=1, history=Events(), down=(20, 40))
    held = []

    async def hold(duration):
        held.append(duration)

    nem.hold = hold
    fault = await nem.one("leaderhost", 1.0)
    assert env.hosts.killed == ["h2"] and env.restarted == ["h2"]
    assert 20 <= held[0] <= 40  # the draw from `down`, not the fault's duration
    assert fault.injected and fault.target == "h2" and fault.end >= fault.start
    [event] = nem.history.of("fault")
    assert event["supervisor"] is True and nem.history.of("heal")[0]["id"] == fault.id
    env.leader = "n3"  # leadership moved: the next one follows it
    await nem.one("leaderhost", 1.0)
    assert env.hosts.killed == ["h2", "h3"] and nem.in_force() == []


async def test_a_host_started_again_does_not_hold_up_the_workload(control_env):
    env = control_env(restart_s=0.5)
    nem = nemesis_mod.Nemesis(env, ["host"], seed=1, history=Events())

    async def hold(duration):
        pass

    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    nem.hold = hold
    ticker = asyncio.ensure_future(tick())
    try:
        fault = await nem.one("host", 1.0)
    finally:
        ticker.cancel()
    assert env.restarted and ticks > 20  # the loop went on while the host started (0.5 s)
    assert env.restart_threads[0] is not threading.main_thread()
    assert fault.end - fault.start >= 0.5  # in force until the host is started again


async def test_a_host_down_when_the_run_is_interrupted_is_started_again_and_healed(control_env):
    env = control_env(restart_s=0.2)
    nem = nemesis_mod.Nemesis(env, ["leaderhost"], seed=1, history=Events())
    in_force = asyncio.Event()

    async def hold(duration):
        in_force.set()
        await asyncio.Event().wait()  # until cancelled

    nem.hold = hold
    task = nem.spawn("leaderhost", 1.0)
    await in_force.wait()
    await nem.cancel()  # what an interrupted run does
    assert task.done() and env.restarted == ["h2"]
    assert [e["e"] for e in nem.history.events] == ["fault", "heal"] and nem.in_force() == []


async def test_host_spares_the_supervisors_host_only_without_control(control_env):
    async def hold(duration):
        pass

    for control, expected in ((False, {"h2", "h3"}), (True, {"h1", "h2", "h3"})):
        env = control_env(leader="n1", control=control)
        nem = nemesis_mod.Nemesis(env, ["host"], seed=7, history=Events())
        nem.hold = hold
        for _ in range(30):
            await nem.one("host", 0.1)
        assert set(env.hosts.killed) == expected
        marked = {e["target"] for e in nem.history.of("fault") if e["supervisor"]}
        assert marked == ({"h1"} if control else set())  # host:supervisor rows, with [control] only


async def test_leadercut_cuts_the_leaders_host_long_enough_to_end_its_term(control_env):
    env = control_env(leader="n3")
    nem = nemesis_mod.Nemesis(env, ["leadercut"], seed=1, history=Events())
    held = []

    async def hold(duration):
        held.append(duration)
        assert env.hosts.cuts == ["h3"] and env.hosts.heals == []

    nem.hold = hold
    fault = await nem.one("leadercut", 0.5)
    assert held == [nemesis_mod.LEADER_CUT_MIN_S] and env.hosts.heals == ["h3"]
    assert fault.injected and fault.end is not None and nem.history.of("fault")[0]["supervisor"] is True


async def test_etcdkill_kills_one_member_until_its_launcher_starts_it_again(control_env):
    env = control_env()
    before = {h: p.pid for h, p in env.etcd.items()}
    nem = nemesis_mod.Nemesis(env, ["etcdkill"], seed=1, history=Events())
    fault = await nem.one("etcdkill", 1.0)
    [host] = fault.target.split(",")
    assert fault.injected and fault.pids == (before[host],) and fault.end is not None
    assert not nemesis_mod._running(before[host])  # killed (and reaped by its "launcher")
    assert all(nemesis_mod._running(env.etcd_pid(h)) for h in env.etcd)
    assert nem.history.of("fault")[0]["supervisor"] is False and nem.still_in_force() == []
    env.etcd[host].kill()  # had its launcher not started it again, the fault would show
    env.etcd[host].wait(5)
    assert nem.still_in_force() == [f"#{fault.id} etcdkill: the etcd member of {host} is not running"]


async def test_etcdall_kills_every_member_at_once(control_env):
    env = control_env()
    before = [env.etcd_pid(h) for h in ("h1", "h2", "h3")]
    nem = nemesis_mod.Nemesis(env, ["etcdall"], seed=1, history=Events())
    fault = await nem.one("etcdall", 1.0)
    assert fault.target == "h1,h2,h3" and fault.pids == tuple(before) and fault.end is not None
    assert not any(nemesis_mod._running(pid) for pid in before) and nem.still_in_force() == []


async def test_an_etcd_member_that_does_not_run_is_not_killed(control_env):
    env = control_env()
    env.etcd_pid = lambda host: None if host == "h3" else env.etcd[host].pid
    nem = nemesis_mod.Nemesis(env, ["etcdall"], seed=1, history=Events())
    fault = await nem.one("etcdall", 1.0)
    assert not fault.injected and "h3" in fault.error
    assert all(nemesis_mod._running(p.pid) for p in env.etcd.values())  # nothing was killed


async def test_the_supervisor_fault_follows_the_leader(control_env):
    nodes = {n: _sleeper() for n in ("n1", "n2", "n3")}
    env = control_env(leader="n3", pids={n: p.pid for n, p in nodes.items()})
    env.every += nodes.values()
    nem = nemesis_mod.Nemesis(env, ["supervisor", "kill"], seed=1, history=Events())
    fault = await nem.one("supervisor", 0.1)
    assert fault.target == "n3" and nodes["n3"].wait(5) == -signal.SIGKILL
    env.leader = "n1"
    fault = await nem.one("supervisor", 0.1)
    assert fault.target == "n1" and nodes["n1"].wait(5) == -signal.SIGKILL
    assert [e["supervisor"] for e in nem.history.of("fault")] == [True, True]


async def test_no_fault_begins_after_the_run_ended(control_env):
    """A kind drawn while a long fault held the slot is not started once the run is over
    (a leaderhost begun then would keep a host down after the workload stopped)."""
    env = control_env()
    nem = nemesis_mod.Nemesis(env, ["leaderhost"], seed=1, history=Events(), interval=(0.01, 0.01))
    stop = asyncio.Event()
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold(duration):
        holding.set()
        await release.wait()

    nem.hold = hold
    running = asyncio.ensure_future(nem.run(stop))
    await holding.wait()
    await asyncio.sleep(0.05)  # the next kind is drawn, and waits for the slot
    stop.set()
    release.set()
    await asyncio.wait_for(running, 5)
    assert len(nem.log) == 1 and env.hosts.killed == ["h2"]


def test_the_leader_is_the_node_that_said_so_with_the_highest_term():
    class Run:
        def __init__(self, *lines):
            self.lines = list(lines)

    said = "2026-12-02 16:21:43,133 INFO mesh.leadership[2537]: leadership: {} leads, term {}"
    h1, h2 = Run(said.format("n1", 2)), Run("node n2 ready (pid 9, 300 ms)")
    leaders = run_mod.Leaders()
    assert leaders.read([h1, h2]) == "n1"
    h2.lines += [said.format("n2", 11), "node n1: n2 leads (term 11)"]
    assert leaders.read([h1, h2]) == "n2"
    h1.lines.append(said.format("n1", 7))  # an older term, said late: not the leader
    assert leaders.read([h1, h2]) == "n2"
    assert leaders.read([Run(said.format("n3", 12))]) == "n3"  # a host started again: a new run


def test_an_etcd_members_pid_is_what_its_launcher_said_last():
    lines = ["etcd: member h1: started (pid 100)", "node n1 ready (pid 101, 400 ms)",
             "etcd: member h1 exited (-9); restarted (pid 102)"]
    assert run_mod.etcd_pid(lines, "h1") == 102 and run_mod.etcd_pid(lines, "h2") is None
    assert run_mod.etcd_pid(lines[:1], "h1") == 100
    lines.append("etcd: member h1 (pid 103) exited (1); not restarted: it exited too often")
    assert run_mod.etcd_pid(lines, "h1") is None
    assert run_mod.etcd_pid(["etcd: member h1 did not start: its client port 2379 did not open"], "h1") is None


# --- the workload ----------------------------------------------------------------------------

class StuckClient:
    """Answers every call at once, except those to `stuck`, which wait until released."""

    def __init__(self, stuck, stop_after):
        self.stuck, self.stop_after = stuck, stop_after
        self.release = asyncio.Event()
        self.answered = []
        self.stop = asyncio.Event()

    async def call(self, name, msg, timeout, request_id):
        if name == self.stuck:
            await self.release.wait()
        self.answered.append(name)
        if len(self.answered) >= self.stop_after:
            self.stop.set()
        return 0


@pytest.mark.async_timeout(20)
async def test_a_stuck_agent_does_not_hold_up_its_clients_other_operations(tmp_path):
    client = StuckClient("counter-0", stop_after=50)
    agents = {f"counter-{i}": "counter" for i in range(4)}
    work = Workload(client, Events(), agents, clients=1, seed=3, patience=0.01)
    runner = asyncio.ensure_future(work.run(client.stop, settle_s=5))
    await client.stop.wait()  # 50 answers from the other agents while counter-0 is stuck
    assert "counter-0" not in client.answered and set(client.answered) == {"counter-1", "counter-2", "counter-3"}
    stuck_ops = [e for e in work.history.events if e["e"] == "invoke" and e["agent"] == "counter-0"]
    assert len(stuck_ops) == 1  # never two of one client's operations on one agent
    client.release.set()
    await runner
    assert work.counts["ok"] == len(client.answered) and work.counts["pending"] == 0
