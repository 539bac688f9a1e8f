"""Where an agent runs and keeps its copies, and how its incarnations are numbered: pure
functions of what the supervisor knows (which nodes are alive, which hosts are full,
where copies are), so that each rule can be read and tested alone.

The supervisor (supervisor.py) gathers that knowledge and carries the choices out.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from .config import Config
from .supervision import ChildSpec

INC_SPAN = 10**9  # incarnations of one supervisor epoch: epoch × INC_SPAN + n


def next_incarnation(epoch: int, last_n: int, at_least: int = 0) -> tuple[int, int]:
    """The next incarnation number of this epoch, greater than `at_least` too, and its n
    (the supervisor keeps n; epochs grow with each supervisor start, so numbers from an
    earlier start are always smaller)."""
    n = last_n + 1
    inc = epoch * INC_SPAN + n
    if inc <= at_least:
        n = at_least - epoch * INC_SPAN + 1
        inc = epoch * INC_SPAN + n
    return inc, n


def candidates(config: Config, spec: ChildSpec, live: Iterable[str], full_hosts: set[str]) -> list[str]:
    """The live nodes the spec's placement allows: those on hosts whose store can commit,
    or, if there are none, those on full hosts (a full disk may still take small commits;
    a one-host mesh has nowhere else to go)."""
    out = []
    for name in live:
        nspec = config.nodes[name]
        if spec.placement.hosts and nspec.host not in spec.placement.hosts:
            continue
        tags = set(nspec.tags) | set(config.hosts[nspec.host].tags)
        if spec.placement.tags and not set(spec.placement.tags) <= tags:
            continue
        out.append(name)
    return [n for n in out if config.nodes[n].host not in full_hosts] or out


def choose_node(config: Config, allowed: list[str], load: Callable[[str], int],
                prefer: str | None = None, avoid: str | None = None,
                crowd: Callable[[str], int] = lambda n: 0) -> str | None:
    """One of the `allowed` nodes: `prefer` if allowed; never `avoid` unless it is the only
    one; those with the fewest members of the agent's group (`crowd`) first, then nodes
    on other hosts than avoid's, then the least loaded."""
    nodes = [n for n in allowed if n != avoid] or allowed
    if not nodes:
        return None
    if prefer in nodes:
        return prefer
    avoid_host = config.nodes[avoid].host if avoid else None
    return min(nodes, key=lambda n: (crowd(n), config.nodes[n].host == avoid_host, load(n), n))


def choose_replicas(n: int, live_hosts: set[str], home: str, full_hosts: set[str],
                    current: tuple[str, ...], use: Counter) -> tuple[str, ...] | None:
    """`n` live hosts other than `home` for the copies: those whose store can commit first
    (full ones only when there are not enough others), then the ones it has (their copies
    are current), then the least used. None when there are not enough live hosts."""
    if n == 0:
        return ()
    live = live_hosts - {home}
    if len(live) < n:
        return None
    ranked = sorted(live, key=lambda h: (h in full_hosts, h not in current, use[h], h))
    return tuple(ranked[:n])


def sources(holders: list[tuple[str, ...]], home: str,
            live_node_on: Callable[[str], str | None]) -> list[list[str]] | None:
    """Where a new incarnation on `home` reads its state: for each holder set (the hosts of
    an incarnation that may have acknowledged the newest state) that `home` is not in, a
    live node of each of its hosts: any one answer covers that set. [] when `home` holds
    every set (or it never ran); None when some set has no live node."""
    groups = []
    for hosts in holders:
        if home in hosts:
            continue
        group = [node for node in (live_node_on(h) for h in sorted(set(hosts))) if node is not None]
        if not group:
            return None
        groups.append(group)
    return groups
