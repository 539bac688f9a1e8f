"""Supervision as data plus pure functions, with OTP's semantics.

A supervision tree is frozen data: `SupervisorSpec`s whose children are names of other
supervisors or of agents (`ChildSpec`). What to do when a child exits is decided here,
by pure functions of the spec, the exit and monotonic time, so it is tested without
sockets; `mesh.supervisor` carries the decisions out across nodes.

Strategies (when one child exits and is to be restarted):
    one_for_one    restart that child
    one_for_all    terminate the others, restart all in order
    rest_for_one   terminate the children after it, restart it and them in order
A dynamic supervisor (OTP's DynamicSupervisor) is one_for_one over children added and
removed at run time.

Restart types (whether an exit is restarted):
    permanent  always
    transient  only after an abnormal exit (a crash, not a normal stop)
    temporary  never

Restart intensity: more than `intensity` restarts within `period_s` seconds makes the
supervisor give up: it terminates its children and exits itself, and its parent
decides (escalation). Losing a node is not a restart of its agents: they are moved,
with their state, and count against nobody's intensity.

Restart backoff: a child's first restart is immediate, as in OTP; when it crashes
again soon after (before it ran `backoff_max_s`), each further restart waits twice as
long as the one before, from `backoff_s` up to `backoff_max_s` (`backoff_s = 0`: never
wait). Exits count against the intensity when they happen, not when the delayed
restart does, so a fast crash loop escalates exactly as in OTP, and a slow one costs
one start per `backoff_max_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Collection, Iterable

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
RESTARTS = ("permanent", "transient", "temporary")

# how an agent's incarnation ended
NORMAL = "normal"        # it stopped itself, or was stopped
CRASH = "crash"          # a handler or init raised, or its state could not be saved
TIMEOUT = "timeout"      # one message ran past the handler deadline (a silent agent)
SHUTDOWN = "shutdown"    # its node shut down in order
LOST = "lost"            # its node died or was cut off


class ChildStatus(StrEnum):
    """Where a child is, as its supervisor sees it (the node's view of one incarnation is
    another machine: runner.AgentStatus)."""

    PENDING = "pending"    # to be started (its node died, or a start failed for want of one)
    STARTING = "starting"  # a START is under way
    RUNNING = "running"
    STOPPING = "stopping"  # a terminate is under way
    STOPPED = "stopped"    # ended for good (stopped, or a temporary/transient child exited)
    FAILED = "failed"      # its supervisor gave up on it
    BACKOFF = "backoff"    # it exited and waits out its restart backoff


@dataclass(frozen=True)
class Placement:
    """Where an agent may run: hosts by name and/or node tags. Empty means anywhere."""

    hosts: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChildSpec:
    """One agent under a supervisor."""

    name: str
    kind: str
    args: dict = field(default_factory=dict, hash=False, compare=False)
    restart: str = "permanent"
    placement: Placement = Placement()
    group: str = ""  # a process group (OTP's pg): its members are placed on distinct nodes


@dataclass(frozen=True)
class SupervisorSpec:
    """One supervisor: its strategy, its intensity and its ordered children's names."""

    name: str
    strategy: str = "one_for_one"
    intensity: int = 3
    period_s: float = 5.0
    children: tuple[str, ...] = ()
    dynamic: bool = False
    backoff_s: float = 0.1       # the first delayed restart; 0 switches backoff off
    backoff_max_s: float = 5.0   # the longest wait, and the run that resets the streak


def stop_exit(reason) -> str:
    """How an agent that stopped itself with `reason` exited. As in OTP, "normal",
    "shutdown" and ("shutdown", anything) are normal exits; any other reason is abnormal."""
    if reason in ("normal", "shutdown"):
        return NORMAL
    if isinstance(reason, (tuple, list)) and len(reason) == 2 and reason[0] == "shutdown":
        return NORMAL
    return CRASH


def should_restart(restart: str, how: str) -> bool:
    """Whether a child that ended `how` is restarted under restart type `restart`."""
    if how == LOST:
        return True
    if restart == "permanent":
        return how != SHUTDOWN
    if restart == "transient":
        return how in (CRASH, TIMEOUT)
    return False


def to_restart(strategy: str, children: Collection[str], exited: str) -> list[str]:
    """The children, in order, that a strategy restarts when `exited` exits. `children`
    is ordered (a list, or a dict's keys: its insertion order is the start order); only
    one_for_all and rest_for_one walk it, and only they restart more than one child."""
    if strategy == "one_for_one" or exited not in children:
        return [exited]
    if strategy == "one_for_all":
        return list(children)
    if strategy == "rest_for_one":
        names = list(children)
        return names[names.index(exited):]
    raise ValueError(f"unknown strategy {strategy!r}")


def allow_restart(history: Iterable[float], now: float, intensity: int, period_s: float) -> tuple[bool, tuple[float, ...]]:
    """OTP's restart intensity as a pure function of monotonic time.

    `history` holds the times of earlier restarts. Returns whether one more restart at
    `now` is allowed, and the history to keep (this restart included, old ones dropped).
    Like OTP, `intensity` restarts within `period_s` are fine; one more is too many.
    """
    recent = tuple(t for t in history if now - t < period_s) + (now,)
    return len(recent) <= intensity, recent


def restart_backoff(streak: int, ran_s: float, backoff_s: float, backoff_max_s: float) -> tuple[float, int]:
    """The wait before restarting a child that exited after running `ran_s` seconds,
    and its new streak (restarts in a row, each soon after the one before; `streak`
    is the count before this exit). An incarnation that ran `backoff_max_s` or longer
    starts a new streak. Streak 1 restarts at once; streak n waits
    min(backoff_max_s, backoff_s * 2**(n-2))."""
    streak = 1 if ran_s >= backoff_max_s else streak + 1
    if backoff_s <= 0 or streak <= 1:
        return 0.0, streak
    return min(backoff_max_s, backoff_s * 2 ** min(streak - 2, 62)), streak


def liveness_expired(last_heard: float, now: float, heartbeat_s: float, liveness: int) -> bool:
    """A peer silent for `liveness` heartbeat intervals is declared dead."""
    return now - last_heard >= heartbeat_s * liveness
