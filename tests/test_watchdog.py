"""A node's watchdog: a loop held past STALL_WARN_S is logged with where it is held."""

import asyncio
import logging
import time

from mesh import serve


def a_handler_that_holds_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # the stall itself, not a wait for something


def test_a_held_loop_is_logged_with_its_stack(caplog):
    async def go():
        loop = asyncio.get_running_loop()
        dog = serve._Watchdog(loop, 30.0, "n9")
        try:
            await asyncio.sleep(0)
            a_handler_that_holds_the_loop(serve.STALL_WARN_S * 2 + 0.3)
            await asyncio.sleep(0)
        finally:
            dog.stop()
    with caplog.at_level(logging.WARNING, logger="mesh.serve"):
        asyncio.run(go())
    held = [r.getMessage() for r in caplog.records if "event loop held" in r.getMessage()]
    assert len(held) == 1, held  # once per stall
    assert "node n9" in held[0] and "a_handler_that_holds_the_loop" in held[0]
