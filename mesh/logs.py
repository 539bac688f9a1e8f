"""Log lines: text by default; with MESH_LOG_FORMAT=json, one JSON object per line
carrying the node, the agent and incarnation whose handler wrote it, and while tracing
(mesh.otel) the trace id, so that a log pipeline can filter by them without parsing
messages.

The agent comes from AGENT, a context variable the runner sets around each handler (an
async handler's task inherits it), or from a record's own `agent`/`incarnation` extras
(the runner's lines about an agent it crashed or stopped).
"""

from __future__ import annotations

import contextvars
import json
import logging

from . import otel

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

AGENT: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("mesh_agent", default=None)
tagging = False  # whether runners set AGENT: only while lines are JSON (nobody reads it otherwise)
_node: str | None = None


def set_node(name: str) -> None:
    """This process runs node `name` (said in every JSON line from now on)."""
    global _node
    _node = name


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"t": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "pid": record.process, "msg": record.getMessage()}
        if _node is not None:
            out["node"] = _node
        agent = getattr(record, "agent", None)
        if agent is not None:
            out["agent"], out["incarnation"] = agent, getattr(record, "incarnation", None)
        else:
            current = AGENT.get()
            if current is not None:
                out["agent"], out["incarnation"] = current
        if otel.tracer is not None:
            trace_id = otel.trace_id()
            if trace_id is not None:
                out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=repr, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    global tagging
    tagging = kind == "json"
    return JsonFormatter() if tagging else logging.Formatter(TEXT)
