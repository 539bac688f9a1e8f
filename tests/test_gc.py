"""A node's garbage collector: what survives a full collection is not walked again, and
stopping agents leaves no cycle that freezing would keep."""

import asyncio
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from harness import Cluster, make_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_full_collection_freezes_what_survived_it():
    """In a process of its own: collector.tune changes the collector for the whole process."""
    code = textwrap.dedent("""
        import gc
        from mesh import collector
        collector.tune()
        held = [[i] for i in range(10_000)]
        gc.collect()
        assert gc.get_freeze_count() >= 10_000, gc.get_freeze_count()
        assert len(gc.get_objects(2)) < 100, len(gc.get_objects(2))
        cycle = [[] for _ in range(1000)]
        for a, b in zip(cycle, cycle[1:]):
            a.append(b)
        cycle[-1].append(cycle[0])
        del cycle, a, b
        assert gc.collect() >= 1000  # garbage born after the freeze still goes
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_full_collection_is_due_once_the_oldest_generation_holds_enough():
    """Not when a quarter of everything that ever survived is new (at a million agents,
    a walk of millions of objects), but at `FULL_AFTER` of them."""
    code = textwrap.dedent("""
        import gc
        from mesh import collector
        collector.FULL_AFTER = 3000
        collector.tune()
        held = [[i] for i in range(1000)]
        gc.collect(1)  # a middle collection: its survivors go to the oldest generation
        assert len(gc.get_objects(2)) >= 1000
        collector.check()
        assert len(gc.get_objects(2)) >= 1000, "not due yet"
        held += [[i] for i in range(5000)]
        gc.collect(1)
        collector.check()
        assert len(gc.get_objects(2)) < 100, len(gc.get_objects(2))
        assert gc.get_freeze_count() >= 6000
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_stopped_agents_leave_no_cycle_among_frozen_objects(tmp_path):
    """What freezing costs: a cycle among objects that were frozen is never collected.
    Agents spawned, called and stopped after a freeze must all go by their reference
    counts alone."""
    async def go():
        c = Cluster(make_config(tmp_path), tmp_path)
        await c.start()
        try:
            m = c.client()
            names = [f"a{i}" for i in range(300)]
            await c.run(asyncio.gather(*(m.spawn(n, "counter") for n in names)), limit_s=60)
            await c.run(asyncio.gather(*(m.call(n, {"op": "add", "n": 1}) for n in names)), limit_s=60)
            gc.collect()
            gc.freeze()
            try:
                await c.run(asyncio.gather(*(m.stop(n) for n in names)), limit_s=60)
                await c.advance(1.0)
                gc.collect()
            finally:
                gc.unfreeze()
            leaked = gc.collect()
            assert leaked < 50, f"{leaked} objects in cycles were kept by the freeze"
        finally:
            await c.close()
    asyncio.run(go())
