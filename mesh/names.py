"""Where names live, as one node sees it: its replica of the registry, the answer for a
message to a name it does not run, and whoever waits for a name to be placed (a WHEREIS
long-poll, or a call of this node's own whose agent is moving).

The supervisor writes the registry; every node keeps a replica (see registry.py) and
reads it here. A name's runner on this node, when it runs, beats the replica: the
replica may lag the START that placed it here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from . import wire
from .errors import (AgentDown, BadRequest, CallError, CallTimeout, Moved, NoSuchAgent, SupervisorDown,
                     Unavailable)
from .registry import Replica
from .runner import AgentStatus

if TYPE_CHECKING:
    from .node import Node, Origin

log = logging.getLogger("mesh.node")

class Names:
    """The registry replica of one node, and the waiters for names to be placed."""

    def __init__(self, node: "Node"):
        self.node = node
        self.replica = Replica()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._catchup_epoch: str | None = None  # a supervisor that answers with the changes since
        self.asked_at = -1e9  # the last hello, or the last chunk of a snapshot on its way

    @property
    def synced(self) -> bool:
        return self.replica.synced

    def placed(self, name: str) -> tuple[str | None, int] | None:
        """(node, incarnation) of `name`: this node's if it runs it, else the registry's."""
        runner = self.node.runners.get(name)
        if runner is not None and runner.status == AgentStatus.RUNNING:
            return self.node.name, runner.incarnation
        entry = self.replica.lookup(name)
        return None if entry is None else (entry.node, entry.incarnation)

    def where_else(self, name: str) -> CallError:
        """The error for a message to `name`, which has no runner here."""
        entry = self.replica.lookup(name)
        if entry is None:
            if self.replica.synced:
                return NoSuchAgent(f"no agent named {name!r}")
            return Unavailable(f"node {self.node.name} has not synced its registry yet")
        if entry.node is not None and entry.node != self.node.name:
            return Moved(f"{name!r} lives on node {entry.node}", {"node": entry.node, "incarnation": entry.incarnation})
        if self.replica.failed is not None:
            return SupervisorDown(f"{name!r} is stopped: {self.replica.failed}")
        return AgentDown(f"{name!r} is not running right now")

    def host_of(self, name: str) -> str | None:
        """Another node that the registry says runs `name` (where a cast is passed on)."""
        entry = self.replica.lookup(name)
        if entry is None or entry.node is None or entry.node == self.node.name:
            return None
        return entry.node

    # --- the supervisor's updates ---------------------------------------------------------------

    def on_registry(self, msg: wire.Msg, origin: "Origin") -> None:
        try:
            ok = self.replica.apply(msg.body)
        except (ValueError, TypeError, KeyError) as exc:
            raise BadRequest(f"bad registry message: {exc}") from None
        if "snapshot" in msg.body:  # the answer is arriving: no need to ask again, until it is in
            self.asked_at = -1e9 if self.replica.synced else self.node.clock.now()
        if not ok:  # a gap or a new epoch: the hello asks for what is missing
            self.ask()
            return
        names = ([u[0] for u in msg.body.get("updates") or ()]
                 if "updates" in msg.body and "failed" not in msg.body else None)  # a failed tree: every name
        self.changed(names)

    def ask(self) -> None:
        """Ask for what the replica misses (say hello), unless a hello went or a snapshot's
        chunk came within `dead_after_s`: while the answer is on its way every update is
        refused, and asking again for each would have the supervisor send the table again
        for each (at a million names, faster than a node loads it)."""
        if self.node.clock.now() - self.asked_at >= self.node.timing.dead_after_s:
            self.node.say_hello()

    def held(self) -> list | None:
        """[epoch, seq] of the table this replica holds, for a supervisor that can send
        only the changes since (None: it needs the whole table, or the supervisor cannot)."""
        replica = self.replica
        if replica.epoch is None or replica.epoch != self._catchup_epoch:
            return None
        return [replica.epoch, replica.seq]

    def supervisor_answered(self, answer) -> None:
        if isinstance(answer, dict):
            self._catchup_epoch = answer.get("epoch") if answer.get("catchup") is True else None

    def changed(self, names: list[str] | None) -> None:
        """Wake waiters, and let go of stopped runners whose name moved on (None: all)."""
        node = self.node
        ended = (AgentStatus.STOPPED, AgentStatus.CRASHED)
        check = names if names is not None else list(self._waiters) + [
            n for n, r in node.runners.items() if r.status in ended]
        for name in check:
            entry = self.replica.lookup(name)
            runner = node.runners.get(name)
            if runner is not None and runner.status in ended and self.replica.synced:
                if entry is None:
                    node.incarnations.drop(runner, lambda: NoSuchAgent(f"no agent named {name!r}"))
                elif entry.node is None and self.replica.failed is not None:
                    node.incarnations.drop(runner, lambda: SupervisorDown(f"{name!r} is stopped: {self.replica.failed}"))
                elif entry.node is not None and entry.node != node.name:
                    node.incarnations.drop(runner, lambda e=entry: Moved(f"{name!r} lives on node {e.node}",
                                                            {"node": e.node, "incarnation": e.incarnation}))
            if self._waiters.get(name):
                self._wake(name)

    # --- waiting for a name to be placed ---------------------------------------------------------

    def on_whereis(self, msg: wire.Msg, origin: "Origin") -> None:
        node = self.node
        body = msg.body or {}
        wait = min(body.get("wait_ms", 0) / 1000, node.timing.call_timeout_s)

        def answer(placed, err):
            if err is not None:
                node.respond_error(origin, msg.id, err)
            else:
                where, inc = placed if placed is not None else (None, -1)
                node.respond(origin, msg.id, {"node": where, "incarnation": inc})
        self.wait_placed(msg.target, body.get("after", -1), wait, answer)

    def wait_placed(self, name: str, after: int, wait: float, answer: Callable) -> None:
        """Call answer((node, incarnation), None) once `name` runs with an incarnation newer
        than `after`; answer(None, NoSuchAgent) if it does not exist; after `wait` seconds,
        answer(whatever is known, None)."""
        waiter = _Waiter(after, answer)
        if waiter.check(self, name):
            return
        log.debug("node %s: waiting up to %.2fs for %s to be placed after incarnation %d",
                  self.node.name, wait, name, after)
        waiter.timer = self.node.clock.call_after(wait, lambda: self._timeout(name, waiter))
        self._waiters.setdefault(name, []).append(waiter)

    def _wake(self, name: str) -> None:
        waiters = self._waiters.pop(name, [])
        keep = [w for w in waiters if not w.check(self, name)]
        if keep:
            self._waiters[name] = keep

    def _timeout(self, name: str, waiter: "_Waiter") -> None:
        waiters = self._waiters.get(name)
        if waiters and waiter in waiters:
            log.debug("node %s: %s not placed after incarnation %d in time (registry: %s)",
                      self.node.name, name, waiter.after, self.placed(name))
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[name]
            waiter.answer(self.placed(name), None)


class _Waiter:
    """Someone waiting for a name to be placed (a WHEREIS, or a call of this node's)."""

    __slots__ = ("after", "answer", "timer")

    def __init__(self, after: int, answer: Callable):
        self.after, self.answer, self.timer = after, answer, None

    def check(self, names: Names, name: str) -> bool:
        """Answer if the registry now says enough; True when answered."""
        placed = names.placed(name)
        if placed is None and names.replica.synced:
            err: CallError | None = NoSuchAgent(f"no agent named {name!r}")
        elif placed is not None and placed[0] is None and names.replica.failed is not None:
            err = SupervisorDown(f"{name!r} is stopped: {names.replica.failed}")
        elif placed is not None and placed[0] is not None and placed[1] > self.after:
            err = None
        else:
            return False
        if self.timer is not None:
            self.timer.cancel()
        self.answer(placed, err)
        return True


class NodeResolver:
    """The caller.Resolver of a node's own calls: where names live, as its replica says."""

    def __init__(self, names: Names):
        self.names = names

    def where(self, name: str):
        return self.names.placed(name)

    def learn(self, name: str, node: str, incarnation: int) -> None:
        pass  # the replica is written by the supervisor only

    def any_node(self, avoid: str | None = None) -> str:
        return self.names.node.name

    async def locate(self, caller, name: str, after: int, deadline: float, avoid: str | None):
        clock = self.names.node.clock
        remaining = deadline - clock.now()
        if remaining <= 0:
            raise CallTimeout(f"{name!r} was not placed again in time")
        future = asyncio.get_running_loop().create_future()

        def answer(placed, err):
            if not future.done():
                future.set_exception(err) if err is not None else future.set_result(placed)
        self.names.wait_placed(name, after, remaining, answer)
        placed = await future
        if placed is None or placed[0] is None:
            raise CallTimeout(f"{name!r} was not placed again in time")
        return placed
