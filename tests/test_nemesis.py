"""The chaos suite's parts on their own: which faults can be injected here, a fault that
is recorded as injected only once it is, healed on every path; the workload's clients
not held up by one stuck agent; a run that refuses to start when a fault cannot be made."""

import asyncio
import os
import subprocess
import sys

import pytest

from procs import ROOT, env

sys.path.insert(0, str(ROOT / "scripts" / "chaos"))
import nemesis as nemesis_mod  # noqa: E402
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
