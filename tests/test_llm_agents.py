"""Conversation and embedding agents on a real mesh, talking to the real stand-in server."""

import asyncio
import re
import shutil
import time

import pytest

import mesh
from mesh.errors import AgentCrashed, CallTimeout, LLMError
from procs import MeshRun, mesh_cmd, write_config
from standin import StandIn


@pytest.fixture(scope="module")
def standin():
    s = StandIn()
    yield s
    s.stop()


@pytest.fixture
def quiet(standin):
    standin.faults(latency_ms=0, hang_next=0, status_next=0, drop_next=0, garbage_next=0, cut_next=0, error_rate=0,
                   stream_error_next=0)
    return standin


@pytest.fixture
def mesh_up(tmp_path, quiet):
    runs = []

    def start(nodes=3, llm_connections=64):
        cfg = write_config(tmp_path, nodes=nodes, llm_url=quiet.url, llm_connections=llm_connections)
        runs.append(MeshRun("up", "-c", str(cfg)).start())
        return cfg, runs[-1]
    yield start
    for run in runs:
        run.stop()


async def test_a_conversation_survives_kill_9_with_its_whole_history(mesh_up):
    cfg, run = mesh_up()
    async with mesh.connect(cfg) as m:
        placed = await m.spawn("ada", "conversation", {"system": "Be brief."})
        await m.call("ada", {"op": "say", "text": "My name is Ada."})
        await m.call("ada", {"op": "say", "text": "I like chess."})
        run.kill_node(placed["node"])
        reply = await m.call("ada", {"op": "say", "text": "What is my name?"}, request_id="q1")
        assert reply == {"reply": "Your name is Ada.", "turn": 3}
        assert (await m.call("ada", {"op": "say", "text": "What do I like?"}))["reply"] == "You like chess."
        history = await m.call("ada", {"op": "history"})
        assert [h["role"] for h in history] == ["user", "assistant"] * 4
        assert history[0]["content"] == "My name is Ada."
        # the retried question was answered once, not appended twice
        assert (await m.call("ada", {"op": "say", "text": "What is my name?"}, request_id="q1"))["turn"] == 3


async def test_the_callers_deadline_cancels_the_upstream_request(mesh_up, quiet):
    cfg, run = mesh_up()
    async with mesh.connect(cfg) as m:
        await m.spawn("bob", "conversation")
        await m.call("bob", {"op": "say", "text": "hello"})
        quiet.faults(hang_next=1)
        cancelled = quiet.count("cancelled")
        t0 = time.monotonic()
        with pytest.raises((CallTimeout, LLMError)):
            await m.call("bob", {"op": "say", "text": "are you there?"}, timeout=0.5)
        assert time.monotonic() - t0 < 2
        deadline = time.monotonic() + 5
        while quiet.count("cancelled") == cancelled and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert quiet.count("cancelled") == cancelled + 1
        history = await m.call("bob", {"op": "history"})
        assert len(history) == 2  # the failed turn left no trace
        st = await m.status()
        assert next(a for a in st["agents"] if a["name"] == "bob")["restarts"] == 0


async def test_model_failures_reach_the_caller_without_crashing_the_agent(mesh_up, quiet):
    cfg, run = mesh_up()
    async with mesh.connect(cfg) as m:
        await m.spawn("cy", "conversation")
        quiet.faults(status_next=20, status=500)
        with pytest.raises(LLMError) as err:
            await m.call("cy", {"op": "say", "text": "hi"}, timeout=5)
        assert err.value.status == 500
        sent = quiet.count("requests")
        with pytest.raises(LLMError, match="circuit open"):  # a dead API is not hammered
            await m.call("cy", {"op": "say", "text": "hi"}, timeout=5)
        assert quiet.count("requests") == sent
        quiet.faults(status_next=0)
        deadline = time.monotonic() + 5
        while True:  # the breaker lets a probe through after breaker_reset_s (0.3 s here)
            try:
                reply = await m.call("cy", {"op": "say", "text": "hi again"})
                break
            except LLMError:
                assert time.monotonic() < deadline
        assert reply["turn"] == 1
        st = await m.status()
        assert next(a for a in st["agents"] if a["name"] == "cy")["restarts"] == 0


async def test_streamed_reply_through_the_mesh(mesh_up):
    cfg, run = mesh_up()
    async with mesh.connect(cfg) as m:
        await m.spawn("dee", "conversation")
        await m.call("dee", {"op": "say", "text": "My name is Dee."})
        pieces = []
        reply = await m.call("dee", {"op": "say", "text": "What is my name?"}, stream=pieces.append)
        assert len(pieces) > 1 and "".join(pieces) == reply["reply"] == "Your name is Dee."


