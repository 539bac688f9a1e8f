"""`mesh top`: the nodes and the busiest agents of a live mesh, refreshed every second.

Each sample is one STATUS view `{agents: false, top: N}`: every node's counters and
memory and its N busiest agents (most waiting, then most handled), with restarts from
the supervisor; it costs each node one pass over its agents. Rates come from two
samples: messages in, commit groups and their records and time (the node's counters
`in`, `commits`, `commit_records`, `commit_us`), and per agent the messages it handled
since the last sample (while the same incarnation stays among the busiest).

In a terminal, a live view drawn with `rich` (an optional extra: `pip install -e
'.[top]'`): `s` sorts the agents by the next column, up/down (or k/j) selects one, enter
(or i) shows its `mesh inspect`, q quits. Fits 80x24; over SSH it needs only a terminal.
Anywhere else (stdout not a terminal, or --plain), two samples a second apart printed
as plain tables.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

TOP_AGENTS = 30
SORTS = ("mailbox", "msg/s", "in hand", "restarts")
NODE_HEADER = ["NODE", "UP", "AGENTS", "MSG/S", "COMMITS/S", "GROUP", "COMMIT MS", "RSS MB"]
AGENT_HEADER = ["AGENT", "KIND", "NODE", "MAILBOX", "MSG/S", "IN HAND MS", "RESTARTS"]


async def sample(client, n: int = TOP_AGENTS) -> tuple[float, dict]:
    return time.monotonic(), await client.status(agents=False, top=n)


def _rate(now: dict, before: dict, key: str, dt: float) -> float | None:
    if key not in now or key not in before or dt <= 0:
        return None
    return max(0.0, (now[key] - before[key]) / dt)


def node_rows(prev: tuple[float, dict] | None, cur: tuple[float, dict]) -> list[list]:
    t1, st = cur
    before = {n["name"]: n for n in prev[1]["nodes"]} if prev else {}
    dt = t1 - prev[0] if prev else 0.0
    rows = []
    for n in st["nodes"]:
        old = before.get(n["name"], {}).get("stats", {})
        new = n.get("stats", {})
        commits = new.get("commits", 0) - old.get("commits", 0) if old else 0
        rows.append([
            n["name"], "yes" if n["alive"] else "no", n["agents"],
            _num(_rate(new, old, "in", dt)), _num(_rate(new, old, "commits", dt)),
            _num((new.get("commit_records", 0) - old.get("commit_records", 0)) / commits if commits > 0 else None, 1),
            _num((new.get("commit_us", 0) - old.get("commit_us", 0)) / commits / 1000 if commits > 0 else None, 2),
            _num(n["rss"] / 2 ** 20 if n.get("rss") else None),
        ])
    return rows


def agent_rows(prev: tuple[float, dict] | None, cur: tuple[float, dict], sort: str = "mailbox") -> list[list]:
    t1, st = cur
    before = {(a["name"], a["incarnation"]): a["handled"] for a in prev[1].get("top", ())} if prev else {}
    dt = t1 - prev[0] if prev else 0.0
    rows = []
    for a in st.get("top", ()):
        old = before.get((a["name"], a["incarnation"]))
        rate = (a["handled"] - old) / dt if old is not None and dt > 0 else None
        rows.append([a["name"], a["kind"], a["node"], a["mailbox"], rate, a["handling_ms"], a["restarts"]])
    column = {"mailbox": 3, "msg/s": 4, "in hand": 5, "restarts": 6}[sort]
    rows.sort(key=lambda r: (r[column] or 0, r[4] or 0, r[3]), reverse=True)  # then by msg/s, mailbox
    return [[r[0], r[1], r[2], r[3], _num(r[4]), _num(r[5], 1), r[6]] for r in rows]


def _num(v: float | None, places: int = 0) -> str:
    return "-" if v is None else f"{v:,.{places}f}"


async def plain(client, table) -> str:
    """Two samples a second apart, as plain tables (`table(header, rows)` draws one)."""
    first = await sample(client)
    await asyncio.sleep(1.0)
    cur = await sample(client)
    return "\n".join([table(NODE_HEADER, node_rows(first, cur)), "",
                      table(AGENT_HEADER, agent_rows(first, cur)),
                      f"\n{cur[1]['total']:,} agents; the busiest {len(cur[1].get('top', ()))} shown"])


# --- the live view ----------------------------------------------------------------------------


def _rich_tables(prev, cur, sort: str, selected: int, height: int):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    nodes = Table(*NODE_HEADER, box=None, header_style="bold", pad_edge=False, expand=False)
    for row in node_rows(prev, cur):
        nodes.add_row(*[str(c) for c in row], style=None if row[1] == "yes" else "red")
    agents = Table(*[h + (" v" if h.lower() == sort or (h == "IN HAND MS" and sort == "in hand") else "")
                     for h in AGENT_HEADER], box=None, header_style="bold", pad_edge=False)
    rows = agent_rows(prev, cur, sort)
    room = max(1, height - len(cur[1]["nodes"]) - 7)
    for i, row in enumerate(rows[:room]):
        agents.add_row(*[str(c)[:22] for c in row], style="reverse" if i == selected else None)
    title = Text(f"mesh top {time.strftime('%H:%M:%S')}  {cur[1]['total']:,} agents  sort: {sort} (s)  "
                 f"enter: inspect  q: quit", style="bold", no_wrap=True, overflow="ellipsis")
    return Group(title, Text(""), nodes, Text(""), agents), rows[:room]


def _keys(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Read keys from the terminal (in cbreak mode: see live), in a thread, into `queue`."""
    fd = sys.stdin.fileno()
    while True:
        ch = os.read(fd, 3).decode(errors="ignore")
        key = {"\x1b[A": "up", "\x1b[B": "down", "k": "up", "j": "down", "\n": "enter", "\r": "enter",
               "i": "enter", "s": "sort", "q": "quit"}.get(ch)
        if key:
            loop.call_soon_threadsafe(queue.put_nowait, key)
        if key == "quit" or not ch:
            return


