"""How a node reaches the others: a real ZeroMQ network, or an in-memory one for tests.

Both give the same two calls, `listen` and `link`, returning objects with the shape of
`transport.Listener` and `transport.Link`. The in-memory network delivers every frame
through the loop (never inline, as a socket would not), and tracks frames in flight so a test can wait until all are delivered:
node logic is then tested deterministically, with a fake clock, and without sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Callable

from . import transport


class ZmqNetwork:
    """Sockets of one process on one ZeroMQ context. With `security`, every socket is
    CURVE; with `authenticator` too, the listener admits only the keys it knows."""

    def __init__(self, max_bytes: int, batch: int = 512, security=None, authenticator=None,
                 out_limit: int = transport.OUT_LIMIT):
        self.ctx = transport.new_context()
        self.max_bytes, self.batch, self.security = max_bytes, batch, security
        self.out_limit = out_limit
        self._make_auth = authenticator
        self.auth = None

    def listen(self, endpoint: str, on_request: Callable[[bytes, bytes | None], int],
               serve: Callable[[float], int] | None = None) -> transport.Listener:
        if self.security is not None and self.auth is None:
            if self._make_auth is None:
                raise RuntimeError("a secure listener needs an authenticator: CURVE alone lets any key in")
            self.auth = self._make_auth(self.ctx)  # ZAP must be up before the socket binds
            self.auth.start()
        return transport.Listener(self.ctx, endpoint, on_request, self.max_bytes, self.batch, self.security,
                                  self.out_limit, serve)

    def link(self, endpoint: str, on_response: Callable[[bytes], None],
             on_state: Callable[[bool | None], None] | None = None, owner: str | None = None) -> transport.Link:
        return transport.Link(self.ctx, endpoint, on_response, on_state, self.max_bytes, self.batch, self.security)

    def close(self) -> None:
        """Close what is still open (linger 0) and end the context; sockets closed earlier
        with a linger get that long to deliver what they hold."""
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy()


class _MemListener:
    """Each frame is read on its own loop callback; with `serve`, a turn of serving
    follows (see transport._Drain), itself a frame in flight until it has run."""

    def __init__(self, net: "MemoryNetwork", endpoint: str, on_request, serve=None):
        self.net, self.endpoint, self.on_request, self.serve = net, endpoint, on_request, serve
        self.sent = self.dropped = 0
        self.closed = False
        self._turn_scheduled = False

    def receive(self, route: bytes, frame: bytes) -> None:
        if self.closed:
            return
        self.on_request(route, frame)
        self._schedule_turn()

    def _schedule_turn(self) -> None:
        if self.serve is not None and not self._turn_scheduled:
            self._turn_scheduled = True
            self.net._deliver(self.endpoint, self._turn, b"")

    def _turn(self, _frame: bytes) -> None:
        self._turn_scheduled = False
        if not self.closed and self.serve(time.perf_counter() + transport.TURN_BUDGET_S) > 0:
            self._schedule_turn()

    def send_now(self, route: bytes) -> None:
        pass  # frames leave at once here

    def identity(self, route: bytes) -> str:
        return self.net.identities.get(route, transport.ANONYMOUS)

    def check_partial(self) -> None:
        pass  # no unfinished messages on the in-memory network

    def send(self, route: bytes, frame: bytes) -> None:
        link = self.net._routes.get(route)
        if self.closed or link is None or link.closed:
            self.dropped += 1
            return
        self.sent += 1
        self.net._deliver(link.owner, link._receive, frame)

    def close(self) -> None:
        self.closed = True
        if self.net._listeners.get(self.endpoint) is self:
            del self.net._listeners[self.endpoint]
            for link in list(self.net._routes.values()):
                if link.endpoint == self.endpoint:
                    link._set_up(False)


class _MemLink:
    def __init__(self, net: "MemoryNetwork", endpoint: str, on_response, on_state, owner=None):
        self.net, self.endpoint, self.owner = net, endpoint, owner
        self.on_response, self.on_state = on_response, on_state
        self.route = b"mem-%d" % next(net._ids)
        self.up = False
        self.refused = False
        self.closed = False
        self.pending: list[bytes] = []
        net._routes[self.route] = self
        if endpoint in net._listeners:
            net.loop.call_soon(self._set_up, True)

    def _set_up(self, up: bool) -> None:
        if self.closed or up == self.up:
            return
        self.up = up
        if up:
            pending, self.pending = self.pending, []
            now = self.net.now()
            for frame, until in pending:
                if until >= now:
                    self.send(frame)
        if self.on_state:
            self.on_state(up)

    def send(self, frame: bytes, ttl: float | None = None) -> None:
        listener = self.net._listeners.get(self.endpoint)
        if not self.up or listener is None:
            until = self.net.now() + ttl if ttl is not None else float("inf")
            self.pending.append((frame, until))  # dropped unsent past `until`, as a Link's are
            return
        self.net._deliver(self.endpoint, lambda f: listener.receive(self.route, f), frame)

    def _receive(self, frame: bytes) -> None:
        if not self.closed:
            self.on_response(frame)

    async def drain(self, timeout: float) -> bool:
        return not self.pending

    def take_held(self) -> list:
        held, self.pending = self.pending, []
        return held

    def hold(self, held: list) -> None:
        now = self.net.now()
        for frame, until in held:
            if not self.up or self.net._listeners.get(self.endpoint) is None:
                self.pending.append((frame, until))
            elif until >= now:
                self.send(frame)

    def close(self, linger_ms: int = 0) -> None:
        self.closed = True
        self.net._routes.pop(self.route, None)


class MemoryNetwork:
    """Listeners and links in one process and one loop."""

    def __init__(self, clock=None):
        self.loop = asyncio.get_running_loop()
        self.clock = clock  # whose time a held frame's ttl runs on (tests: their fake clock)
        self._listeners: dict[str, _MemListener] = {}
        self._routes: dict[bytes, _MemLink] = {}
        self._ids = itertools.count(1)
        self.identities: dict[bytes, str] = {}  # route -> "role:name", for tests of roles
        self._frozen: dict[str, list] = {}      # endpoint -> frames held for a frozen node
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.max_bytes = 1 << 30


    @property
    def in_flight(self) -> int:
        """Frames sent and not yet delivered (tests wait for none)."""
        return self._in_flight
    def now(self) -> float:
        return self.clock.now() if self.clock is not None else time.monotonic()

    def listen(self, endpoint: str, on_request, serve=None) -> _MemListener:
        listener = _MemListener(self, endpoint, on_request, serve)
        self._listeners[endpoint] = listener
        for link in self._routes.values():
            if link.endpoint == endpoint:
                self.loop.call_soon(link._set_up, True)
        return listener

    def link(self, endpoint: str, on_response, on_state=None, owner: str | None = None) -> _MemLink:
        return _MemLink(self, endpoint, on_response, on_state, owner)

    def freeze(self, endpoint: str) -> None:
        """Hold every frame for the node listening at `endpoint` (as SIGSTOP would)."""
        self._frozen.setdefault(endpoint, [])

    def thaw(self, endpoint: str) -> None:
        """Deliver what was held for it, in order."""
        for receive, frame in self._frozen.pop(endpoint, []):
            self._deliver(endpoint, receive, frame)

    def _deliver(self, receiver: str | None, receive: Callable[[bytes], None], frame: bytes) -> None:
        held = self._frozen.get(receiver) if receiver is not None else None
        if held is not None:
            held.append((receive, frame))
            return
        self._in_flight += 1
        self._idle.clear()
        self.loop.call_soon(self._arrive, receive, frame)

    def _arrive(self, receive, frame) -> None:
        try:
            receive(frame)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def settled(self) -> None:
        """Wait until no frame is in flight (and nothing new was sent by those delivered)."""
        while True:
            await self._idle.wait()
            await asyncio.sleep(0)  # let callbacks queued by the last delivery run
            if self._in_flight == 0:
                return

    def close(self) -> None:
        pass
