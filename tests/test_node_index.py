"""The supervisor's index of children by node: it stands in for a scan of all children
when a node is lost, drained or audited."""

import asyncio

from harness import Cluster, make_config


def test_the_index_of_children_by_node_follows_every_change(tmp_path):
    """SupervisorRole.on_node (Child.node_index) stands in for a scan of all children when
    a node is lost, drained or audited: after spawns, a node's death, moves and stops it
    must say exactly what the children say."""
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
                return want == have
            assert agrees() and role.on_node["n2"]
            c.kill("n2")
            await c.advance(c.cfg.timing.dead_after_s + 1)
            await c.run(asyncio.gather(*(m.call(n, {"op": "get"}) for n in names)), limit_s=30)
            assert agrees() and not role.on_node.get("n2")
            await c.run(asyncio.gather(*(m.stop(n) for n in names[:30])), limit_s=30)
            await c.settle()
            assert agrees() and sum(len(k) for k in role.on_node.values()) == len(role.children)
        finally:
            await c.close()
    asyncio.run(go())
