"""The supervisor's records: each child (where and as which incarnation it runs, how it
has exited, where its state lives), each supervisor of the tree, and each node as the
supervisor hears from it. The supervisor role (supervisor.py) keeps and changes them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from .supervision import ChildSpec, ChildStatus, SupervisorSpec

# the supervisor's records in the store (meta keys)
DYNAMIC_PREFIX = "sup/child/"   # + name: a dynamic child's spec, its spawn's id and its birth
PLACE_PREFIX = "sup/place/"     # + name: where a child's state lives (home, replicas, holders)
EPOCH_KEY = "sup/epoch"         # the supervisor's starts so far (incarnation numbers' epoch)

MAX_START_BACKOFF_S = 5.0       # the longest wait before a start the environment refused is tried again
START_CONCURRENCY = 512         # starts under way at once
LAUNCHES_PER_PASS = 4 * START_CONCURRENCY  # starts a placement pass puts on their way (they wait for a slot)
RECENT_EXITS = 5                # exits of a child kept for `mesh inspect` (memory only)
MIN_LIVENESS_WAIT_S = 0.001     # a deadline that float rounding left a hair in the future


@dataclass
class Child:
    spec: ChildSpec
    parent: str
    dynamic: bool = False
    status: ChildStatus = ChildStatus.PENDING
    node: str | None = None
    incarnation: int = -1
    restarts: int = 0
    busy: bool = False  # a start or terminate is under way
    aim: str | None = None  # the node a start under way chose (spreads a group's members)
    hint: tuple | None = None  # (prefer, avoid) for its next start from the placement pass (a move)
    last_exit: str = ""
    exits: tuple = ()  # its latest exits, (wall time, how: reason), up to RECENT_EXITS (mesh inspect)
    next_try: float = 0.0   # when a start that the environment refused is tried again
    backoff: float = 0.0
    started_at: float = float("-inf")  # when its latest START was sent
    streak: int = 0                     # restarts in a row, each soon after the one before
    restart_at: float = 0.0             # in ChildStatus.BACKOFF: when it is restarted
    home: str | None = None            # the host of its latest incarnation (its state is there)
    replicas: tuple[str, ...] = ()     # the hosts that hold copies of that state
    # The host sets (home first, then replicas) of every incarnation that may have
    # acknowledged the newest state: the last one known to have started, and each one
    # sent a START since. Each acknowledged commit is on every host of its set, so a new
    # incarnation reads one host of each set and keeps the newest record.
    holders: list[tuple[str, ...]] = field(default_factory=list)
    # A dynamic child's first incarnation number, taken when it was spawned: a record of
    # its name older than this is an earlier agent's (one stopped while a host that holds
    # a copy was down), never its state. 0: no such bound (static children).
    born: int = 0
    # The request id of the spawn that made a dynamic child (kept with its record): a
    # repeat of that spawn after a supervisor restart is answered with where it runs.
    spawn_rid: str | None = None
    # Records that must reach the store with its first placement, in the same write: a
    # spawned child's own record (one consensus write per spawn, not two in a row).
    unrecorded: dict[str, bytes] = field(default_factory=dict)
    # The supervisor's index of children that may wait for a start (SupervisorRole.pending):
    # a child that turns PENDING enters it, so a placement pass (every heartbeat tick)
    # visits those, not every child of the tree.
    pending_index: dict | None = field(default=None, repr=False, compare=False)
    # ... and of children by node (SupervisorRole.on_node): a node lost, drained or
    # audited visits its own children, not a million.
    node_index: dict | None = field(default=None, repr=False, compare=False)
    # ... and its count of children by status (SupervisorRole.by_status): `mesh status`
    # at a million agents reads counts, not every child.
    status_counts: Counter | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, key: str, value) -> None:
        if key == "status":
            counts = self.__dict__.get("status_counts")
            old = self.__dict__.get("status")
            if counts is not None and old != value:
                counts[old] -= 1
                counts[value] += 1
        elif key == "node":
            index = self.__dict__.get("node_index")
            old = self.__dict__.get("node")
            if index is not None and old != value:
                if old is not None:
                    index.get(old, {}).pop(self.spec.name, None)
                if value is not None:
                    index.setdefault(value, {})[self.spec.name] = self
        object.__setattr__(self, key, value)
        if key == "status" and value == ChildStatus.PENDING:
            index = self.__dict__.get("pending_index")
            if index is not None:
                index[self.spec.name] = self


@dataclass
class Sup:
    spec: SupervisorSpec
    parent: str | None
    # Its children's names in start order. A dict (values unused) keeps insertion order,
    # which rest_for_one needs, and adds or removes one name in O(1): a dynamic supervisor
    # holds every spawned agent, and a list's remove() walked them all on each stop.
    children: dict[str, None] = field(default_factory=dict)
    history: tuple[float, ...] = ()
    failed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class NodeView:
    name: str
    boot: str | None = None
    pid: int | None = None
    alive: bool = False
    last_heard: float = 0.0
    health: dict = field(default_factory=dict)
    audited_at: float = float("-inf")  # when its agents were last compared with this view
    short_renewals: int = 0            # renewals in a row that counted fewer agents than this view
    drops: int = 0                     # the node's count of lease lapses, from its last hello
    store_full: bool = False           # its store cannot commit (disk full), as its last hello or renewal said
    evicted_until: float = float("-inf")  # [control]: its lease was revoked; it may serve until then


def placed(child: Child) -> dict:
    """A spawn's answer: where the child runs, as which incarnation."""
    return {"name": child.spec.name, "node": child.node, "incarnation": child.incarnation}
