"""ZeroMQ sockets, their options, and how the asyncio loop reads them.

Two ends, both non-blocking and driven by loop callbacks (no task per socket):

    Listener  the node's one bound ROUTER. Requests come in with the peer's routing id;
              answers go back to that routing id. ROUTER_MANDATORY is on, so a reply to
              a vanished peer is counted instead of silently lost.
    Link      a DEALER connected to one listener. IMMEDIATE is on: messages are only
              handed to a live connection; while it is down they wait in a bounded queue
              and go out on the next handshake. A monitor socket tells when the link
              comes up or goes down, so callers learn of a dead peer at once.

Reading: ZMQ_FD is edge-triggered, so each wake-up drains the socket with NOBLOCK until
EAGAIN (at most `batch` messages, then yields to the loop and continues), and every
send re-checks ZMQ_EVENTS, because a send can swallow the read edge. This is the batch
read that DESIGN.md asks for: one wake-up, many messages.

zmq errors end here: a failed send returns False or raises a mesh error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import Busy

log = logging.getLogger("mesh.transport")

HWM = 100_000
PENDING_LIMIT = 10_000
RECONNECT_IVL_MS = 20
RECONNECT_IVL_MAX_MS = 1000
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000

_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class _Drain:
    """Calls `on_parts(parts)` for every message of a socket, in batches, from the loop."""

    def __init__(self, sock: zmq.Socket, on_parts: Callable[[list], None], batch: int):
        self.sock, self.on_parts, self.batch = sock, on_parts, batch
        self.loop = asyncio.get_running_loop()
        self.fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self.loop.add_reader(self.fd, self.run)
        self.poke()  # an edge may have passed before add_reader

    def poke(self) -> None:
        """Schedule a drain soon (after a send, or when a batch stopped early)."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._scheduled_run)

    def _scheduled_run(self) -> None:
        self._scheduled = False
        self.run()

    def run(self) -> None:
        sock, on_parts = self.sock, self.on_parts
        if sock.closed:
            return
        for _ in range(self.batch):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # socket closed under us during shutdown
                log.debug("recv failed: %s", exc)
                return
            on_parts(parts)
        self.poke()  # more may be waiting: come back after others had their turn

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass


class Listener:
    """The node's bound ROUTER. `on_request(route, frame)`; frame is None if malformed."""

    def __init__(self, ctx: zmq.Context, endpoint: str, on_request: Callable[[bytes, bytes | None], None],
                 max_bytes: int, batch: int = 512, security=None):
        self.sock = ctx.socket(zmq.ROUTER)
        s = self.sock
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        # libzmq drops a peer that sends more than this; below it, wire.decode answers with an error.
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes * 2 + 1024)
        if security is not None:
            security.server(s)
        s.bind(endpoint)
        self.endpoint = endpoint
        self.sent = self.dropped = 0
        self._on_request = on_request
        self._drain = _Drain(s, self._parts, batch)

    def _parts(self, parts: list) -> None:
        if len(parts) == 2:
            self._on_request(parts[0], parts[1])
        else:
            self._on_request(parts[0], None)

    def send(self, route: bytes, frame: bytes) -> bool:
        """Send to one peer. False (and counted) when the peer is gone or its queue is full."""
        try:
            self.sock.send_multipart((route, frame), zmq.DONTWAIT)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: peer gone; EAGAIN: its queue is full
            self.dropped += 1
            log.debug("reply to a peer dropped: %s", exc.strerror)
            return False
        finally:
            self._drain.poke()
        self.sent += 1
        return True

    def close(self) -> None:
        self._drain.close()
        self.sock.close(0)


class Link:
    """A DEALER to one listener, with a bounded queue while the connection is down.

    `on_response(frame)` gets every message the peer sends back. `on_state(up)` is told
    when the connection comes up or goes down; `up` is None for a refused handshake.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, on_response: Callable[[bytes], None],
                 on_state: Callable[[bool | None], None] | None, max_bytes: int, batch: int = 512,
                 security=None):
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        s = self.sock
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes * 2 + 1024)
        s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        s.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
        if security is not None:
            security.client(s)
        self.up = False
        self.refused = False
        self.pending: deque[bytes] = deque()
        self._on_response = on_response
        self._on_state = on_state
        self._monitor = s.get_monitor_socket(_MONITOR_EVENTS)
        s.connect(endpoint)
        self._drain = _Drain(s, self._parts, batch)
        self._monitor_drain = _Drain(self._monitor, self._event, 64)
        self._retry_timer: asyncio.TimerHandle | None = None

    def _parts(self, parts: list) -> None:
        self._on_response(parts[-1] if len(parts) == 1 else b"")

    def _event(self, parts: list) -> None:
        try:
            event = parse_monitor_message(parts)["event"]
        except Exception:  # a malformed monitor message would be a libzmq bug; ignore it
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up, self.refused = True, False
            self._flush()
            if self._on_state:
                self._on_state(True)
        elif event == zmq.EVENT_DISCONNECTED:
            if self.up:
                self.up = False
                if self._on_state:
                    self._on_state(False)
        else:  # a failed handshake: wrong keys or not a mesh peer
            self.up, self.refused = False, True
            log.warning("handshake with %s refused", self.endpoint)
            if self._on_state:
                self._on_state(None)

    def send(self, frame: bytes) -> None:
        """Send now if connected, else queue it. Raises Busy when the queue is full."""
        if self.up and not self.pending:
            try:
                self.sock.send(frame, zmq.DONTWAIT)
                self._drain.poke()
                return
            except zmq.Again:
                pass
        if len(self.pending) >= PENDING_LIMIT:
            raise Busy(f"send queue to {self.endpoint} is full ({PENDING_LIMIT} messages)")
        self.pending.append(frame)
        if self.up:  # connected but its queue is full: try again shortly
            self._schedule_retry()

    def _flush(self) -> None:
        self._retry_timer = None
        while self.pending:
            try:
                self.sock.send(self.pending[0], zmq.DONTWAIT)
            except zmq.Again:
                if self.up:
                    self._schedule_retry()
                break
            except zmq.ZMQError:
                return
            self.pending.popleft()
        self._drain.poke()

    def _schedule_retry(self) -> None:
        if self._retry_timer is None and not self.sock.closed:
            self._retry_timer = asyncio.get_running_loop().call_later(0.005, self._flush)

    def close(self) -> None:
        if self._retry_timer:
            self._retry_timer.cancel()
        self._drain.close()
        self._monitor_drain.close()
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self.sock.close(0)


def new_context() -> zmq.Context:
    """A fresh context for this process. Never create one before a fork (see TRAPS.md)."""
    return zmq.Context()
