"""Exits and strategies: a child's exit is restarted per its restart type and its
supervisor's strategy (one_for_one, one_for_all, rest_for_one), with backoff, until the
intensity is spent and the supervisor fails, escalating to its parent (OTP's rules).
"""

from __future__ import annotations

import asyncio
import logging

from . import wire
from . import supervision as sv
from .node import Origin
from .tree import RECENT_EXITS, Child, ChildStatus, Sup

log = logging.getLogger("mesh.supervisor")


class Exits:
    """The part of SupervisorRole that handles exits and the tree's strategies (a mixin)."""

    def _on_exit(self, msg: wire.Msg, origin: Origin) -> None:
        if self.stopping:
            return  # the mesh stops: nothing is restarted
        if not self.ready:
            self._early_exits.append(msg)
            return
        body = msg.body
        child = self.children.get(body["name"])
        if child is None or child.incarnation != body["incarnation"] or child.status not in (ChildStatus.RUNNING, ChildStatus.STARTING):
            return  # an exit of an incarnation that is no longer the current one
        how, reason = body["how"], body.get("reason", "")
        self.exit_counts[how] += 1
        child.last_exit = f"{how}: {reason}"
        child.exits = (*child.exits, (round(self.clock.wall(), 3), child.last_exit))[-RECENT_EXITS:]
        log.info("supervisor: %s exited (%s: %s)", child.spec.name, how, reason)
        if how == sv.LOST:  # its state could not be kept where it was: move it, no fault of its own
            self._spawn(self._move(child, prefer=child.node))
        else:
            self._spawn(self._child_exited(child, how, child.incarnation))

    async def _child_exited(self, child: Child, how: str, incarnation: int) -> None:
        """Apply restart type, intensity and strategy to the exit of one incarnation."""
        sup = self.sups[child.parent]
        name = child.spec.name
        if not sv.should_restart(child.spec.restart, how):
            child.status = ChildStatus.STOPPED
            if child.dynamic:
                self._forget_dynamic(child)
            self.table.remove(name)
            self._schedule_registry()
            if child.spec.restart != "permanent":  # gone for good: so is its state
                self._forget_state(child, incarnation, f"exited for good ({how})")
            return
        delay = 0.0
        async with sup.lock:
            if sup.failed or child.incarnation != incarnation or child.status in (ChildStatus.STOPPED, ChildStatus.STOPPING, ChildStatus.FAILED, ChildStatus.BACKOFF):
                return  # handled already (a sibling's restart, a stop, or a failed supervisor)
            now = self.clock.now()
            allowed, sup.history = sv.allow_restart(sup.history, now, sup.spec.intensity, sup.spec.period_s)
            if not allowed:
                log.error("supervisor: %s restarted more than %d times in %gs: it gives up",
                          sup.spec.name, sup.spec.intensity, sup.spec.period_s)
                await self._fail(sup)
            else:
                delay, child.streak = sv.restart_backoff(child.streak, now - child.started_at,
                                                         sup.spec.backoff_s, sup.spec.backoff_max_s)
                if delay <= 0:
                    await self._restart(sup, sv.to_restart(sup.spec.strategy, sup.children, name), exited=name)
                else:
                    log.warning("supervisor: %s crashed %d times in a row: restarting it in %.2fs",
                                name, child.streak, delay)
                    child.status, child.restart_at = ChildStatus.BACKOFF, now + delay
        if sup.failed:
            await self._escalate(sup)
        elif delay > 0:
            await self._sleep(delay)
            async with sup.lock:
                if sup.failed or child.incarnation != incarnation or child.status != ChildStatus.BACKOFF:
                    return  # stopped, restarted with a sibling, or its supervisor gave up meanwhile
                await self._restart(sup, sv.to_restart(sup.spec.strategy, sup.children, name), exited=name)

    async def _sleep(self, seconds: float) -> None:
        """Wait on the supervisor's clock (a fake one in tests)."""
        done = asyncio.get_running_loop().create_future()
        timer = self.clock.call_after(seconds, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            timer.cancel()

    async def _restart(self, sup: Sup, names: list[str], exited: str) -> None:
        """Terminate `names` (but the exited one) in reverse order, then start them in order."""
        for name in reversed(names):
            if name != exited:
                await self._stop_member(name, "restart of a sibling")
        for name in names:
            child = self.children.get(name)
            if child is not None:
                child.restarts += 1
                child.status = ChildStatus.PENDING
                err = await self._start_child(child, prefer=child.node)
                if err is not None and self._crashed_on_start(child, err):  # one more crash
                    self._spawn(self._child_exited(child, sv.CRASH, child.incarnation))
            elif name in self.sups:
                await self._start_sup(self.sups[name])

    async def _stop_member(self, name: str, reason: str, final: str = ChildStatus.STOPPED) -> None:
        """Terminate a child, or a whole sub-tree, without forgetting state; its status
        ends as `final` (ChildStatus.FAILED when its supervisor gave up)."""
        child = self.children.get(name)
        if child is not None:
            if child.status in (ChildStatus.RUNNING, ChildStatus.STARTING) and child.node is not None:
                child.status = ChildStatus.STOPPING
                self.table.set(name, None, child.incarnation)
                self._schedule_registry()
                await self._terminate_instance(child.node, name, child.incarnation, reason)
            child.status = final
            return
        sup = self.sups[name]
        for member in reversed(sup.children):
            await self._stop_member(member, reason, final)

    async def _start_sup(self, sup: Sup) -> None:
        sup.failed, sup.history = False, ()
        for name in sup.children:
            if name in self.sups:
                await self._start_sup(self.sups[name])
            else:
                child = self.children[name]
                child.restarts += 1
                child.status = ChildStatus.PENDING
                await self._start_child(child, prefer=child.node)

    async def _fail(self, sup: Sup) -> None:
        sup.failed = True
        for name in reversed(sup.children):
            await self._stop_member(name, f"supervisor {sup.spec.name} gave up", ChildStatus.FAILED)

    async def _escalate(self, sup: Sup, chain: tuple[str, ...] = ()) -> None:
        chain = chain + (sup.spec.name,)
        if sup.parent is None:
            self._tree_failed(" then ".join(repr(n) for n in chain) + " gave up (more restarts than their "
                              "intensity allows): nothing in the tree runs or is restarted until the "
                              "supervisor role restarts")
            return
        parent = self.sups[sup.parent]
        async with parent.lock:
            allowed, parent.history = sv.allow_restart(parent.history, self.clock.now(), parent.spec.intensity, parent.spec.period_s)
            if not allowed:
                await self._fail(parent)
            else:
                await self._restart(parent, sv.to_restart(parent.spec.strategy, parent.children, sup.spec.name),
                                    exited=sup.spec.name)
        if parent.failed:
            await self._escalate(parent, chain)

    def _tree_failed(self, why: str) -> None:
        """The root gave up (or the tree could not start): refuse spawns, restart nothing,
        and have every node answer callers of the stopped agents with SupervisorDown."""
        self.tree_failed, self.failure = True, f"supervisor {why}"
        log.critical("supervisor: the tree failed: %s", self.failure)
        for child in self.children.values():
            if child.status != ChildStatus.STOPPED:
                child.status = ChildStatus.FAILED
            if child.status == ChildStatus.FAILED and self.table.lookup(child.spec.name) is not None:
                self.table.set(child.spec.name, None, max(child.incarnation, 0))
        self.table.fail(self.failure)
        self._schedule_registry()
        self.node.notify(f"tree-failed {self.failure}")

    async def stop_tree(self, timeout_s: float) -> None:
        """The whole mesh stops in order: terminate every agent in reverse start order,
        supervisor by supervisor (a dynamic supervisor's children together), as OTP stops
        a tree; nothing is restarted meanwhile. Their state stays; the next boot starts
        them again."""
        self.stopping = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._stop_tree_sup(self.sups["root"])
        except TimeoutError:
            log.warning("supervisor: the tree did not stop in order within %gs", timeout_s)

    async def _stop_tree_sup(self, sup: Sup) -> None:
        for name in reversed(sup.children):
            if name in self.sups and self.sups[name].spec.dynamic:
                await asyncio.gather(*(self._stop_member(n, "shutdown") for n in list(self.sups[name].children)))
            elif name in self.sups:
                await self._stop_tree_sup(self.sups[name])
            else:
                await self._stop_member(name, "shutdown")
