"""OpenTelemetry traces (mesh/otel.py): one call from a client to an agent that calls an
agent on another node, which asks a model, is one trace whose spans link up as the
calls did, and once tracing stops the same calls make none. Nodes in one process on the
in-memory network, a real model server (the stand-in), the SDK's in-memory exporter."""

import asyncio
import textwrap

import pytest

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import harness
from harness import Cluster
from mesh import config as config_mod, otel
from standin import StandIn


@pytest.fixture
def standin():
    server = StandIn()
    yield server
    server.stop()


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.use(provider)
    yield exporter
    otel.stop()


def _config(tmp_path, llm_url: str):
    text = textwrap.dedent(harness.BASE.format(mailbox=100, limits=""))
    text = text.replace("[kinds]\n", '[kinds]\nconversation = "nodes.conversation:ConversationAgent"\n', 1)
    path = tmp_path / "cluster.toml"
    path.write_text(text + f'\n[llm]\nbase_url = "{llm_url}"\nmodel = "stand-in"\n')
    return config_mod.load(path)


async def _apart(m):
    """A relay and a conversation on different nodes."""
    relay = (await m.spawn("r1", "relay"))["node"]
    for i in range(10):
        placed = await m.spawn(f"ada{i}", "conversation")
        if placed["node"] != relay:
            return f"ada{i}"
    raise AssertionError("no conversation landed away from the relay")


async def test_a_call_across_two_nodes_and_a_model_request_is_one_trace(tmp_path, standin, spans):
    c = Cluster(_config(tmp_path, standin.url), tmp_path)
    await c.start()
    m = c.client()
    try:
        ada = await _apart(m)
        spans.clear()
        reply = await asyncio.wait_for(m.call("r1", {"to": ada, "msg": {"op": "say", "text": "My name is Ada."}}), 20)
        assert reply["turn"] == 1
        await c.settle()
        done = spans.get_finished_spans()
        otel.stop()  # nobody traces now: the same calls make no span
        spans.clear()
        reply = await asyncio.wait_for(m.call("r1", {"to": ada, "msg": {"op": "say", "text": "And you?"}}), 20)
        assert reply["turn"] == 2 and spans.get_finished_spans() == ()
    finally:
        await c.close()
    by_name = {}
    for s in done:
        by_name.setdefault(s.name, []).append(s)
    root = by_name["call r1"][0]
    relay = by_name["relay call"][0]
    out = by_name[f"call {ada}"][0]
    handler = by_name["conversation call"][0]
    chat = by_name["chat stand-in"][0]
    assert root.parent is None
    assert {s.context.trace_id for s in (root, relay, out, handler, chat)} == {root.context.trace_id}
    assert relay.parent.span_id == root.context.span_id
    assert out.parent.span_id == relay.context.span_id
    assert handler.parent.span_id == out.context.span_id
    assert chat.parent.span_id == handler.context.span_id
    assert handler.attributes["mesh.node"] != relay.attributes["mesh.node"]  # it crossed nodes
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0 and chat.attributes["gen_ai.usage.output_tokens"] > 0
    commits = {s.parent.span_id for s in by_name["commit"] if s.context.trace_id == root.context.trace_id}
    assert commits == {relay.context.span_id, handler.context.span_id}  # each agent's change, committed
