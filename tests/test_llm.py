"""The model client against the stand-in server, under each of its faults."""

import asyncio
import json
import logging
import time

import pytest

from mesh.clock import FakeClock
from mesh.config import LLMSettings
from mesh.errors import LLMError
from mesh.llm import Breaker, LLMClient, backoff_s, retry_after_s
from standin import StandIn

CHAT = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": "What is my name?"}]


@pytest.fixture(scope="module")
def server():
    s = StandIn()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_faults(server):
    server.faults(latency_ms=0, hang_next=0, status_next=0, drop_next=0, garbage_next=0, cut_next=0,
                  error_rate=0, status=500, retry_after=1, stream_error_next=0, echo_auth=0)


def client(server, **kw) -> LLMClient:
    settings = dict(base_url=server.url, backoff_base_s=0.01, backoff_max_s=0.05, read_timeout_s=5)
    settings.update(kw)
    return LLMClient(LLMSettings(**settings))


async def test_chat_and_usage(server):
    c = client(server)
    result = await c.chat(CHAT)
    assert result.text == "Your name is Ada." and result.finish_reason == "stop"
    assert result.usage["completion_tokens"] == 4
    assert c.usage["completion_tokens"] == 4 and c.usage["requests"] == 1
    await c.aclose()


async def test_streaming_delivers_pieces_then_the_whole(server):
    c = client(server)
    pieces = []
    result = await c.chat(CHAT, on_delta=pieces.append)
    assert len(pieces) == 4 and "".join(pieces) == result.text == "Your name is Ada."
    assert c.usage["total_tokens"] > 0
    await c.aclose()


async def test_embeddings_in_order(server):
    c = client(server)
    a, b, a2 = await c.embed(["alpha", "beta", "alpha"])
    assert a == a2 and a != b and abs(sum(x * x for x in a) - 1) < 1e-3
    await c.aclose()


@pytest.mark.parametrize("fault", [{"status_next": 2}, {"drop_next": 2}, {"status_next": 1, "status": 503}])
async def test_transient_failures_are_retried(server, fault):
    c = client(server)
    server.faults(**fault)
    assert (await c.chat(CHAT)).text == "Your name is Ada."
    assert c.usage["retries"] >= 1
    await c.aclose()


async def test_429_waits_as_long_as_retry_after_says(server):
    c = client(server)
    server.faults(status_next=1, status=429, retry_after=1)
    t0 = time.monotonic()
    assert (await c.chat(CHAT)).text
    assert time.monotonic() - t0 >= 0.95
    assert c.breaker.state == Breaker.CLOSED  # rate limiting is not a dead API
    await c.aclose()


async def test_client_errors_are_not_retried(server):
    c = client(server)
    with pytest.raises(LLMError) as err:
        await c.chat("not a list")  # the stand-in answers 400
    assert err.value.status == 400 and "messages must be a list" in str(err.value)
    assert c.usage["retries"] == 0
    await c.aclose()


async def test_garbage_reply_is_a_clear_error_and_retried_only_as_failure(server):
    c = client(server, max_retries=0)
    server.faults(garbage_next=1)
    with pytest.raises(LLMError, match="not JSON"):
        await c.chat(CHAT)
    await c.aclose()


async def test_giving_up_after_max_retries(server):
    c = client(server, max_retries=2, breaker_failures=100)
    server.faults(status_next=10)
    with pytest.raises(LLMError) as err:
        await c.chat(CHAT)
    assert err.value.status == 500 and c.usage["retries"] == 2
    await c.aclose()


async def test_deadline_cancels_the_upstream_request(server):
    c = client(server)
    server.faults(hang_next=1)
    before = server.count("cancelled")
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="deadline"):
        await c.chat(CHAT, deadline=c.clock.now() + 0.3)
    assert time.monotonic() - t0 < 2
    await c.aclose()
    for _ in range(50):  # the server notices the closed connection within its select tick
        if server.count("cancelled") > before:
            break
        await asyncio.sleep(0.1)
    assert server.count("cancelled") == before + 1


async def test_a_broken_stream_is_not_retried(server):
    c = client(server)
    server.faults(cut_next=1)
    pieces = []
    with pytest.raises(LLMError, match="streamed reply"):
        await c.chat(CHAT, on_delta=pieces.append)
    assert pieces == ["Your "] and c.usage["retries"] == 0
    await c.aclose()


async def test_breaker_opens_fails_fast_and_probes(server):
    c = client(server, max_retries=0, breaker_failures=3, breaker_reset_s=0.5)
    server.faults(status_next=3)
    for _ in range(3):
        with pytest.raises(LLMError):
            await c.chat(CHAT)
    requests = server.count("requests")
    with pytest.raises(LLMError, match="circuit open"):
        await c.chat(CHAT)
    assert server.count("requests") == requests  # not sent at all
    await asyncio.sleep(0.55)
    assert (await c.chat(CHAT)).text  # the probe succeeds and closes it
    assert c.breaker.state == Breaker.CLOSED
    await c.aclose()


