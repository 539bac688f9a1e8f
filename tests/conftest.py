"""Shared test plumbing: `async def` tests run on a fresh loop, each bounded in time."""

import asyncio
import inspect

import pytest


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


def pytest_configure(config):
    config.addinivalue_line("markers", "async_timeout(seconds): bound an async test in time")
