"""Retry loops wait (backoff with jitter, capped, bounded by the deadline) and wake early."""

import asyncio

from mesh.clock import Backoff, FakeClock


def test_backoff_grows_is_capped_and_jittered_within_the_upper_half():
    b = Backoff(FakeClock(), base_s=0.02, cap_s=0.5, rand=lambda: 0.0)
    assert [round(b.next_delay(), 4) for _ in range(7)] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25]
    b = Backoff(FakeClock(), base_s=0.02, cap_s=0.5, rand=lambda: 1.0)
    assert [round(b.next_delay(), 4) for _ in range(7)] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]
    b.reset()
    assert b.next_delay() == 0.02


async def test_backoff_wait_sleeps_on_the_clock_never_past_the_deadline_and_wakes_early():
    clock = FakeClock()
    b = Backoff(clock, base_s=1.0, cap_s=1.0, rand=lambda: 1.0)
    waited = asyncio.ensure_future(b.wait())
    await asyncio.sleep(0)
    clock.advance(0.99)
    await asyncio.sleep(0)
    assert not waited.done()
    clock.advance(0.01)
    await asyncio.sleep(0)
    assert waited.done()

    waited = asyncio.ensure_future(b.wait(deadline=clock.now() + 0.3))
    await asyncio.sleep(0)
    clock.advance(0.3)
    await asyncio.sleep(0)
    assert waited.done()  # the deadline, not the 1 s step

    wake = asyncio.get_running_loop().create_future()
    waited = asyncio.ensure_future(b.wait(wake=wake))
    await asyncio.sleep(0)
    wake.set_result("n2")  # a link came up
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert waited.done() and clock.pending() == 0
