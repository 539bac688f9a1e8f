"""Draw docs/top.svg: `mesh top`'s live view of a real mesh under load, at 80x24.

    python3 scripts/top_screenshot.py          # writes docs/top.svg

Starts a three-node mesh (core.py's Mesh: every pid it showed is ended on exit), spawns
counters and a waiter, keeps 8 callers busy, takes two samples a second apart and draws
the view as `mesh top` does, recorded by rich into an SVG (rich exports SVG, not PNG).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE / "bench")]

import core  # noqa: E402

import mesh  # noqa: E402
from mesh import top  # noqa: E402


def main() -> int:
    from rich.console import Console

    with core.Mesh(3, label="top-screenshot") as mh:
        async def go():
            async with mesh.connect(mh.config) as m:
                for i in range(12):
                    await m.spawn(f"session-{i}", "counter")
                stop = asyncio.Event()

                async def load(i):
                    while not stop.is_set():
                        await m.call(f"session-{i % 5}", {"op": "add", "n": 1})
                tasks = [asyncio.ensure_future(load(i)) for i in range(8)]
                await asyncio.sleep(1.0)
                first = await top.sample(m)
                await asyncio.sleep(1.0)
                cur = await top.sample(m)
                stop.set()
                await asyncio.gather(*tasks)
                return first, cur
        first, cur = asyncio.run(go())
    console = Console(record=True, width=80, height=24, force_terminal=True, color_system="truecolor")
    body, _ = top._rich_tables(first, cur, "mailbox", 0, 24)
    console.print(body)
    out = ROOT / "docs" / "top.svg"
    console.save_svg(str(out), title="mesh top")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
