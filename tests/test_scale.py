"""The work per spawn, stop and failed spawn does not grow with the population (issue 22).

Counted, not timed, so the test is deterministic on a loaded machine. Work is two
counts taken while a fixed set of requests runs through the in-memory mesh:

  * lines of mesh code executed (sys.settrace): catches a Python loop over children,
    names or runners;
  * comparisons of agents' names (`Name.__eq__`/`__lt__`): catches scans that run in C
    (`name in some_list`, `list.remove`, `list.index`, `sorted`), which run no line of
    Python. The population's names are `Name`s, so every comparison with one of them is
    counted, whichever side the scan holds.

The population is put into the supervisor's records directly (as its boot does with
persisted children): 100,000 real spawns would take minutes here; this way the test
takes 20-40 s, most of it making the 100,000 records and sending their registry
entries once. The nodes host only the measured agents: a node's own per-agent work
at 100,000 runners is not covered here. It is what the
supervisor's per-agent work could depend on: its children, its dynamic supervisor's
list of them and the registry's table. Each measured request then goes through the
whole path: client, node, supervisor, the records' commit, START, the node's commit.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from harness import Cluster, make_config
from mesh.errors import AgentCrashed
from mesh.supervision import ChildSpec
from mesh.tree import Child, ChildStatus

MESH = str(Path(__file__).resolve().parent.parent / "mesh")
COMPARISONS = [0]


class Name(str):
    """An agent's name that counts the comparisons made with it."""

    __hash__ = str.__hash__

    def __eq__(self, other):
        COMPARISONS[0] += 1
        return str.__eq__(self, other)

    def __ne__(self, other):
        COMPARISONS[0] += 1
        return str.__ne__(self, other)

    def __lt__(self, other):
        COMPARISONS[0] += 1
        return str.__lt__(self, other)


def populate(c: Cluster, n: int) -> None:
    """`n` dynamic children that run (as far as the supervisor's records say)."""
    role = c.role
    sup = role.sups[c.cfg.dynamic_supervisor]
    for i in range(n):
        name = Name(f"pop{i:07d}")
        child = Child(ChildSpec(name, "counter", {}, "permanent"), sup.spec.name, dynamic=True,
                      born=role._new_incarnation(), status=ChildStatus.RUNNING, node="n2")
        child.incarnation = child.born
        role.children[name] = child
        sup.children[name] = None
        role.table.set(name, None, child.incarnation)


class Work:
    """Counts lines of mesh code run and name comparisons, while active."""

    def __init__(self):
        self.lines = 0

    def _trace(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(MESH):
            return None
        if event == "line":
            self.lines += 1
        return self._trace

    def __enter__(self):
        COMPARISONS[0] = 0
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        self.comparisons = COMPARISONS[0]


async def work_at(tmp_path: Path, population: int, requests: int) -> dict[str, tuple[int, int]]:
    """(lines, comparisons) per request of each sort, with `population` agents."""
    where = tmp_path / str(population)
    where.mkdir()
    c = Cluster(make_config(where), where)
    await c.start()
    m = c.client()
    try:
        populate(c, population)
        c.role._push_registry()
        await c.settle()
        await m.spawn("warm-up", "counter")  # the first of a kind loads its class
        await m.stop("warm-up")
        await c.settle()
        out = {}

        async def measure(what: str, one, count: int = requests) -> None:
            tasks = []
            with Work() as work:
                for i in range(count):
                    tasks.append(asyncio.ensure_future(one(i)))
                await asyncio.gather(*tasks)
                await c.settle()
            out[what] = (work.lines // count, work.comparisons // count)

        await measure("spawn", lambda i: m.spawn(f"s{i}", "counter"))
        await measure("call", lambda i: m.call(f"s{i}", {"op": "add", "n": 1}))

        async def crash(i: int) -> None:  # an exit, and the restart that follows it
            with pytest.raises(AgentCrashed):
                await m.call(f"s{i}", {"op": "crash"})
            await c.settle()
            await m.call(f"s{i}", {"op": "get"})
        await measure("crash and restart", crash, 2)  # fewer than the intensity allows
        await measure("stop", lambda i: m.stop(f"s{i}"))

        async def failed_spawn(i: int) -> None:
            with pytest.raises(AgentCrashed):
                await m.spawn(f"f{i}", "failsinit")
        await measure("failed spawn", failed_spawn)

        async def placement_pass(i: int) -> None:  # what every heartbeat tick runs
            c.role.place_pending()
        await measure("placement pass", placement_pass)
        return out
    finally:
        c.role.stopping = True  # the population runs nowhere: no node's goodbye moves it
        await c.close()


@pytest.mark.async_timeout(120)
async def test_work_per_request_and_per_tick_does_not_grow_with_the_population(tmp_path):
    small = await work_at(tmp_path, 1_000, 50)
    large = await work_at(tmp_path, 100_000, 50)
    for what in small:
        (lines_s, cmp_s), (lines_l, cmp_l) = small[what], large[what]
        # a few percent of slack: a name's hash slot and the like can differ, a scan of
        # 99,000 more names cannot hide in it
        assert lines_l <= lines_s * 1.1 + 20, (what, small[what], large[what])
        assert cmp_l <= cmp_s * 1.1 + 20, (what, small[what], large[what])