async def live(client) -> None:
    import termios
    import tty

    from rich.console import Console

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys one at a time, unechoed; restored however this ends (Ctrl-C too)
    try:
        await _live(client, Console())
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _live(client, console) -> None:
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    import threading

    loop = asyncio.get_running_loop()
    keys: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=_keys, args=(loop, keys), daemon=True).start()
    sort, selected, showing = 0, 0, None
    prev, cur = None, await sample(client)
    shown: list = []
    with Live(console=console, screen=True, auto_refresh=False) as view:
        while True:
            if showing is None:
                body, shown = _rich_tables(prev, cur, SORTS[sort], selected, console.size.height)
            else:
                body = Panel(Text(showing), title="inspect (any key: back)")
            view.update(body, refresh=True)
            try:
                key = await asyncio.wait_for(keys.get(), timeout=1.0)
            except asyncio.TimeoutError:
                prev, cur = cur, await sample(client)
                continue
            if key == "quit":
                return
            if showing is not None:
                showing = None
            elif key == "sort":
                sort = (sort + 1) % len(SORTS)
            elif key in ("up", "down"):
                selected = max(0, min(len(shown) - 1, selected + (1 if key == "down" else -1)))
            elif key == "enter" and shown:
                showing = _inspected(await _inspect(client, shown[selected][0]))


async def _inspect(client, name: str) -> Any:
    try:
        return await client.inspect(name)
    except Exception as exc:  # shown in the panel: the agent may have stopped meanwhile
        return f"{type(exc).__name__}: {exc}"


def _inspected(seen: Any) -> str:
    if isinstance(seen, str):
        return seen
    sup = seen.get("supervision", {})
    lines = [f"{seen['name']} ({sup.get('kind')}) on {seen.get('node') or '-'}, incarnation {sup.get('incarnation')}, "
             f"{sup.get('status')}, restarts {sup.get('restarts')}"]
    if seen.get("node"):
        lines += [f"mailbox {seen['mailbox']}, handled {seen['handled']:,}, in hand "
                  f"{'-' if seen['handling_for_ms'] is None else str(seen['handling_for_ms']) + ' ms'}",
                  f"state {seen['state']}"]
        lines += [f"  waiting: {m['kind']} {m['id'] or ''} {m['body']}" for m in seen["waiting"]]
    lines += [f"  exit: {why}" for _, why in sup.get("exits", ())]
    return "\n".join(lines)
