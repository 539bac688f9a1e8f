"""Calling agents by name: deadlines, redirects, and failover, for clients and nodes alike.

A call has one request id for its whole life. It goes to the node the caller believes
hosts the name; then, until its deadline:

    reply                        -> done
    error Moved(node)            -> learn the new place, send there at once
    error NoSuchAgent, sent to   -> if no attempt may have run, learn the new agent's
      an earlier life               place and send there; else raised (the call was
                                    meant for the stopped agent)
    error Retryable              -> wait until the name is placed again, send there
    (AgentDown, Unavailable)        (unless the error says {"retry": false}: raised as is)
    the node's link went down    -> same (a killed node is seen at once, see transport)
    no answer for `recheck_s`    -> watch (a WHEREIS long-poll at another node) for the
                                    agent to get a newer incarnation; send there when it
                                    does, else keep waiting (the agent may simply be slow)
    deadline                     -> CallTimeout
    any other error              -> raised as is (NoSuchAgent, AgentCrashed, Busy, ...)

Sending the same request id again is always safe: the agent records the replies of calls
that changed anything and answers a repeat from that record (G2), and a repeat that
arrives while the first is still running joins it.

Where names live is asked of a `Resolver`: a client caches what nodes tell it, a node
reads its registry replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from typing import Any, Callable, Protocol

from . import otel, wire
from .clock import Backoff, Clock
from .errors import (BadRequest, CallError, CallTimeout, LinkDown, Moved, NoSuchAgent, NotAllowed,
                     ProtocolError, Retryable, Unavailable, error_from_wire)
from .wire import Kind

RECHECK_S = 0.5       # a call quiet this long starts watching for its agent to move


class _Recheck(Exception):
    """No answer yet within one attempt window."""


class Resolver(Protocol):
    def where(self, name: str) -> tuple[str | None, int] | None: ...

    def learn(self, name: str, node: str, incarnation: int) -> None: ...

    async def locate(self, caller: "Caller", name: str, after: int, deadline: float, avoid: str | None) -> tuple[str, int]: ...

    def any_node(self, avoid: str | None = None) -> str: ...


def new_id_source() -> Callable[[], str]:
    prefix = os.urandom(6).hex()
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter)}"


def derived_id(parent: str, n: int) -> str:
    """The id of the n-th call made while handling request `parent` (stable across reruns)."""
    rid = f"{parent}>{n}"
    if not wire.fits(rid, wire.MAX_ID_BYTES):
        rid = hashlib.blake2b(parent.encode(), digest_size=16).hexdigest() + f">{n}"
    return rid


class _Pending:
    """One request sent to one node: its outcome once answered, and who waits for it."""

    __slots__ = ("node", "stream", "outcome", "waiter")

    def __init__(self, node: str, stream):
        self.node, self.stream = node, stream
        self.outcome: tuple[bool, Any] | None = None
        self.waiter: asyncio.Future | None = None

    def settle(self, ok: bool, value: Any) -> None:
        if self.outcome is None:
            self.outcome = (ok, value)
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


class Caller:
    """Outstanding requests of one process, and the logic that sees each one through."""

    def __init__(self, clock: Clock, sender: str, send: Callable[..., None],
                 resolver: Resolver, max_bytes: int = wire.DEFAULT_MAX_BYTES, recheck_s: float = RECHECK_S,
                 link_down: Callable[[str], bool] = lambda node: False,
                 link_refused: Callable[[str], bool] = lambda node: False,
                 reconnect: Callable[[str], None] = lambda node: None):
        self.clock, self.sender, self._send = clock, sender, send
        self.link_down = link_down  # True when the connection to a node is known to be down
        self.link_refused = link_refused  # True when a node refused this process's key
        self.reconnect = reconnect        # connect to a node afresh, skipping its reconnect backoff
        self.resolver, self.max_bytes, self.recheck_s = resolver, max_bytes, recheck_s
        self.new_id = new_id_source()
        # request id -> the sends waiting for it (a caller may repeat an id concurrently)
        self._pending: dict[str, list[_Pending]] = {}
        self._link_up: asyncio.Future | None = None  # done when the next link comes up
        self.bad_responses = 0

    # --- incoming ---------------------------------------------------------------------------

    def on_response(self, frame: bytes) -> int:
        """Settle what one frame answers; returns how many messages it held."""
        try:
            msg = wire.decode(frame, self.max_bytes)
        except ProtocolError:
            self.bad_responses += 1
            return 1
        if msg.kind == Kind.BATCH:
            for item in msg.body:
                if type(item) is ProtocolError:
                    self.bad_responses += 1
                else:
                    self._settle(item)
            return len(msg.body)
        self._settle(msg)
        return 1

    def _settle(self, msg: wire.Msg) -> None:
        if msg.kind not in wire.RESPONSES or msg.id is None:
            self.bad_responses += 1
            return
        for p in self._pending.get(msg.id, ()):
            if p.outcome is not None:
                continue  # late answer to something already settled
            if msg.kind == Kind.CHUNK:
                if p.stream is not None:
                    p.stream(msg.body)
            elif msg.kind == Kind.REPLY:
                p.settle(True, msg.body)
            else:
                p.settle(False, error_from_wire(msg.body))

    def link_up(self) -> asyncio.Future:
        """A future done when a connection to some node next comes up (a retry's wake-up)."""
        if self._link_up is None or self._link_up.done():
            self._link_up = asyncio.get_running_loop().create_future()
        return self._link_up

    def on_link_state(self, node: str, up: bool | None) -> None:
        if up:
            if self._link_up is not None and not self._link_up.done():
                self._link_up.set_result(node)
            return
        self._fail_open(node, NotAllowed(f"node {node} refused this process's key (not in its config?)")
                        if up is None else LinkDown(f"lost the connection to node {node}"))

    def link_replaced(self, node: str) -> None:
        """The connection to `node` was closed for a new one (the node came back): what was
        sent on it, and the replies on their way back, are lost with it, and no reply will
        come. Each request open there ends with LinkDown, which a call answers by sending
        again with its id (G2: a run under way is joined, a recorded reply returned)."""
        self._fail_open(node, LinkDown(f"the connection to node {node} was replaced: what it carried may "
                                       f"be lost", {"maybe_sent": True}))

    def _fail_open(self, node: str, err: CallError) -> None:
        """End every request still open at `node` with `err`."""
        for attempts in list(self._pending.values()):
            for p in attempts:
                if p.node == node:
                    p.settle(False, err)

    # --- one request to one node -----------------------------------------------------------

    async def request(self, node: str, kind: Kind, target: str | None, body: Any, timeout: float,
                      rid: str | None = None, stream=None, meta: dict | None = None) -> Any:
        """Send one request to one node and await its answer; no failover. A node whose
        connection is known to be down fails at once with LinkDown."""
        rid = rid or self.new_id()
        p = self._open(node, kind, rid, target, body, timeout, stream, meta, True)
        try:
            return await self._wait(p, timeout)
        except _Recheck:
            raise CallTimeout(f"no answer from node {node} within {timeout:.3g}s") from None
        finally:
            self._close(rid, p)

    def _open(self, node: str, kind: Kind, rid: str, target, body, ttl: float, stream, meta, fail_fast: bool) -> _Pending:
        """Register and send one request."""
        if type(rid) is not str or not wire.fits(rid, wire.MAX_ID_BYTES):
            raise BadRequest(f"a request id must be a string of 1..{wire.MAX_ID_BYTES} bytes of UTF-8, "
                             f"not {rid!r:.60}")
        if self.link_refused(node):
            raise NotAllowed(f"node {node} refused this process's key (not in its config?)")
        if fail_fast and self.link_down(node):
            raise LinkDown(f"no connection to node {node}", {"unsent": True})
        try:
            frame = wire.encode(kind, rid, target, self.sender, int(ttl * 1000), body, meta)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"message cannot be sent: {exc}") from None
        self._check_size(frame)
        p = _Pending(node, stream)
        self._pending.setdefault(rid, []).append(p)
        try:
            self._send(node, frame, ttl)  # held past its ttl while the link is down, it is dropped
        except BaseException:
            self._close(rid, p)
            raise
        return p

    def _check_size(self, frame: bytes) -> None:
        """Refuse here what every node would refuse: an answer of BadRequest, not a timeout."""
        if len(frame) > self.max_bytes:
            raise BadRequest(f"message of {len(frame):,} bytes is too big: the limit is {self.max_bytes:,} "
                             f"(limits.max_message_bytes)")

    def _close(self, rid: str, p: _Pending) -> None:
        attempts = self._pending.get(rid)
        if attempts is not None and p in attempts:
            attempts.remove(p)
            if not attempts:
                del self._pending[rid]

    async def _wait(self, p: _Pending, seconds: float, also: asyncio.Future | None = None) -> Any:
        """The answer to `p` if it comes within `seconds` (on this caller's clock); else
        _Recheck, and `p` stays open to be waited on again. `also` finishing wakes it too."""
        if p.outcome is None and not (also is not None and also.done()):
            waiter = p.waiter = asyncio.get_running_loop().create_future()
            timer = self.clock.call_after(seconds, lambda: waiter.done() or waiter.set_result(None))
            wake = (lambda f: waiter.done() or waiter.set_result(None))
            if also is not None:
                also.add_done_callback(wake)
            try:
                await waiter
            finally:
                timer.cancel()
                p.waiter = None
                if also is not None:
                    also.remove_done_callback(wake)
        if p.outcome is None:
            raise _Recheck()
        ok, value = p.outcome
        if ok:
            return value
        raise value

    # --- calls by name, with failover ------------------------------------------------------

    async def call(self, name: str, body: Any, timeout: float, rid: str | None = None, stream=None,
                   follow: bool = True) -> Any:
        """See the module's docstring. With follow=False an agent that is down or out of
        reach is not waited for: its AgentDown, Unavailable or LinkDown is raised at once
        (a group call tries another member; LinkDown's data says {"unsent": True} when the
        call never left this process). While tracing (mesh.otel), the call is a span whose
        context every attempt carries."""
        if otel.tracer is None:
            return await self._call(name, body, timeout, rid, stream, follow, None)
        span = otel.start(f"call {name}", kind=otel.kinds().CLIENT,
                          attributes={"mesh.agent": name, "mesh.sender": self.sender})
        token = otel.current(span)
        try:
            result = await self._call(name, body, timeout, rid, stream, follow, otel.carrier())
        except BaseException as exc:
            otel.end(span, exc)
            raise
        finally:
            otel.restore(token)
        otel.end(span)
        return result

    async def _call(self, name: str, body: Any, timeout: float, rid: str | None, stream, follow: bool,
                    traced: dict | None) -> Any:
        rid = rid or self.new_id()
        deadline = self.clock.now() + timeout
        known = self.resolver.where(name)
        node, inc = (known if known and known[0] else (self.resolver.any_node(), -1))
        fail_fast = True
        p: _Pending | None = None
        mover: asyncio.Future | None = None  # watches for the agent to move, once the call is slow
        watch = False
        uncertain = 0  # attempts sent that may have run (not refused unrun, as Moved is)
        try:
            while True:
                remaining = deadline - self.clock.now()
                if remaining <= 0:
                    raise CallTimeout(f"call to {name!r} got no reply within {timeout:.3g}s")
                try:
                    if p is None:
                        p = self._open(node, Kind.CALL, rid, name, body, remaining, stream,
                                       _meta(stream, inc, traced), fail_fast)
                        uncertain += 1
                    wait = min(remaining, self.recheck_s) if mover is None else remaining
                    return await self._wait(p, wait, mover)
                except _Recheck:
                    # A slow handler, or a silent node. Watch (a WHEREIS long-poll elsewhere)
                    # for the agent to get a newer incarnation, and send again only if it does.
                    if mover is None:
                        mover = asyncio.ensure_future(self._moved(name, node, inc, deadline))
                    elif mover.done():
                        where, mover = mover.result(), None
                        if where is not None and where != (node, inc):
                            self._close(rid, p)
                            p, (node, inc), fail_fast = None, where, True
                    continue
                except Moved as moved:
                    uncertain -= 1
                    node, inc = self._follow(name, moved)
                    fail_fast = True
                except NoSuchAgent as gone:
                    # Sent to an earlier agent of the name (a stale location), which was
                    # stopped: another runs there now. If no attempt of this call may have
                    # run, it is a new call to that agent; else it was meant for the old one.
                    uncertain -= 1
                    where, newer = gone.data.get("node"), gone.data.get("incarnation")
                    if not gone.data.get("earlier_life") or uncertain > 0 or type(where) is not str \
                            or type(newer) is not int:
                        raise
                    node, inc = where, newer
                    self.resolver.learn(name, node, inc)
                    fail_fast = True
                except LinkDown as down:
                    if not follow:
                        raise
                    # Where is it now? Perhaps still there: the node was restarted and already
                    # hosts it again, and only this connection has yet to come back. Then send
                    # anyway; the link holds the message until it reconnects.
                    where, newer = await self._relocate(name, -1, deadline, node, down)
                    if where == node and inc >= 0 and newer > inc:
                        self.reconnect(node)  # it was restarted there: skip the link's backoff
                    elif where == node:
                        watch = True  # the supervisor may not know yet: watch for a move at once
                    fail_fast, node, inc = where != node, where, newer
                except Retryable as down:
                    if not down.retryable or not follow:
                        raise  # the agent is where it was; trying again at once would fail the same way
                    node, inc = await self._relocate(name, inc, deadline, None, down)
                    fail_fast = True
                if p is not None:
                    self._close(rid, p)
                    p = None
                if mover is not None:
                    mover.cancel()
                    mover = None
                if watch:
                    mover, watch = asyncio.ensure_future(self._moved(name, node, inc, deadline)), False
        finally:
            if p is not None:
                self._close(rid, p)
            if mover is not None:
                mover.cancel()

    async def _moved(self, name: str, node: str, inc: int, deadline: float) -> tuple[str, int] | None:
        """Where the name runs once it has an incarnation newer than `inc` (asked of a node
        other than `node`); None if that does not happen before the deadline."""
        try:
            return await self.resolver.locate(self, name, inc, deadline, node)
        except (CallTimeout, Retryable, NoSuchAgent, NotAllowed):
            return None

    def cast(self, name: str, body: Any, kind: Kind = Kind.CAST) -> None:
        """Fire and forget to wherever the name is believed to live (no failover)."""
        known = self.resolver.where(name)
        node = known[0] if known and known[0] else self.resolver.any_node()
        try:
            frame = wire.encode(kind, None, name, self.sender, None, body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"message cannot be sent: {exc}") from None
        self._check_size(frame)
        self._send(node, frame)

    def _follow(self, name: str, moved: Moved) -> tuple[str, int]:
        node, inc = moved.data.get("node"), moved.data.get("incarnation", -1)
        if not isinstance(node, str):
            raise Unavailable(f"bad redirect for {name!r}: {moved.data!r:.100}")
        self.resolver.learn(name, node, inc)
        return node, inc

    async def _relocate(self, name: str, inc: int, deadline: float, avoid: str | None, cause: CallError) -> tuple[str, int]:
        try:
            return await self.resolver.locate(self, name, inc, deadline, avoid)
        except CallTimeout:
            raise CallTimeout(f"call to {name!r}: {cause} and it did not come back in time") from None


