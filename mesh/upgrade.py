"""Hot code upgrade: which code a node runs for each kind, and changing it live.

A kind's code is a class named by the config's allow-list (`counter =
"nodes.counter:Counter"`); it declares its version (`vsn`, absent = 1) and says in
`code_change` how an older version's state becomes its own (see Agent.code_change).

`Upgrades.kind_class` is where a node finds a kind's class, loaded once per process.
An UPGRADE (`mesh upgrade KIND`, one node at a time, see Client.upgrade) makes the node:

1. load the new code: the kind's module read again from disk, or the `to` MODULE:CLASS,
   as a fresh module (the one in sys.modules is replaced only once the new one ran to
   its end: a module that fails to import changes nothing);
2. pause the running agents of the kind, a slice of up to SLICE at a time, between two
   messages (a handler under way finishes first; calls that arrive wait in the mailbox)
   and wait until what they changed before is committed;
3. run the new code's `code_change` on a copy of each one's state. One failure, and
   every agent of the slice resumes on its old code with its old state (nothing of it
   was written), and the upgrade stops there;
4. swap each agent's code and state, record the kind's new code in the host's store
   (`kind/KIND`, with the first slice), commit it all in one group, and only then resume
   them. A commit that fails puts the old code back (the store's failure rolls the state
   back as usual).

Before any of this, `Client.upgrade` asks every node to check (steps 1 and 3 on copies,
nothing paused or written), so a module that fails or a code_change that raises stops
the upgrade before any node moved.

A rollback is the same with the previous code (kept in memory since the upgrade, or
the previous MODULE:CLASS recorded in the store), whose `code_change` is called with the
newer version, as OTP's downgrade; the default `code_change` refuses downgrades.

A node process started later (a restart by the launcher, a fork of a parent that
imported the old module long ago) reads `kind/KIND` from its host's store and loads
that code fresh from disk, so it never runs the code an upgrade replaced. An agent
started from a snapshot of an older version is migrated by `code_change` before `init`;
a snapshot of a newer version than the node's code is refused there (Incarnations).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any

import msgpack

from . import wire
from .agent import Agent
from .errors import BadRequest, CallError, NotAllowed, StoreError, Unavailable
from .runner import AgentStatus, Runner
from .store import unpack_state

if TYPE_CHECKING:
    from .node import Node, Origin

log = logging.getLogger("mesh.upgrade")

META_PREFIX = "kind/"  # + kind: msgpack {path, vsn, previous}: the code an upgrade installed
ROUNDS = 3             # passes over the kind's agents (one that started meanwhile is caught by the next)
SLICE = 128            # agents paused, migrated and committed together: each waits for its slice only


def kind_vsn(cls: type) -> int:
    vsn = getattr(cls, "vsn", 1)
    if type(vsn) is not int or vsn < 1:
        raise NotAllowed(f"{cls.__module__}.{cls.__qualname__}.vsn must be a positive int, not {vsn!r}")
    return vsn


def load_class(path: str, fresh: bool) -> type[Agent]:
    """The Agent class at `path` ("module:Class"). With `fresh`, the module's source is
    read and run again (never a cached bytecode file: an edit within the same second
    would not be seen), and replaces the module in sys.modules only if it ran to its end."""
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise BadRequest(f"{path!r} is not MODULE:CLASS")
    try:
        if fresh:
            module = _fresh_module(module_name)
        else:
            module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except Exception as exc:
        raise BadRequest(f"{path} cannot be loaded: {type(exc).__name__}: {exc}"[:500]) from None
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise NotAllowed(f"{path} is not an Agent")
    kind_vsn(cls)
    return cls


def _fresh_module(name: str):
    importlib.invalidate_caches()
    old = sys.modules.get(name)
    parent = name.rpartition(".")[0]
    search = getattr(sys.modules.get(parent) or importlib.import_module(parent), "__path__", None) if parent else None
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "get_source"):
        raise ModuleNotFoundError(f"no module named {name!r} on disk")
    source = spec.loader.get_source(name)
    module = importlib.util.module_from_spec(spec)
    code = compile(source, spec.origin, "exec")
    sys.modules[name] = module  # while it runs, as an import would (dataclasses look it up)
    try:
        exec(code, module.__dict__)
    except BaseException:
        if old is not None:
            sys.modules[name] = old
        else:
            sys.modules.pop(name, None)
        raise
    return module


def code_changed(agent: Agent, old_vsn: int, state: Any, extra: Any) -> bytes:
    """`agent.code_change` of a state, packed; raises whatever it raised."""
    new = agent.code_change(old_vsn, state, extra)
    if asyncio.iscoroutine(new):
        new.close()
        raise TypeError("code_change must not be async")
    return msgpack.packb(new)


class Upgrades:
    """The code one node runs for each kind, and its UPGRADE requests."""

    def __init__(self, node: "Node"):
        self.node = node
        self._classes: dict[str, type[Agent]] = {}          # kind -> its class, once loaded
        self._paths: dict[str, str] = {}                    # kind -> the path that class came from
        self._previous: dict[str, tuple[type[Agent], str]] = {}  # kind -> the code an upgrade replaced
        self._busy: set[str] = set()                        # kinds being upgraded here
        self._pauses: list[tuple[float, int]] = []          # this upgrade's slices: (seconds paused, agents)

    def canonical(self, kind: str) -> str | None:
        """The allow-list's name for `kind` (its short name, or its path), None if not allowed."""
        kinds = self.node.config.kinds
        if kind in kinds:
            return kind
        for short, path in kinds.items():
            if path == kind:
                return short
        return None

    def _installed(self, kind: str) -> dict | None:
        """The host's note of the code an upgrade installed for `kind`, if any."""
        try:
            raw = self.node.store.get_meta(META_PREFIX + kind)
        except StoreError as err:  # never guess: the config's code may be the one replaced
            raise Unavailable(f"node {self.node.name} cannot read which code runs {kind}: {err}") from None
        if raw is None:
            return None
        try:
            value = msgpack.unpackb(raw)
            return value if isinstance(value, dict) and isinstance(value.get("path"), str) else None
        except Exception:
            log.error("node %s: the record of %s's upgraded code is unreadable: the config's code runs",
                      self.node.name, kind)
            return None

    def kind_class(self, kind: str) -> type[Agent]:
        canon = self.canonical(kind)
        if canon is None:
            raise NotAllowed(f"kind {kind!r} is not in the config's allow-list")
        cls = self._classes.get(canon)
        if cls is not None:
            return cls
        installed = self._installed(canon)
        path = installed["path"] if installed else self.node.config.kinds[canon]
        try:
            # upgraded code is read from disk, whatever this process (a fork) imported before
            cls = load_class(path, fresh=installed is not None)
        except CallError as err:
            raise type(err)(f"kind {kind!r}: {err}") from None
        self._classes[canon], self._paths[canon] = cls, path
        return cls

    def loaded(self) -> dict[str, int]:
        """kind -> the version of the code this node runs for it (the kinds it loaded)."""
        return {kind: kind_vsn(cls) for kind, cls in sorted(self._classes.items())}

    def vsn_of(self, kind: str) -> int | None:
        canon = self.canonical(kind)
        cls = self._classes.get(canon) if canon else None
        return kind_vsn(cls) if cls is not None else None

    # --- UPGRADE --------------------------------------------------------------------------

    def on_upgrade(self, msg: wire.Msg, origin: "Origin") -> None:
        async def go():
            try:
                self.node.respond(origin, msg.id, await self.upgrade(
                    msg.body["kind"], msg.body.get("to"), msg.body.get("extra"), bool(msg.body.get("rollback")),
                    bool(msg.body.get("check"))))
            except CallError as err:
                self.node.respond_error(origin, msg.id, err)
        self.node._spawn(go())

    async def upgrade(self, kind: str, to: str | None = None, extra: Any = None, rollback: bool = False,
                      check: bool = False) -> dict:
        """Move every agent of `kind` on this node to new code (or, with `rollback`, to
        the previous code); returns {node, kind, from_vsn, to_vsn, agents, migrated, failed}.
        With `check`, only load the code and run its code_change on a copy of each
        agent's state: nothing changes, and `failed` says what the upgrade would meet."""
        canon = self.canonical(kind)
        if canon is None:
            raise NotAllowed(f"kind {kind!r} is not in the config's allow-list")
        if not self.node.serving() or self.node.stopping:
            raise Unavailable(f"node {self.node.name} is not serving")
        if canon in self._busy:
            raise Unavailable(f"node {self.node.name} is upgrading {canon} already")
        self._busy.add(canon)
        self._pauses = []
        try:
            return await self._upgrade(canon, to, extra, rollback, check)
        finally:
            self._busy.discard(canon)

    async def _upgrade(self, kind: str, to: str | None, extra: Any, rollback: bool, check: bool) -> dict:
        old_cls = self.kind_class(kind)
        old_path = self._paths[kind]
        if rollback:
            new_cls, new_path = self._previous_code(kind)
        else:
            new_path = to or old_path
            try:
                new_cls = load_class(new_path, fresh=True)
            except CallError as err:
                log.error("node %s: upgrade of %s: %s", self.node.name, kind, err)
                return self._result(kind, old_cls, old_cls, 0, 0, [{"node": self.node.name, "agent": None,
                                                                    "error": str(err)}])
        from_vsn, to_vsn = kind_vsn(old_cls), kind_vsn(new_cls)
        if not rollback and to_vsn < from_vsn:
            raise BadRequest(f"{new_path} is version {to_vsn}, older than the {from_vsn} running: "
                             f"use --rollback to go back")
        if check:
            return self._check(kind, old_cls, new_cls, extra)
        log.info("node %s: %s %s from version %d (%s) to %d (%s)", self.node.name,
                 "rolling back" if rollback else "upgrading", kind, from_vsn, old_path, to_vsn, new_path)
        migrated = 0
        seen: set[str] = set()
        for _ in range(ROUNDS):
            stale = [r for r in self.node.runners.values()
                     if self.canonical(r.kind) == kind and r.agent is not None and type(r.agent) is not new_cls
                     and r.status in (AgentStatus.RUNNING, AgentStatus.STARTING)]
            if not stale:
                break
            if any(r.status == AgentStatus.STARTING for r in stale):
                await self.node.commits.drain()  # started on the old code just before: once it runs, it moves too
            runners = [r for r in stale if r.status == AgentStatus.RUNNING and r.agent is not None]
            if not runners:
                continue
            seen.update(r.name for r in runners)
            for i in range(0, len(runners), SLICE):
                done, failed = await self._migrate(kind, runners[i:i + SLICE], old_cls, old_path, new_cls, new_path,
                                                   extra, rollback)
                migrated += done
                if failed:
                    return self._result(kind, old_cls, new_cls, len(seen), migrated, failed)
        if self._classes.get(kind) is not new_cls:  # no agent of the kind here: the code alone
            failed = await self._install(kind, old_cls, old_path, new_cls, new_path, rollback)
            if failed:
                return self._result(kind, old_cls, new_cls, len(seen), migrated, failed)
        return self._result(kind, old_cls, new_cls, len(seen), migrated, [])

    def _check(self, kind: str, old_cls, new_cls, extra: Any) -> dict:
        runners = [r for r in self.node.runners.values() if self.canonical(r.kind) == kind
                   and r.status == AgentStatus.RUNNING and r.agent is not None and r.last_state is not None]
        for r in runners:
            if r.vsn == kind_vsn(new_cls):
                continue
            agent = new_cls()
            agent.__dict__.update(r.agent.__dict__)
            try:
                code_changed(agent, r.vsn, unpack_state(r.last_state), extra)
            except Exception as exc:
                why = f"code_change from version {r.vsn} raised {type(exc).__name__}: {exc}"[:500]
                return self._result(kind, old_cls, new_cls, len(runners), 0,
                                    [{"node": self.node.name, "agent": r.name, "error": why}])
        return self._result(kind, old_cls, new_cls, len(runners), 0, [])

    def _previous_code(self, kind: str) -> tuple[type[Agent], str]:
        previous = self._previous.get(kind)
        if previous is not None:
            return previous
        # The host's note: its code is another node's of this host that rolled back
        # already, else the code it replaced is the one to return to.
        installed = self._installed(kind) or {}
        for path in (installed.get("path"), installed.get("previous")):
            if isinstance(path, str) and path != self._paths.get(kind):
                return load_class(path, fresh=True), path
        raise NotAllowed(f"node {self.node.name} has no previous code of {kind} to return to (it was not "
                         f"upgraded since this process started, and the upgrade named no other MODULE:CLASS)")

    def _result(self, kind: str, old_cls: type, new_cls: type, agents: int, migrated: int, failed: list) -> dict:
        return {"node": self.node.name, "kind": kind, "from_vsn": kind_vsn(old_cls), "to_vsn": kind_vsn(new_cls),
                "agents": agents, "migrated": migrated, "failed": failed, "pause_ms": self._pause_ms()}

    def _pause_ms(self) -> dict | None:
        """How long this node's agents were paused, per agent (each for its slice's time)."""
        each = sorted(s for s, n in self._pauses for _ in range(n))
        if not each:
            return None
        at = lambda q: round(each[min(len(each) - 1, int(q * len(each)))] * 1000, 2)  # noqa: E731
        return {"p50": at(0.5), "p99": at(0.99), "max": round(each[-1] * 1000, 2)}

    def _meta(self, kind: str, new_cls: type, new_path: str, old_path: str) -> bytes:
        """The store's note of the kind's code. The previous MODULE:CLASS is kept across a
        re-read of the same module (another node of the host, say, that loaded the note)."""
        previous = old_path
        if old_path == new_path:
            previous = (self._installed(kind) or {}).get("previous")
        return msgpack.packb({"path": new_path, "vsn": kind_vsn(new_cls), "previous": previous})

    async def _install(self, kind: str, old_cls, old_path: str, new_cls, new_path: str, rollback: bool) -> list:
        """The new code with no agent to migrate here: recorded, then used by what starts."""
        outcome = await self.node.commits.commit_meta({META_PREFIX + kind: self._meta(kind, new_cls, new_path, old_path)})
        if outcome.error is not None:
            return [{"node": self.node.name, "agent": None, "error": f"the new code could not be recorded: {outcome.error}"}]
        self._swap_code(kind, old_cls, old_path, new_cls, new_path, rollback)
        return []

    def _swap_code(self, kind: str, old_cls, old_path: str, new_cls, new_path: str, rollback: bool) -> None:
        self._classes[kind], self._paths[kind] = new_cls, new_path
        if rollback:
            self._previous.pop(kind, None)
        elif old_path != new_path or kind_vsn(old_cls) != kind_vsn(new_cls):
            self._previous[kind] = (old_cls, old_path)
        # else the same module and version read again (a fix, or a node that loaded the
        # store's note first): what it replaced is no version to roll back to

    async def _migrate(self, kind: str, runners: list[Runner], old_cls, old_path: str, new_cls, new_path: str,
                       extra: Any, rollback: bool) -> tuple[int, list]:
        """Pause, migrate, commit and resume these runners (a slice of the kind's agents
        here), all or none; the first slice installs the new code for the kind."""
        node = self.node
        paused_at = node.clock.now()
        for r in runners:
            r.paused = True
        try:
            waits = [asyncio.ensure_future(r.until_idle()) for r in runners if r.task is not None]
            pending = ()
            if waits:  # handlers under way finish first (a paused agent starts no other)
                _, pending = await asyncio.wait(waits, timeout=node.timing.handler_timeout_s + 1.0)
            for wait in pending:
                wait.cancel()
            if pending:
                busy = [r.name for r in runners if r.task is not None]
                return 0, [{"node": node.name, "agent": busy[0] if busy else None,
                            "error": "a handler did not finish in time to pause the agent"}]
            await node.commits.drain()  # what they did before the pause is durable (or rolled back)
            live = [r for r in runners if node.runners.get(r.name) is r and r.status == AgentStatus.RUNNING
                    and r.agent is not None and r.last_state is not None]
            new_agents = []
            for r in live:
                agent = new_cls()
                agent.__dict__.update(r.agent.__dict__)  # what init kept outside the state, and name/_runner
                try:
                    state = unpack_state(r.last_state)
                    packed = r.last_state if r.vsn == kind_vsn(new_cls) else \
                        code_changed(agent, r.vsn, state, extra)
                    agent.state = unpack_state(packed)
                except Exception as exc:
                    why = f"code_change from version {r.vsn} raised {type(exc).__name__}: {exc}"[:500]
                    log.error("node %s: upgrade of %s stopped at agent %s: %s", node.name, kind, r.name, why)
                    return 0, [{"node": node.name, "agent": r.name, "error": why}]
                new_agents.append((r, r.agent, r.vsn, agent, packed))
            group = node.commits.open
            for r, _old, _vsn, agent, packed in new_agents:
                r.agent, r.vsn = agent, kind_vsn(new_cls)
                if packed != r.last_state:
                    r.seq += 1
                    r.last_state = packed
                node.commits.mark_dirty(r)  # its record says the new version even where the state is alike
            installs = self._classes.get(kind) is not new_cls
            if installs:
                group.batch.meta_puts[META_PREFIX + kind] = self._meta(kind, new_cls, new_path, old_path)
                self._swap_code(kind, old_cls, old_path, new_cls, new_path, rollback)
            done = asyncio.get_running_loop().create_future()

            def committed(outcome) -> None:
                bad = {}
                for r, old_agent, old_vsn, _agent, _packed in new_agents:
                    why = outcome.error or outcome.failed.get(r.name) or outcome.unreplicated.get(r.name) \
                        or (f"fenced by incarnation {outcome.fenced[r.name]}" if r.name in outcome.fenced else None)
                    if why is not None:
                        bad[r.name] = str(why)
                        if r.agent is not None:
                            r.agent, r.vsn = old_agent, old_vsn  # the store rolls its state back (commits.py)
                if outcome.error is not None and installs:
                    self._classes[kind], self._paths[kind] = old_cls, old_path
                    if rollback:
                        self._previous[kind] = (new_cls, new_path)
                    else:
                        self._previous.pop(kind, None)
                done.set_result(bad)
            group.callbacks.append(committed)
            node.commits.schedule_flush()
            bad = await done
            failed = [{"node": node.name, "agent": name, "error": f"not committed: {why}"} for name, why in bad.items()]
            for name, why in bad.items():
                log.error("node %s: upgrade of %s: agent %s: not committed: %s", node.name, kind, name, why)
            return len(new_agents) - len(bad), failed
        finally:
            self._pauses.append((node.clock.now() - paused_at, len(runners)))
            for r in runners:
                r.paused = False
                if node.runners.get(r.name) is r:
                    r.run_mailbox()
            node.commits.schedule_flush()
