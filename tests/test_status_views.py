"""`mesh status` views (issue 22): counts whose size does not grow with the agents, and
agents listed on request, filtered and paged. In-memory network, real nodes and LMDB."""

import pytest

import mesh.client

from harness import Cluster, make_config
from mesh.errors import BadRequest
from mesh.wire import Kind


async def test_counts_by_default_and_agents_filtered_and_paged_on_request(tmp_path, monkeypatch):
    c = Cluster(make_config(tmp_path), tmp_path)
    await c.start()
    m = c.client()
    placed = {}
    for i in range(23):
        name, kind = (f"c{i:02d}", "counter") if i % 3 else (f"l{i:02d}", "ledger")
        placed[name] = ((await m.spawn(name, kind))["node"], kind)
    summary = await m.status(agents=False)
    assert "agents" not in summary and summary["total"] == 23
    assert summary["kinds"] == {"counter": 15, "ledger": 8} and summary["statuses"] == {"running": 23}
    assert sum(n["agents"] for n in summary["nodes"]) == 23
    assert all(n["alive"] for n in summary["nodes"])
    # a node asked for a summary answers with a count, not its agents
    node = next(iter(c.cfg.nodes))
    inventory = await m.caller.request(node, Kind.INVENTORY, None, {"summary": True}, 5)
    assert "agents" not in inventory and inventory["count"] == sum(1 for n, _ in placed.values() if n == node)

    pages, after = [], None
    while True:  # pages of 5, sorted by name, each naming where the next begins
        page = await m.status(limit=5, after=after)
        pages.append([a["name"] for a in page["agents"]])
        after = page.get("next")
        if after is None:
            break
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert sum(pages, []) == sorted(placed)

    ledgers = await m.status(kind="ledger")
    assert [a["name"] for a in ledgers["agents"]] == sorted(n for n, (_, k) in placed.items() if k == "ledger")
    on_node = await m.status(node=node)
    assert {a["name"] for a in on_node["agents"]} == {n for n, (where, _) in placed.items() if where == node}
    assert (await m.status(status="backoff"))["agents"] == []
    everything = await m.status()  # no view: every agent, as before views existed
    assert [a["name"] for a in everything["agents"]] == sorted(placed) and "next" not in everything
    monkeypatch.setattr(mesh.client, "STATUS_PAGE", 4)  # gathered page after page: no answer grows past one
    assert [a["name"] for a in (await m.status())["agents"]] == sorted(placed)
    with pytest.raises(BadRequest):
        await m.status(limit=0)
    await c.close()
