"""Prometheus metrics (mesh/metrics.py): the histograms' arithmetic, a real mesh's nodes
serving their metrics over HTTP, and a real Prometheus server (the distribution's
`prometheus`, started by the test) scraping them and answering queries about them."""

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import mesh
import procs
from mesh import config as config_mod
from mesh.demo import free_ports
from mesh.errors import ConfigError
from mesh.metrics import Histogram, Recorder


def test_a_histogram_is_cumulative_and_ends_with_inf():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 2.0):
        h.observe(v)
    assert h.buckets() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert h.total == pytest.approx(2.0065)
    r = Recorder()
    r.call("counter", False, 0.002)
    r.call("counter", True, 0.002)
    r.commit(3, 0.004)
    assert set(r.calls) == {("counter", "ok"), ("counter", "error")}
    assert r.commit_records.buckets()[2] == ("4", 1)


def test_a_metrics_port_taken_by_another_node_is_a_config_error(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[hosts.h]\naddress = "127.0.0.1"\n[nodes.a]\nhost = "h"\nport = 7001\nmetrics_port = 7002\n'
                    '[nodes.b]\nhost = "h"\nport = 7002\n')
    with pytest.raises(ConfigError, match=r"nodes.b.port: port 7002 on 127.0.0.1 is also used by node 'a'"):
        config_mod.load(path)
    path.write_text('[hosts.h]\naddress = "127.0.0.1"\n[nodes.a]\nhost = "h"\nport = 7001\nmetrics_port = 0\n')
    with pytest.raises(ConfigError, match="metrics_port: must be a TCP port"):
        config_mod.load(path)


def _samples(text: str, name: str) -> dict[str, float]:
    """The samples of one metric in Prometheus's text format: labels -> value."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name):]] = float(value)
    return out


@pytest.fixture
def metrics_mesh(tmp_path):
    cfg_path = procs.write_config(tmp_path, metrics=True)
    run = procs.MeshRun("up", "-c", str(cfg_path))
    try:
        run.start(wait_for="mesh ready")
        yield config_mod.load(cfg_path), run
    finally:
        run.stop()


async def _traffic(cfg, calls: int) -> None:
    async with mesh.connect(cfg) as m:
        for i in range(3):
            await m.spawn(f"c{i}", "counter")
        for i in range(calls):
            await m.call(f"c{i % 3}", {"op": "add", "n": 1})
        with pytest.raises(mesh.BadRequest):
            await m.call("c0", {"op": "nonsense"})


@pytest.mark.async_timeout(60)
async def test_each_node_serves_its_metrics(metrics_mesh):
    cfg, _ = metrics_mesh
    await _traffic(cfg, 30)
    texts = {}
    async with httpx.AsyncClient() as http:
        for name, spec in cfg.nodes.items():
            r = await http.get(f"http://{spec.address}:{spec.metrics_port}/metrics", timeout=5)
            assert r.status_code == 200
            texts[name] = r.text
    calls = {}
    for text in texts.values():
        for labels, v in _samples(text, "mesh_call_seconds_count").items():
            if 'kind="counter"' in labels:
                calls[labels.split('outcome="')[1][:-2]] = calls.get(labels.split('outcome="')[1][:-2], 0) + v
    assert calls["ok"] >= 30 and calls["error"] >= 1
    agents = sum(v for text in texts.values() for k, v in _samples(text, "mesh_agents").items() if "counter" in k)
    assert agents == 5  # c0..c2, and the tree's hits and misses
    assert sum(sum(_samples(t, "mesh_commit_seconds_count").values()) for t in texts.values()) >= 30
    assert all(_samples(t, "process_resident_memory_bytes") for t in texts.values())
    assert _samples(texts["n1"], "mesh_lease_valid") == {'{node="n1"}': 1.0}
    assert _samples(texts["n2"], "mesh_lease_renewals_sent_total")['{node="n2"}'] >= 1
    assert _samples(texts["n2"], "mesh_replication_seconds_count") == {'{node="n2"}': 0.0}  # one host: no copies


@pytest.mark.async_timeout(90)
async def test_a_real_prometheus_scrapes_the_mesh(metrics_mesh, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    cfg, _ = metrics_mesh
    targets = ", ".join(f'"{s.address}:{s.metrics_port}"' for s in cfg.nodes.values())
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        f"scrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: [{targets}]\n")
    port = free_ports(1)[0]
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
                            start_new_session=True)
    try:
        await _traffic(cfg, 30)

        async def query(http, q: str) -> list:
            r = await http.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=5)
            return r.json()["data"]["result"] if r.status_code == 200 else []
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 45
            while True:
                try:
                    up = await query(http, 'up{job="mesh"}')
                    calls = await query(http, 'sum(mesh_call_seconds_count{kind="counter",outcome="ok"})')
                except httpx.TransportError:
                    up, calls = [], []  # not listening yet
                if len(up) == 3 and all(s["value"][1] == "1" for s in up) and calls \
                        and float(calls[0]["value"][1]) >= 30:
                    break
                assert time.monotonic() < deadline, (up, calls, Path(tmp_path / "prometheus.log").read_text()[-2000:])
                await asyncio.sleep(0.5)  # the next scrape is a second away
            agents = await query(http, 'sum(mesh_agents{kind="counter"})')
            assert float(agents[0]["value"][1]) == 5
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