async def test_an_error_inside_the_stream_commits_nothing(mesh_up, quiet):
    cfg, run = mesh_up(nodes=1)
    async with mesh.connect(cfg) as m:
        await m.spawn("eve", "conversation")
        await m.call("eve", {"op": "say", "text": "My name is Eve."})
        quiet.faults(stream_error_next=1)
        pieces = []
        with pytest.raises(LLMError, match="inside its streamed reply"):
            await m.call("eve", {"op": "say", "text": "What is my name?"}, stream=pieces.append)
        assert pieces == ["Your "]  # the caller saw the start of an answer that never was
        history = await m.call("eve", {"op": "history"})
        assert len(history) == 2 and history[0]["content"] == "My name is Eve."  # the first turn only
        reply = await m.call("eve", {"op": "say", "text": "What is my name?"}, stream=[].append)
        assert reply == {"reply": "Your name is Eve.", "turn": 2}


async def test_an_answer_cut_at_max_tokens_says_so(mesh_up):
    cfg, run = mesh_up(nodes=1)
    async with mesh.connect(cfg) as m:
        await m.spawn("fay", "conversation", {"max_tokens": 3})
        await m.call("fay", {"op": "say", "text": "My name is Fay."})
        reply = await m.call("fay", {"op": "say", "text": "What is my name?"})
        assert reply == {"reply": "Your name is", "turn": 2, "finish_reason": "length"}
        streamed = await m.call("fay", {"op": "say", "text": "What is my name?"}, stream=[].append)
        assert streamed["finish_reason"] == "length"


async def test_a_tool_loop_resumes_after_a_crash_without_running_a_done_tool_again(mesh_up):
    cfg, run = mesh_up(nodes=1)
    async with mesh.connect(cfg) as m:
        await m.spawn("calc", "calculator", {"crash_after_tool": True})
        ask = {"op": "say", "text": "Please add 2 and 40."}
        with pytest.raises(AgentCrashed, match="after the tool step's checkpoint"):
            await m.call("calc", ask, request_id="t1")
        reply = await m.call("calc", ask, request_id="t1")  # the retry resumes the turn
        assert reply == {"reply": "The tool said: 42.", "turn": 1}
        assert await m.call("calc", {"op": "adds"}) == 1  # add ran once, not again
        history = await m.call("calc", {"op": "history"})
        assert [h["role"] for h in history] == ["user", "assistant", "tool", "assistant"]
        assert history[1]["content"] is None and history[1]["tool_calls"][0]["function"]["name"] == "add"
        assert history[2]["content"] == "42"
        assert (await m.call("calc", ask))["turn"] == 2 and await m.call("calc", {"op": "adds"}) == 2


async def test_embedder_batches_concurrent_callers(mesh_up, quiet):
    cfg, run = mesh_up()
    async with mesh.connect(cfg) as m:
        await m.spawn("emb", "embedder")
        solo = await m.call("emb", {"text": "text 7"})
        batches_before = len(quiet.stats()["embedding_batches"])
        quiet.faults(latency_ms=30)
        vectors = await asyncio.gather(*(m.call("emb", {"text": f"text {i}"}) for i in range(40)))
        assert vectors[7] == solo
        batches = quiet.stats()["embedding_batches"][batches_before:]
        assert sum(batches) == 40 and len(batches) < 40 and max(batches) > 1
        many = await m.call("emb", {"texts": ["text 7", "other"]})
        assert many[0] == solo and len(many) == 2


@pytest.mark.async_timeout(120)
async def test_a_thousand_concurrent_conversations_in_one_node(mesh_up, quiet):
    cfg, run = mesh_up(nodes=1, llm_connections=16)
    async with mesh.connect(cfg) as m:
        sem = asyncio.Semaphore(200)

        async def spawn(i):
            async with sem:
                await m.spawn(f"u{i}", "conversation")
        await asyncio.gather(*(spawn(i) for i in range(1000)))
        quiet.faults(latency_ms=10)
        replies = await asyncio.gather(*(m.call(f"u{i}", {"op": "say", "text": f"My name is U{i}."}, timeout=60)
                                         for i in range(1000)))
        assert all(r["turn"] == 1 for r in replies)
        assert quiet.stats()["max_active"] <= 16   # the node's pool limit held


def test_demo_end_to_end():
    r = mesh_cmd("demo", "--users", "3", "--turns", "5", "--keep", timeout=120)
    out = r.stdout
    # the demo's folder (config, data, logs) is kept for a failure, and named in its message
    folder = re.search(r"data in (\S+)", out + r.stderr)
    where = f"\n(the demo's config and data are kept in {folder.group(1)})" if folder else ""
    assert r.returncode == 0, r.stdout + r.stderr + where
    assert re.search(r"turns lost\s+0", out) and re.search(r"turns doubled\s+0", out), out + where
    assert "kill -9 node" in out and "all conversations intact" in out, out + where
    assert "Traceback" not in r.stderr, r.stderr + where
    if folder:
        shutil.rmtree(folder.group(1), ignore_errors=True)
