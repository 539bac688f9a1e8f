"""OpenTelemetry traces of calls, handlers, commits, replication and model requests.

Off unless the OpenTelemetry SDK is installed (`pip install -e '.[otel]'`) and a tracer
provider of the SDK is in use: the process's global one (a node process sets one up
from OTEL_TRACES_EXPORTER, see configure_from_env), or one given to `use`. While off,
`tracer` is None and each place that would make a span tests only that.

A call carries the W3C trace context of the span that made it in its envelope's meta
(`tp`, and `ts` for a tracestate), so one trace spans the client, every agent the call
reaches on any node, their own calls and model requests; a handler runs with its span
current, so the spans an agent makes itself nest under it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("mesh.otel")

tracer = None        # an SDK Tracer while tracing is on
_propagator = None   # W3C trace context: the span's context <-> the meta's "tp"/"ts"


def use(provider=None) -> None:
    """Trace with `provider` (an SDK TracerProvider); None: with the global one if it is
    the SDK's, else not at all."""
    global tracer, _propagator
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        tracer = None
        return
    provider = provider if provider is not None else trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        tracer, _propagator = provider.get_tracer("mesh"), TraceContextTextMapPropagator()
    else:
        tracer = None


def stop() -> None:
    global tracer
    tracer = None


def configure_from_env(node: str) -> None:
    """A node process's provider, from the standard variable OTEL_TRACES_EXPORTER:
    `console` (the SDK's), `otlp` (needs opentelemetry-exporter-otlp-proto-http; the
    endpoint from OTEL_EXPORTER_OTLP_ENDPOINT), unset or `none`: no tracing."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter in ("", "none"):
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        if exporter == "console":
            span_exporter = ConsoleSpanExporter()
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            span_exporter = OTLPSpanExporter()
        else:
            log.error("OTEL_TRACES_EXPORTER=%s: not console, otlp or none; no traces", exporter)
            return
    except ImportError as exc:
        log.error("OTEL_TRACES_EXPORTER=%s needs %s (pip install -e '.[otel]'); no traces", exporter, exc.name)
        return
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "mesh"),
                                                        "service.instance.id": node}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    use(provider)


def carrier() -> dict:
    """The current trace context as a call's meta keys (empty if there is none)."""
    c: dict[str, str] = {}
    _propagator.inject(c)
    if "traceparent" not in c:
        return {}
    return {"tp": c["traceparent"], **({"ts": c["tracestate"]} if c.get("tracestate") else {})}


def parent(meta: dict | None):
    """The context a message's meta carries, or None (a new trace)."""
    if not meta or type(meta.get("tp")) is not str:
        return None
    c = {"traceparent": meta["tp"]}
    if type(meta.get("ts")) is str:
        c["tracestate"] = meta["ts"]
    return _propagator.extract(c)


def kinds():
    from opentelemetry.trace import SpanKind
    return SpanKind


def start(name: str, context=None, kind: Any = None, attributes: dict | None = None, links=None):
    return tracer.start_span(name, context=context, kind=kind if kind is not None else kinds().INTERNAL,
                             attributes=attributes, links=links)


def current(span):
    """Make `span` the current one; returns the token to give `restore`."""
    from opentelemetry import context, trace
    return context.attach(trace.set_span_in_context(span))


def restore(token) -> None:
    from opentelemetry import context
    context.detach(token)


def context_of(span):
    from opentelemetry import trace
    return trace.set_span_in_context(span)


def link(span):
    from opentelemetry.trace import Link
    return Link(span.get_span_context())


def end(span, error: BaseException | str | None = None) -> None:
    if error is not None:
        from opentelemetry.trace import Status, StatusCode
        if isinstance(error, BaseException):
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


def trace_id() -> str | None:
    """The current span's trace id, as hex (log lines carry it)."""
    from opentelemetry import trace
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
