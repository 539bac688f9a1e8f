"""The supervisor's indexes of its children: by node (a node lost, drained or audited
visits its own children, not all of them) and counts by status and kind (`mesh status`
at a million agents reads counts). Each must say what the children say after every
kind of change; a lost node's agents are moved a bounded number per turn."""

import asyncio
import sys
from collections import Counter

import pytest

from harness import Cluster, make_config
from mesh import supervisor_nodes


@pytest.mark.parametrize("per_turn", [2000, 7])
def test_the_indexes_of_children_follow_every_change(tmp_path, monkeypatch, per_turn):
    monkeypatch.setattr(supervisor_nodes, "MOVES_PER_TURN", per_turn)

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            m = c.client()
            names = [f"a{i}" for i in range(60)]
            await c.run(asyncio.gather(*(m.spawn(n, "counter") for n in names)), limit_s=30)
            role = c.role

            def agrees():
                want: dict = {}
                for name, child in role.children.items():
                    if child.node is not None:
                        want.setdefault(child.node, set()).add(name)
                have = {node: set(kids) for node, kids in role.on_node.items() if kids}
                statuses = Counter(child.status for child in role.children.values())
                kinds = Counter(child.spec.kind for child in role.children.values())
                return (want == have and +role.by_status == statuses and +role.by_kind == kinds)
            assert agrees() and len(role.on_node["n2"]) == 20
            c.kill("n2")
            await c.advance(c.cfg.timing.dead_after_s + 1)
            await c.run(asyncio.gather(*(m.call(n, {"op": "get"}) for n in names)), limit_s=30)
            assert agrees() and not role.on_node.get("n2")
            await c.run(asyncio.gather(*(m.stop(n) for n in names[:30])), limit_s=30)
            await c.settle()
            assert agrees() and sum(len(k) for k in role.on_node.values()) == len(role.children)
            status = await c.run(m.status(agents=False))
            assert status["statuses"] == {"running": len(role.children)}
            assert status["kinds"] == dict(Counter(child.spec.kind for child in role.children.values()))
        finally:
            await c.close()
    asyncio.run(go())


def test_a_lost_nodes_agents_are_started_a_bounded_number_per_placement_pass(tmp_path, monkeypatch):
    """Moves mark the children pending; each placement pass puts at most
    LAUNCHES_PER_PASS starts on their way (a task for each of 333,333 moves at once held
    gigabytes), and every one comes back."""
    from mesh import supervisor_starts
    monkeypatch.setattr(supervisor_starts, "LAUNCHES_PER_PASS", 5)

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            m = c.client()
            names = [f"a{i}" for i in range(60)]
            await c.run(asyncio.gather(*(m.spawn(n, "counter") for n in names)), limit_s=30)
            await c.run(asyncio.gather(*(m.call(n, {"op": "add", "n": 2}) for n in names)), limit_s=30)
            role, passes, frames = c.role, Counter(), []
            start = role._start_or_crash

            def counted(child, **kw):  # starts counted per call of the pass that launched them
                frame = sys._getframe(1)
                frames.append(frame)  # kept, so that no two passes share an id
                passes[id(frame)] += frame.f_code.co_name == "_place_pending"
                return start(child, **kw)
            role._start_or_crash = counted
            c.kill("n2")
            await c.advance(c.cfg.timing.dead_after_s + 1)
            values = await c.run(asyncio.gather(*(m.call(n, {"op": "get"}) for n in names)), limit_s=60)
            assert values == [2] * len(names)  # each came back with its state
            assert max(passes.values()) <= 5 and sum(passes.values()) >= 20
        finally:
            await c.close()
    asyncio.run(go())


def test_a_node_with_more_agents_is_audited_less_often(tmp_path, monkeypatch):
    """An audit costs in proportion to the node's agents: one per liveness window for
    up to AUDIT_PER_WINDOW agents, one per that many windows per AUDIT_PER_WINDOW above."""
    monkeypatch.setattr(supervisor_nodes, "AUDIT_PER_WINDOW", 5)

    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            m = c.client()
            await c.run(asyncio.gather(*(m.spawn(f"a{i}", "counter") for i in range(60))), limit_s=30)
            role, audits = c.role, []
            role._audit = lambda node: audits.append((node, c.clock.now())) or asyncio.sleep(0)
            window = c.cfg.timing.dead_after_s
            view = role.nodes["n2"]  # 20 agents: an audit per 4 windows
            view.audited_at = c.clock.now() - 100
            for _ in range(10):
                role._audit_soon(view)
                c.clock.advance(window * 1.001)
            assert len(audits) == 3, audits  # at 0, 4 and 8 windows
        finally:
            await c.close()
    asyncio.run(go())
