"""The real thing: `mesh up` process trees, the CLI, kill -9, clean stops."""

import asyncio
import json
import os
import signal
import time

import pytest

import mesh
from mesh.config import load
from mesh.errors import AgentCrashed, NoSuchAgent
from mesh.wire import Kind
from procs import MeshRun, alive, mesh_cmd, wait_gone, write_config


@pytest.fixture
def runs():
    started = []

    def start(*args, wait_for="mesh ready"):
        run = MeshRun(*args)
        started.append(run)
        return run.start(wait_for=wait_for)
    yield start
    for run in started:
        run.stop()


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path)


def cfg_nodes(cfg):
    return list(load(cfg).nodes)


def cli(cfg, *args, timeout=30):
    return mesh_cmd(*args[:1], "-c", str(cfg), *args[1:], timeout=timeout)


def test_cli_contract(runs, cfg):
    runs("up", "-c", str(cfg))
    r = cli(cfg, "spawn", "c1", "counter", "--args", '{"start": 5}')
    assert r.returncode == 0, r.stderr
    placed = json.loads(r.stdout)
    assert placed["name"] == "c1" and placed["node"] in ("n1", "n2", "n3") and placed["incarnation"] > 0
    assert json.loads(cli(cfg, "call", "c1", '{"op": "add", "n": 2}').stdout) == 7
    assert cli(cfg, "cast", "c1", '{"op": "add", "n": 1}').returncode == 0
    assert json.loads(cli(cfg, "call", "c1", '{"op": "get"}', "--timeout", "5").stdout) == 8
    first = cli(cfg, "call", "c1", '{"op": "add"}', "--request-id", "once")
    again = cli(cfg, "call", "c1", '{"op": "add"}', "--request-id", "once")
    assert first.stdout == again.stdout == "9\n"
    r = cli(cfg, "spawn", "j1", "counter", "--supervisor", "jobs")
    assert r.returncode == 0, r.stderr

    st = json.loads(cli(cfg, "status", "--json").stdout)
    assert [n["name"] for n in st["nodes"]] == ["n1", "n2", "n3"] and all(n["alive"] for n in st["nodes"])
    agents = {a["name"]: a for a in st["agents"]}
    assert set(agents) == {"c1", "j1", "hits", "misses"}
    assert agents["j1"]["supervisor"] == "jobs" and agents["c1"]["supervisor"] == "sessions"
    assert {"kind", "node", "incarnation", "restarts", "mailbox"} <= set(agents["c1"])
    table = cli(cfg, "status").stdout
    assert "NODE" in table and "c1" in table and "supervisor" in table

    for args, code, fragment in [
        (("call", "ghost", "{}"), 1, "NoSuchAgent"),
        (("cast", "ghost", "{}"), 1, "NoSuchAgent"),
        (("spawn", "c1", "counter"), 1, "AlreadyExists"),
        (("spawn", "x", "os:system"), 1, "NotAllowed"),
        (("call", "c1", '{"op": "crash"}'), 1, "AgentCrashed"),
        (("call", "c1", '{"op": "nope"}'), 1, "BadRequest"),
        (("stop", "hits"), 1, "NotAllowed"),
        (("call", "c1", "not json"), 2, "not valid JSON"),
        (("spawn", "x", "counter", "--args", "[1]"), 2, "JSON object"),
        (("spawn", "x", "counter", "--restart", "sometimes"), 2, "sometimes"),
        (("call", "c1", '{"n": NaN}'), 2, "NaN"),                             # not JSON
        (("spawn", "x", "counter", "--supervisor", "stats"), 1, "'stats' is not a dynamic supervisor"),
    ]:
        r = cli(cfg, *args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert fragment in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert json.loads(cli(cfg, "call", "c1", '{"op": "get"}').stdout) == 9  # kept across the crash
    assert json.loads(cli(cfg, "stop", "c1").stdout)["stopped"] is True
    assert cli(cfg, "call", "c1", '{"op": "get"}').returncode == 1


def test_usage_and_config_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nheartbeat_ms = 'soon'\n")
    for args in (("status", "-c", str(bad)), ("status", "-c", str(tmp_path / "none.toml")),
                 ("node", "-c", str(bad), "n1"), ("frobnicate",)):
        r = mesh_cmd(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert "cluster.heartbeat_ms" in mesh_cmd("status", "-c", str(bad)).stderr


def test_a_node_that_cannot_start_stops_mesh_up_with_one_line(tmp_path):
    """Before: a port already in use, or a data directory that cannot be written, gave a
    traceback on every restart of the node until the launcher gave up."""
    import socket
    cfg = write_config(tmp_path)
    text = cfg.read_text()
    port = int(text.split("port = ")[2].split()[0])  # n2's
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = mesh_cmd("up", "-c", str(cfg), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"node n2 cannot start: cannot listen on tcp://127.0.0.1:{port}" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr and r.stdout.count("node n2 cannot start") == 1
    (tmp_path / "blocked").write_text("a file where the data directory should be")
    cfg.write_text(text.replace(f'data_dir = "{tmp_path / "data"}"', f'data_dir = "{tmp_path / "blocked"}"'))
    r = mesh_cmd("up", "-c", str(cfg), timeout=60)
    assert r.returncode == 2 and "cannot open the store" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_nothing_listening_is_a_timeout_not_a_hang(cfg):
    r = cli(cfg, "call", "c1", "{}", "--timeout", "1")
    assert r.returncode == 1 and "CallTimeout" in r.stderr


async def test_kill_9_of_a_node_its_agents_answer_again_with_state(runs, cfg):
    run = runs("up", "-c", str(cfg))
    async with mesh.connect(cfg) as m:
        placed = [await m.spawn(f"l{i}", "ledger") for i in range(6)]
        for p in placed:
            await m.call(p["name"], {"op": "append", "value": p["name"]})
        victim = placed[0]["node"]
        mark = run.mark()
        old_pid = run.kill_node(victim)
        t0 = time.monotonic()
        for p in placed:
            assert await m.call(p["name"], {"op": "read"}) == [p["name"]]
        took = time.monotonic() - t0
        run.wait_for(rf"node {victim} restarted", start=mark)
        assert run.pids[victim] != old_pid and not alive(old_pid)
        assert took < 5


@pytest.mark.async_timeout(90)
async def test_a_call_while_every_node_is_down_waits_without_spinning_and_succeeds_soon_after(runs, cfg):
    run = runs("up", "-c", str(cfg))
    async with mesh.connect(cfg) as m:
        await m.spawn("c1", "counter")
        await m.call("c1", {"op": "add", "n": 4})
        for node in cfg_nodes(cfg):  # a connection to every node, each known up
            await m.caller.request(node, Kind.WHEREIS, "c1", {}, 5)
        node_pids = list(run.pids.values())
        assert run.stop() == 0
        assert wait_gone(node_pids, 10) == []
        wall0, cpu0 = time.monotonic(), time.process_time()
        call = asyncio.ensure_future(m.call("c1", {"op": "get"}, timeout=30))
        await asyncio.sleep(1.5)  # the outage's length (no event is awaited): the call retries meanwhile
        assert not call.done()
        await asyncio.to_thread(runs, "up", "-c", str(cfg))
        back = time.monotonic()
        assert await call == 4
        done = time.monotonic()
        cpu, wall = time.process_time() - cpu0, done - wall0
        # spinning took a whole core; waiting with backoff takes a few percent of one
        assert cpu < 0.25 * wall + 0.3, (cpu, wall)
        assert done - back < 3, done - back  # recovery is noticed at once, not at the deadline


async def test_supervisor_node_killed_agents_keep_serving_and_come_back(runs, cfg):
    run = runs("up", "-c", str(cfg))
    async with mesh.connect(cfg) as m:
        placed = {p["name"]: p for p in [await m.spawn(f"c{i}", "counter") for i in range(6)]}
        for name in placed:
            await m.call(name, {"op": "add", "n": 3})
        mark = run.mark()
        run.kill_node("n1")
        for name, p in placed.items():  # others serve on while the supervisor restarts
            if p["node"] != "n1":
                assert await m.call(name, {"op": "get"}) == 3
        run.wait_for("mesh ready", start=mark)
        for name in placed:
            assert await m.call(name, {"op": "add"}) == 4
        await m.spawn("after", "counter")
        st = await m.status()
        assert st["epoch"] == 2 and {a["name"] for a in st["agents"]} >= set(placed) | {"after"}


async def test_crash_restarts_the_agent_not_the_node(runs, cfg):
    run = runs("up", "-c", str(cfg))
    async with mesh.connect(cfg) as m:
        await m.call("hits", {"op": "add", "n": 2})
        await m.call("misses", {"op": "add", "n": 1})
        pids = dict(run.pids)
        with pytest.raises(AgentCrashed):
            await m.call("hits", {"op": "crash"})
        assert await m.call("hits", {"op": "get"}) == 2
        assert await m.call("misses", {"op": "get"}) == 1
        assert run.pids == pids and all(alive(p) for p in pids.values())


def test_sigterm_stops_everything_in_order_and_state_survives(runs, cfg):
    run = runs("up", "-c", str(cfg))
    assert cli(cfg, "call", "hits", '{"op": "add", "n": 41}').returncode == 0
    node_pids = list(run.pids.values())
    assert run.stop() == 0
    assert wait_gone(node_pids, 10) == []
    run2 = runs("up", "-c", str(cfg))
    assert json.loads(cli(cfg, "call", "hits", '{"op": "add"}').stdout) == 42
    assert run2.stop() == 0


def test_the_tree_starts_one_by_one_in_order_and_stops_in_reverse(runs, cfg):
    notes = cfg.parent / "notes.txt"
    text = cfg.read_text().replace('children = ["sessions", "jobs", "stats"]',
                                   'children = ["sessions", "jobs", "stats", "order", "z"]')
    text = text.replace('[nodes.n1]\nhost = "local"', '[nodes.n1]\nhost = "local"\ntags = ["first"]')
    text += '\n[tree.order]\nchildren = ["a", "b"]\n'
    for name, placement in (("a", 'placement = { tags = ["first"] }'), ("b", ""), ("z", "")):
        text += f'\n[agents.{name}]\nkind = "recorder"\nargs = {{ path = "{notes}", init_s = 0.2 }}\n{placement}\n'
    cfg.write_text(text)
    run = runs("up", "-c", str(cfg))
    assert json.loads(cli(cfg, "call", "a", "{}").stdout) == "a"  # on n1, which stops first in any case
    assert run.stop() == 0
    assert notes.read_text().splitlines() == [
        "begin a", "end a", "begin b", "end b", "begin z", "end z",   # one init at a time, in declared order
        "terminate z shutdown", "terminate b shutdown", "terminate a shutdown"]  # reverse, supervisor by supervisor


def test_mesh_up_exits_non_zero_when_its_tree_cannot_start(runs, cfg):
    cfg.write_text(cfg.read_text().replace('children = ["hits", "misses"]', 'children = ["hits", "bad", "misses"]')
                   + '\n[agents.bad]\nkind = "failsinit"\n')
    run = runs("up", "-c", str(cfg), wait_for=None)
    run.wait_for(r"mesh failed: supervisor 'stats' could not start 'bad' \(AgentCrashed: bad: init failed: "
                 r"ValueError: init refuses\): the tree did not start")
    assert run.proc.wait(30) == 1
    assert not any("mesh ready" in line for line in run.lines)


def test_nodes_stop_when_their_launcher_is_killed(runs, cfg):
    run = runs("up", "-c", str(cfg))
    node_pids = list(run.pids.values())
    os.kill(run.proc.pid, signal.SIGKILL)
    assert wait_gone(node_pids, 10) == []


async def test_launcher_gives_up_after_too_many_restarts_and_says_so_at_once(runs, tmp_path):
    cfg = write_config(tmp_path, max_restarts=1)
    run = runs("up", "-c", str(cfg))
    async with mesh.connect(cfg) as m:
        placed = [await m.spawn(f"c{i}", "counter") for i in range(6)]
        on_n3 = [p["name"] for p in placed if p["node"] == "n3"]
        for name in on_n3:
            await m.call(name, {"op": "add", "n": 7})
        mark = run.mark()
        run.kill_node("n3")
        run.wait_for("node n3 ready", start=mark)
        for name in on_n3:  # back on the restarted n3, or another node
            assert await m.call(name, {"op": "get"}) == 7
        mark = run.mark()
        run.kill_node("n3")
        run.wait_for("node n3: more than 1 restarts", start=mark)
        t0 = time.monotonic()
        for name in on_n3:  # moved at once: the launcher told the supervisor, no heartbeat wait
            assert await m.call(name, {"op": "get"}) == 7
        assert time.monotonic() - t0 < 0.9  # silence alone would take liveness x heartbeat = 1 s
        st = await m.status()
        assert not next(n for n in st["nodes"] if n["name"] == "n3")["alive"]
        assert all(a["node"] != "n3" for a in st["agents"])
        await m.spawn("late", "counter")


def test_mesh_node_runs_one_node_each(runs, cfg):
    for name in ("n2", "n3"):
        runs("node", "-c", str(cfg), name, wait_for=f"node {name} ready")
    runs("node", "-c", str(cfg), "n1", wait_for="mesh ready")
    r = cli(cfg, "spawn", "solo", "counter")
    assert r.returncode == 0, r.stderr
    assert json.loads(cli(cfg, "call", "solo", '{"op": "add"}').stdout) == 1


def test_sync_client(runs, cfg):
    runs("up", "-c", str(cfg))
    with mesh.connect_sync(cfg) as m:
        m.spawn("s1", "ledger")
        m.spawn("j1", "counter", supervisor="jobs")
        assert {a["name"]: a["supervisor"] for a in m.status()["agents"]}["j1"] == "jobs"
        assert m.call("s1", {"op": "append", "value": 1}) == 0
        m.cast("s1", {"op": "noop"})
        with pytest.raises(NoSuchAgent):
            m.call("nobody", {})
        assert m.stop("s1")["stopped"]


def test_mesh_up_runs_the_stand_in_when_asked_and_nothing_answers(runs, tmp_path):
    from mesh.demo import free_ports
    port = free_ports(1)[0]
    cfg = write_config(tmp_path, nodes=1, llm_url=f"http://127.0.0.1:{port}/v1")
    cfg.write_text(cfg.read_text().replace("[llm]\n", "[llm]\nstand_in = true\n"))
    run = runs("up", "-c", str(cfg))
    m = run.wait_for(rf"llm: nothing answered at http://127.0.0.1:{port}/v1; started the stand-in .*pid (\d+)\)")
    first = int(m.group(1))
    run.seen.add(first)
    assert json.loads(cli(cfg, "spawn", "talk", "conversation").stdout)["name"] == "talk"
    said = json.loads(cli(cfg, "call", "talk", '{"op": "say", "text": "My name is Ada."}').stdout)
    assert said["turn"] == 1
    mark = run.mark()
    os.kill(first, signal.SIGKILL)  # the launcher restarts it, like a node
    second = int(run.wait_for(r"llm: the stand-in model server exited \(-9\); restarted \(pid (\d+)\)", start=mark).group(1))
    run.seen.add(second)
    assert json.loads(cli(cfg, "call", "talk", '{"op": "say", "text": "What is my name?"}').stdout)["reply"] == "Your name is Ada."
    assert run.stop() == 0
    assert wait_gone([first, second]) == []


def test_mesh_up_leaves_a_model_server_that_answers_alone(runs, tmp_path):
    from standin import StandIn
    server = StandIn()
    try:
        cfg = write_config(tmp_path, nodes=1, llm_url=server.url)
        cfg.write_text(cfg.read_text().replace("[llm]\n", "[llm]\nstand_in = true\n"))
        run = runs("up", "-c", str(cfg))
        assert not any(line.startswith("llm:") for line in run.lines)
    finally:
        server.stop()


async def test_mesh_status_past_200_agents_counts_them_and_lists_a_page_on_request(runs, cfg):
    import mesh
    runs("up", "-c", str(cfg))
    async with mesh.connect(cfg) as m:
        for i in range(205):
            await m.spawn(f"a{i:03d}", "counter")
    out = cli(cfg, "status").stdout
    assert "KIND" in out and "AGENT " not in out and "list them with --agents" in out
    total = json.loads(cli(cfg, "status", "--json").stdout)["total"]
    assert total >= 205  # and the config's own children
    page = cli(cfg, "status", "--agents", "--limit", "3", "--kind", "counter")
    assert page.returncode == 0, page.stderr
    rows = [line.split()[0] for line in page.stdout.splitlines() if line.startswith("a")]
    assert rows == ["a000", "a001", "a002"] and "--after a002" in page.stdout
    bad = cli(cfg, "status", "--limit", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    # mesh inspect: one agent as its node and supervisor see it
    assert cli(cfg, "call", "a007", '{"op": "add", "n": 5}').returncode == 0
    shown = cli(cfg, "inspect", "a007")
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines() if not line.startswith(" "))
    assert fields["agent"].startswith("a007 (counter") and fields["state"] == '{"value": 5}'
    assert fields["mailbox"] == "0" and fields["handling"] == "nothing" and fields["restarts"] == "0"
    seen = json.loads(cli(cfg, "inspect", "a007", "--json").stdout)
    assert seen["name"] == "a007" and seen["supervision"]["kind"] == "counter"
    missing = cli(cfg, "inspect", "nobody")
    assert missing.returncode == 1 and "NoSuchAgent" in missing.stderr and "Traceback" not in missing.stderr
