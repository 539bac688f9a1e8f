"""Shared test plumbing: `async def` tests run on a fresh loop, each bounded in time."""

import asyncio
import inspect
import os

os.environ.setdefault("MESH_CHECK_READS", "1")  # every call declared read-only is checked (Agent.read_ops)

import pytest

from etcds import etcd_factory  # noqa: F401  (a fixture: real etcd members, ended by pid)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        funcargs = pyfuncitem.funcargs
        args = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        timeout = pyfuncitem.get_closest_marker("async_timeout")
        limit = timeout.args[0] if timeout else 30
        asyncio.run(_bounded(pyfuncitem.obj(**args), limit))
        return True
    return None


async def _bounded(coro, limit: float):
    """Run a test coroutine; past `limit`, fail showing where every task was stuck."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=limit)
    if task in done:
        return task.result()
    stacks = []
    for t in asyncio.all_tasks():
        if t is asyncio.current_task():
            continue
        frames = t.get_stack(limit=8)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        stacks.append(f"  {t.get_name()}: {where}")
    task.cancel()
    pytest.fail(f"test did not finish within {limit}s; tasks:\n" + "\n".join(stacks), pytrace=False)


@pytest.fixture
def cluster_factory(tmp_path):
    """Make a started in-memory cluster (tests/harness.py) of the test config, with extra
    config text and [limits] lines; test files may define their own."""
    from harness import Cluster, make_config

    async def make(extra: str = "", limits: str = ""):
        c = Cluster(make_config(tmp_path, extra, 100, limits), tmp_path)
        await c.start()
        return c
    return make


@pytest.fixture
def local_mesh(tmp_path):
    """A real three-node mesh on loopback (`mesh up` of tests/procs.py's config) as
    (config path, its MeshRun); every process of it ended by pid afterwards."""
    import procs
    cfg = procs.write_config(tmp_path)
    run = procs.MeshRun("up", "-c", str(cfg))
    try:
        run.start(wait_for="mesh ready")
        yield cfg, run
    finally:
        run.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "async_timeout(seconds): bound an async test in time")


# --- evidence of failed process-level tests ------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    meshrun = _meshrun()
    if meshrun is not None:
        meshrun.MeshRun.started = []  # the runs this test starts (none kept past it)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed keeps the output, config and data of every mesh it started
    (scripts/evidence.py), once the mesh's processes are ended; its report says where."""
    outcome = yield
    rep = outcome.get_result()
    meshrun = _meshrun()
    if not rep.failed or meshrun is None or not meshrun.MeshRun.started:
        return
    label = item.name.replace("[", "-").rstrip("]")
    kept = meshrun.keep_all_evidence(list(meshrun.MeshRun.started), f"{item.nodeid} failed ({rep.when})", label)
    rep.sections.append(("mesh evidence", "the meshes' output, config and data are kept in:\n"
                         + "\n".join(f"  {p}" for p in dict.fromkeys(kept))))


def _meshrun():
    import sys
    return sys.modules.get("meshrun")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """A mesh whose evidence is still to be kept once its processes end (a fixture that
    never stopped it) is ended here, by its pids, and kept."""
    yield
    meshrun = _meshrun()
    for run in list(meshrun.MeshRun.started or ()) if meshrun is not None else ():
        if run.evidence is not None and not run._kept:
            run.kill_all()