class ClientResolver:
    """A client's view of where names live: a cache filled by redirects and WHEREIS."""

    def __init__(self, nodes: list[str], is_up: Callable[[str], bool], clock: Clock):
        self.nodes, self.is_up, self.clock = nodes, is_up, clock
        self.cache: dict[str, tuple[str, int]] = {}
        self._rr = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def where(self, name: str):
        return self.cache.get(name)

    def learn(self, name: str, node: str, incarnation: int) -> None:
        self.cache[name] = (node, incarnation)

    def any_node(self, avoid: str | None = None) -> str:
        candidates = [n for n in self.nodes if n != avoid] or list(self.nodes)
        live = [n for n in candidates if self.is_up(n)] or candidates
        return live[next(self._rr) % len(live)]

    async def locate(self, caller: Caller, name: str, after: int, deadline: float, avoid: str | None) -> tuple[str, int]:
        """Ask live nodes where `name` runs with an incarnation newer than `after`. A node
        that cannot answer is avoided next time, after a wait with backoff (cut short when
        a link comes up): when every link is down each attempt fails at once."""
        self.cache.pop(name, None)
        backoff = Backoff(self.clock)
        while True:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise CallTimeout(f"{name!r} was not placed again in time")
            node = self.any_node(avoid)
            wait = min(remaining, 2.0)
            try:
                body = await caller.request(node, Kind.WHEREIS, name, {"after": after, "wait_ms": int(wait * 1000)},
                                            wait + 0.5 if remaining > wait + 0.5 else remaining)
            except NoSuchAgent:
                raise
            except (Retryable, CallTimeout) as err:
                avoid = node
                if not isinstance(err, CallTimeout):  # a timeout has waited its share already
                    await backoff.wait(deadline, caller.link_up())
                continue
            if not isinstance(body, dict) or not isinstance(body.get("node"), str):
                continue  # not placed yet; ask again
            self.learn(name, body["node"], body.get("incarnation", -1))
            return body["node"], body.get("incarnation", -1)


def _meta(stream, inc: int, traced: dict | None = None) -> dict | None:
    """A call's flags: a stream of replies wanted, the incarnation it is sent to (so that
    a late copy is never run by a later agent of the name: see Node._to_agent), and the
    trace context it belongs to (mesh.otel)."""
    meta = {"stream": True} if stream is not None else None
    if inc >= 0:
        meta = {**(meta or {}), "inc": inc}
    if traced:
        meta = {**(meta or {}), **traced}
    return meta
