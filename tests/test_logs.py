"""Log lines as JSON (MESH_LOG_FORMAT=json, mesh/logs.py): each line one object naming
the node, and the agent and incarnation whose handler wrote it; a real mesh's output
parsed line by line."""

import json
import logging

import pytest

import mesh
import procs
from mesh import logs


def test_a_json_line_names_the_agent_in_hand_or_the_one_a_record_names():
    fmt = logs.JsonFormatter()
    record = logging.LogRecord("mesh.agent.a1", logging.WARNING, __file__, 1, "x=%s", ("y",), None)
    token = logs.AGENT.set(("a1", 7))
    try:
        line = json.loads(fmt.format(record))
    finally:
        logs.AGENT.reset(token)
    assert line["msg"] == "x=y" and line["agent"] == "a1" and line["incarnation"] == 7 and line["level"] == "WARNING"
    record.agent, record.incarnation = "b2", 9  # a line about an agent, written outside its handler
    line = json.loads(fmt.format(record))
    assert (line["agent"], line["incarnation"]) == ("b2", 9)


@pytest.fixture
def json_mesh(tmp_path):
    cfg = procs.write_config(tmp_path)
    run = procs.MeshRun("up", "-c", str(cfg), env_extra={"MESH_LOG_FORMAT": "json", "MESH_LOG": "INFO"})
    try:
        run.start(wait_for="mesh ready")
        yield cfg, run
    finally:
        run.stop()


@pytest.mark.async_timeout(60)
async def test_a_mesh_logs_one_json_object_per_line(json_mesh):
    cfg, run = json_mesh
    async with mesh.connect(cfg) as m:
        placed = await m.spawn("w1", "waiter")
        assert await m.call("w1", {"op": "log", "text": "hello"}) == "logged"
    run.wait_for("asked to log: hello")
    objects = [json.loads(line) for line in run.lines if line.startswith("{")]
    assert objects and all({"t", "level", "logger", "pid", "msg"} <= o.keys() for o in objects)
    said = next(o for o in objects if o["msg"] == "asked to log: hello")
    assert said["agent"] == "w1" and said["incarnation"] == placed["incarnation"] and said["node"] == placed["node"]
    assert any(o.get("node") and "agent" not in o for o in objects)  # the nodes' own lines