async def test_pool_limit_holds_under_many_concurrent_calls(server):
    c = client(server, max_connections=8, max_keepalive=8)
    server.faults(latency_ms=20)
    before = server.stats()["max_connections"]
    results = await asyncio.gather(*(c.chat(CHAT) for _ in range(200)))
    assert all(r.text == "Your name is Ada." for r in results)
    assert server.stats()["max_active"] <= max(8, before)
    await c.aclose()


async def test_unreachable_api(server):
    c = LLMClient(LLMSettings(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_base_s=0.01, connect_timeout_s=0.5))
    with pytest.raises(LLMError, match="cannot connect"):
        await c.chat(CHAT)
    await c.aclose()


async def test_an_error_event_inside_a_stream_fails_the_call(server):
    c = client(server, max_retries=0)
    server.faults(stream_error_next=1)
    pieces = []
    with pytest.raises(LLMError, match="inside its streamed reply: the stand-in failed mid-stream") as err:
        await c.chat(CHAT, on_delta=pieces.append)
    assert pieces == ["Your "] and err.value.status == 500 and c.usage["retries"] == 0
    assert (await c.chat(CHAT, on_delta=pieces.append)).text == "Your name is Ada."  # the next one is whole
    await c.aclose()


async def test_waiting_for_our_own_pool_does_not_open_the_breaker(server):
    c = client(server, max_connections=1, max_keepalive=1, breaker_failures=1)
    server.faults(hang_next=1)
    holder = asyncio.ensure_future(c.chat(CHAT))  # takes the only slot, and the server hangs
    while not c._slots.locked():
        await asyncio.sleep(0)
    with pytest.raises(LLMError, match="waiting for a free connection"):
        await c.chat(CHAT, deadline=c.clock.now() + 0.2)
    assert c.breaker.state == Breaker.CLOSED and c.usage["slot_timeouts"] == 1
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert (await c.chat(CHAT)).text == "Your name is Ada."
    await c.aclose()


TOOLS = [{"type": "function", "function": {"name": "add", "description": "adds two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_with_null_content_are_carried_through(server, stream):
    c = client(server)
    ask = [{"role": "user", "content": "Please add 2 and 40."}]
    result = await c.chat(ask, tools=TOOLS, on_delta=[].append if stream else None)
    assert result.text == "" and result.finish_reason == "tool_calls"
    [call] = result.tool_calls
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 2, "b": 40}
    answer = ask + [{"role": "assistant", "content": None, "tool_calls": result.tool_calls},
                    {"role": "tool", "tool_call_id": call["id"], "content": "42"}]
    assert (await c.chat(answer, tools=TOOLS)).text == "The tool said: 42."
    await c.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_cut_at_max_tokens_says_length(server, stream):
    c = client(server)
    result = await c.chat(CHAT, max_tokens=2, on_delta=[].append if stream else None)
    assert result.text.split() == ["Your", "name"] and result.finish_reason == "length"
    await c.aclose()


@pytest.mark.parametrize("fault", [{"status_next": 1, "status": 401}, {"status_next": 3, "status": 500},
                                   {"stream_error_next": 1}])
async def test_the_api_key_never_reaches_an_error_or_a_log(server, fault, monkeypatch, caplog):
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MESH_TEST_LLM_KEY", key)
    c = client(server, api_key_env="MESH_TEST_LLM_KEY", max_retries=2)
    server.faults(echo_auth=1, **fault)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LLMError) as err:
        await c.chat(CHAT, on_delta=[].append if "stream_error_next" in fault else None)
    assert "Authorization: Bearer [key]" in str(err.value)  # the upstream did echo it
    assert key not in str(err.value) and key not in repr(err.value.data) and key not in caplog.text
    await c.aclose()


# --- pure parts -----------------------------------------------------------------------------

def test_breaker_states_on_a_fake_clock():
    clock = FakeClock()
    b = Breaker(failures=2, reset_s=10, clock=clock)
    b.failure()
    assert b.allow()
    b.failure()
    assert b.state == Breaker.OPEN and not b.allow()
    clock.advance(10)
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure()
    assert b.state == Breaker.OPEN
    clock.advance(10)
    assert b.allow()
    b.success()
    assert b.state == Breaker.CLOSED and b.allow() and b.allow()


def test_backoff_and_retry_after():
    import random
    rng = random.Random(1)
    assert all(0 <= backoff_s(a, 0.1, 1.0, rng) <= min(1.0, 0.1 * 2 ** a) for a in range(10))
    assert retry_after_s("3") == 3.0 and retry_after_s("-1") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None
