"""Prometheus metrics of one node, served over HTTP when its config sets `metrics_port`.

Most figures are counters the node keeps anyway (Node.stats, the model client's usage,
each serving agent's figures, the supervisor's exits): they are read when Prometheus
scrapes, so a node that nobody scrapes pays nothing for them. Two histograms are kept
only while metrics are on: each call's time from its arrival at the agent until its
answer is ready, and each commit group's time and size. `prometheus-client` is an
optional extra (`pip install -e '.[metrics]'`); the core never imports it.

A scrape runs in the exporter's HTTP thread; it asks the node's loop for a snapshot
(so nothing is read while the loop changes it), waiting at most SNAPSHOT_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("mesh.metrics")

SNAPSHOT_TIMEOUT_S = 2.0
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECORDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Counts per bucket and a sum: what one Prometheus histogram needs, at one bisect
    and two additions per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.total = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative, as Prometheus wants them, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class Recorder:
    """The figures metrics add to a node's hot paths (Node.metrics; None when off)."""

    def __init__(self):
        self.calls: dict[tuple[str, str], Histogram] = {}  # (kind, outcome) -> seconds
        self.commit_seconds = Histogram(SECONDS)
        self.commit_records = Histogram(RECORDS)
        self.replication_seconds = Histogram(SECONDS)  # a group's copies, after its local commit

    def call(self, kind: str, error: bool, seconds: float) -> None:
        key = (kind, "error" if error else "ok")
        h = self.calls.get(key)
        if h is None:
            h = self.calls[key] = Histogram(SECONDS)
        h.observe(seconds)

    def commit(self, records: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_records.observe(records)

    def replicated(self, seconds: float) -> None:
        self.replication_seconds.observe(seconds)


def snapshot(node: "Node") -> dict[str, Any]:
    """What a scrape reports, read on the node's loop."""
    agents, mailbox, handled = Counter(), Counter(), Counter()
    serving = {}
    for r in node.runners.values():
        agents[r.kind] += 1
        mailbox[r.kind] += len(r.mailbox or ())
        handled[r.kind] += r.handled
        figures = getattr(r.agent, "figures", None)
        if figures is not None and hasattr(figures, "batches"):
            serving[r.name] = (figures.batches, figures.inputs, figures.dropped)
    rec = node.metrics
    llm = node._llm
    role = getattr(node, "supervisor", None)
    return {
        "stats": dict(node.stats), "agents": agents, "mailbox": mailbox, "handled": handled, "serving": serving,
        "calls": {k: (h.buckets(), h.total) for k, h in rec.calls.items()} if rec else {},
        "commit_seconds": (rec.commit_seconds.buckets(), rec.commit_seconds.total) if rec else None,
        "commit_records": (rec.commit_records.buckets(), rec.commit_records.total) if rec else None,
        "replication_seconds": (rec.replication_seconds.buckets(), rec.replication_seconds.total) if rec else None,
        "renewals": node._renewals,
        "llm": dict(llm.usage) if llm is not None else {},
        "breaker": llm.breaker.state if llm is not None else None,
        "exits": dict(role.exit_counts) if role is not None else {},
        "lease_valid": bool(node.lease.valid()) if hasattr(node.lease, "valid") else None,
    }


class _Collector:
    """Builds the metric families from a snapshot, once per scrape."""

    def __init__(self, node: "Node", loop: asyncio.AbstractEventLoop):
        self.node, self.loop = node, loop

    def _snapshot(self) -> dict | None:
        async def take():
            return snapshot(self.node)
        try:
            return asyncio.run_coroutine_threadsafe(take(), self.loop).result(SNAPSHOT_TIMEOUT_S)
        except Exception as exc:  # a loop that is busy past the timeout, or gone
            log.warning("metrics: no snapshot of node %s: %s: %s", self.node.name, type(exc).__name__, exc)
            return None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self._snapshot()
        if snap is None:
            return
        node = self.node.name
        events = CounterMetricFamily("mesh_node_events", "What a node counted, by event (Node.stats)",
                                     labels=["node", "event"])
        for event, n in sorted(snap["stats"].items()):
            events.add_metric([node, event], n)
        yield events
        for name, doc, key in (("mesh_agents", "Agents running on the node, by kind", "agents"),
                               ("mesh_mailbox_depth", "Messages waiting in agents' mailboxes, by kind", "mailbox")):
            g = GaugeMetricFamily(name, doc, labels=["node", "kind"])
            for kind, n in sorted(snap[key].items()):
                g.add_metric([node, kind], n)
            yield g
        handled = CounterMetricFamily("mesh_messages_handled", "Messages handled by the node's current "
                                      "incarnations, by kind", labels=["node", "kind"])
        for kind, n in sorted(snap["handled"].items()):
            handled.add_metric([node, kind], n)
        yield handled
        calls = HistogramMetricFamily("mesh_call_seconds", "A call's time from its arrival at the agent "
                                      "until its answer is ready, by kind and outcome", labels=["node", "kind", "outcome"])
        for (kind, outcome), (buckets, total) in sorted(snap["calls"].items()):
            calls.add_metric([node, kind, outcome], buckets, total)
        yield calls
        for name, doc, key in (("mesh_commit_seconds", "A commit group's time from submit to durable", "commit_seconds"),
                               ("mesh_commit_records", "Agents' records per commit group", "commit_records"),
                               ("mesh_replication_seconds", "A commit group's time from its local commit until "
                                "every replica host has it (the replicas' lag)", "replication_seconds")):
            if snap[key] is not None:
                h = HistogramMetricFamily(name, doc, labels=["node"])
                h.add_metric([node], *snap[key])
                yield h
        batches = CounterMetricFamily("mesh_serving_batches", "Batches run by serving agents", labels=["node", "agent"])
        inputs = CounterMetricFamily("mesh_serving_inputs", "Inputs run by serving agents", labels=["node", "agent"])
        for agent, (b, i, _dropped) in sorted(snap["serving"].items()):
            batches.add_metric([node, agent], b)
            inputs.add_metric([node, agent], i)
        yield batches
        yield inputs
        llm = CounterMetricFamily("mesh_llm", "The model client's requests, failures, retries and tokens",
                                  labels=["node", "what"])
        for what, n in sorted(snap["llm"].items()):
            llm.add_metric([node, what], n)
        yield llm
        if snap["breaker"] is not None:
            g = GaugeMetricFamily("mesh_llm_breaker_open", "1 while the model API's circuit breaker is not closed",
                                  labels=["node", "state"])
            g.add_metric([node, snap["breaker"]], 0 if snap["breaker"] == "closed" else 1)
            yield g
        exits = CounterMetricFamily("mesh_supervisor_exits", "Agents' exits the supervisor handled, by how "
                                    "(crash, timeout, lost, normal, shutdown)", labels=["node", "how"])
        for how, n in sorted(snap["exits"].items()):
            exits.add_metric([node, how], n)
        yield exits
        renewals = CounterMetricFamily("mesh_lease_renewals_sent", "Lease renewals the node asked for",
                                       labels=["node"])
        renewals.add_metric([node], snap["renewals"])
        yield renewals
        if snap["lease_valid"] is not None:
            g = GaugeMetricFamily("mesh_lease_valid", "1 while the node holds its lease to serve", labels=["node"])
            g.add_metric([node], int(snap["lease_valid"]))
            yield g


def serve(node: "Node", loop: asyncio.AbstractEventLoop):
    """Start serving `node`'s metrics on its metrics_port; returns (server, thread)."""
    try:
        import prometheus_client
        from prometheus_client import CollectorRegistry, ProcessCollector
    except ImportError:
        raise ConfigError("config", f"nodes.{node.name}.metrics_port",
                          "needs prometheus-client: pip install -e '.[metrics]'") from None
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, open fds
    registry.register(_Collector(node, loop))
    node.metrics = Recorder()
    spec = node.spec
    return prometheus_client.start_http_server(spec.metrics_port, spec.address, registry=registry)
