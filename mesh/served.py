"""Served records: which incarnation of a name answered, and when (the G3 evidence).

With `[cluster] served_log = true`, every node appends a line per reply to
DATA_DIR/HOST/served/NODE.log, written before the reply leaves:

    <wall time> <name> <incarnation>

The time is the host's wall clock as `mesh.clock.wall()` reads it (with the host's
offset, if one is injected). `overlaps` reads the logs of every host and reports any
name that two incarnations served at overlapping times. Wall clocks are compared across
hosts, so the check is meant for hosts that share a clock (network namespaces on one
machine) or are kept in tight sync; `offsets` ({host: seconds}) takes a known skew off
each host's times first (the chaos suite knows the offsets it injected). A newer
incarnation must begin serving after the older one's last reply.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable

from .clock import wall as host_wall


class ServedLog:
    def __init__(self, host_dir: str, node: str, wall: Callable[[], float] = host_wall):
        self.wall = wall
        folder = os.path.join(host_dir, "served")
        os.makedirs(folder, exist_ok=True)
        self.fd = os.open(os.path.join(folder, f"{node}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, name: str, incarnation: int) -> None:
        os.write(self.fd, f"{self.wall():.6f} {name} {incarnation}\n".encode())


@dataclass(frozen=True)
class Overlap:
    name: str
    older: int          # incarnation
    older_last: float   # its last reply
    newer: int
    newer_first: float  # the newer one's first reply, before the older one's last

    def __str__(self) -> str:
        return (f"{self.name}: incarnation {self.newer} answered at {self.newer_first:.6f}, "
                f"before incarnation {self.older} stopped ({self.older_last:.6f})")


def intervals(data_dir: str, offsets: dict[str, float] | None = None) -> dict[str, dict[int, tuple[float, float]]]:
    """name -> incarnation -> (first reply, last reply), from every host's logs, each time
    less its host's offset (DATA_DIR/HOST/...: `offsets[HOST]`, 0 if not given)."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for path in glob.glob(os.path.join(data_dir, "*", "served", "*.log")):
        skew = (offsets or {}).get(os.path.basename(os.path.dirname(os.path.dirname(path))), 0.0)
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) != 3:
                    continue  # a line cut short by a kill
                t, name, inc = float(parts[0]) - skew, parts[1], int(parts[2])
                first, last = out.setdefault(name, {}).get(inc, (t, t))
                out[name][inc] = (min(first, t), max(last, t))
    return out


def overlaps(data_dir: str, offsets: dict[str, float] | None = None) -> list[Overlap]:
    found = []
    for name, by_inc in intervals(data_dir, offsets).items():
        ordered = sorted(by_inc.items())
        for (older, (_, older_last)), (newer, (newer_first, _)) in zip(ordered, ordered[1:]):
            if newer_first <= older_last:
                found.append(Overlap(name, older, older_last, newer, newer_first))
    return found
