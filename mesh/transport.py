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
read that DESIGN.md asks for: one wake-up, many messages. A listener's reader hands
what it read to the node, which queues it per peer; at the end of each such turn the
node serves its queues (round-robin across peers), and reading waits while a turn's
worth is still queued.

zmq errors end here: a failed send returns False or raises a mesh error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import time
from collections import deque
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .backlogs import Backlogs, bytes_received
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


IDENTITY_CACHE = 100_000    # routes whose authenticated identity a listener remembers
ANONYMOUS = "node:local"    # the identity of every peer when the cluster is not secure
BATCH_FRAMES = 256          # a loop turn's frames to one peer go out as one BATCH ...
BATCH_BYTES = 256 * 1024    # ... of at most this many frames and bytes
TURN_BUDGET_S = 0.02        # a socket's drain yields to the loop after this long
HANDSHAKE_IVL_MS = 3000     # a connection that has not finished its handshake by then is closed
OUT_LIMIT = 64 << 20        # answers queued for one peer that does not read them (bytes)
PARTIAL_LIMIT = 64 << 20    # bytes a connection may hold unread or unfinished before it is cut

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's enum flags cost a conversion per call
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)


class _Drain:
    """Calls `read(sock)` for every message of a socket, in batches, from the loop.

    `read` receives exactly one ZeroMQ message, hands it on, and returns how many mesh
    messages it held (a BATCH holds many); it raises zmq.Again when the socket is empty.
    One wake-up handles about `batch` mesh messages, then lets the loop turn.

    With `serve`, reading only queues: `serve(until)` is called at the end of each turn
    to handle what was read, and returns how many messages are still queued; while that
    is `batch` or more, the next turn reads nothing and only serves."""

    def __init__(self, sock: zmq.Socket, read: Callable[[zmq.Socket], None], batch: int,
                 serve: Callable[[float], int] | None = None):
        self.sock, self.read, self.batch, self.serve = sock, read, batch, serve
        self.queued = 0
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
        sock, read = self.sock, self.read
        if sock.closed:
            return
        # bounded in messages and in time: one costly frame must not starve the
        # loop's timers (leases, heartbeats) or the other sockets
        until = time.perf_counter() + TURN_BUDGET_S
        more = True  # more may be waiting: come back after others had their turn
        if self.queued < self.batch:
            try:
                handled = 0
                while handled < self.batch and time.perf_counter() < until:
                    handled += read(sock) or 1
            except zmq.Again:
                more = False
            except zmq.ZMQError as exc:  # socket closed under us during shutdown
                log.debug("recv failed: %s", exc)
                return
        if self.serve is not None:
            self.queued = self.serve(until)
            more = more or self.queued > 0
        if more:
            self.poke()

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass


class _Outbox:
    """Frames to one peer within one loop turn, sent as one frame (a BATCH if several)."""

    __slots__ = ("frames", "size", "untils")

    def __init__(self):
        self.frames: list[bytes] = []
        self.size = 0
        self.untils: list[float] = []  # per frame: the moment it is no longer wanted (Link)

    def add(self, frame: bytes, until: float = math.inf) -> bool:
        """Queue a frame; True when the outbox is full and must be sent now."""
        self.frames.append(frame)
        self.untils.append(until)
        self.size += len(frame)
        return len(self.frames) >= BATCH_FRAMES or self.size >= BATCH_BYTES

    def take(self) -> bytes | None:
        frames = self.frames
        if not frames:
            return None
        self.frames, self.size, self.untils = [], 0, []
        return frames[0] if len(frames) == 1 else wire.batch_frame(frames)

    def take_each(self) -> list[tuple[bytes, float]]:
        """The frames one by one, each with its deadline (to hold while a link is down)."""
        items = list(zip(self.frames, self.untils))
        self.frames, self.size, self.untils = [], 0, []
        return items


def _rest_of(sock: zmq.Socket, frame: zmq.Frame) -> int:
    """Discard the remaining frames of a message; returns how many there were."""
    n = 0
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        n += 1
    return n


class Listener:
    """The node's bound ROUTER. `on_request(route, frame)`, frame None if malformed, returns
    how many messages the frame held; `serve(until)`, if given, ends each turn (see _Drain)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, on_request: Callable[[bytes, bytes | None], int],
                 max_bytes: int, batch: int = 512, security=None, out_limit: int = OUT_LIMIT,
                 serve: Callable[[float], int] | None = None):
        self.sock = ctx.socket(zmq.ROUTER)
        s = self.sock
        s.setsockopt(zmq.LINGER, 0)
        # connections that never finish their handshake hold a descriptor each: not for long
        s.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        # libzmq drops a peer that sends more than this; below it, wire.decode answers with an error.
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes * 2 + 1024)
        if security is not None:
            security.server(s)
        s.bind(endpoint)
        self.endpoint = endpoint
        self.secure = security is not None
        self.sent = self.dropped = self.unread_dropped = 0
        self._identities: dict[bytes, str] = {}
        self.out_limit = out_limit
        self._out = Backlogs(out_limit, IDENTITY_CACHE)
        self._on_request = on_request
        self._drain = _Drain(s, self._read, batch, serve)
        # the connections' descriptors (from the monitor), to bound what a peer may leave
        # unfinished: a message whose last frame never comes grows inside ZeroMQ unseen
        self._monitor = s.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor_drain = _Drain(self._monitor, self._read_event, 64)
        self._conns: dict[int, list[int]] = {}  # fd -> [bytes of whole messages read from it, messages]
        self.partial_limit = max(PARTIAL_LIMIT, 4 * max_bytes)
        self.cut = 0
        self._outboxes: dict[bytes, _Outbox] = {}
        self._flush_scheduled = False

    def _read(self, sock: zmq.Socket) -> int:
        # A ROUTER message is [routing id, payload]; reading the payload as a Frame tells
        # cheaply whether more frames follow (a malformed message), where
        # recv_multipart pays a getsockopt per message.
        route = sock.recv(_NOBLOCK)
        payload = sock.recv(_NOBLOCK, copy=False)
        if self.secure:  # every message: a routing id may pass to another key's connection
            self._remember(route, payload)
        if self._out.learn(route, payload):  # it does not read its answers: nor do we read its requests
            _rest_of(sock, payload)
            self.unread_dropped += 1
            return 1
        conn = self._conns.get(self._out.fds.get(route, -1))
        if conn is not None:
            conn[0] += len(payload)
            conn[1] += 1
        if payload.more:
            _rest_of(sock, payload)
            return self._on_request(route, None)
        # A view, not a copy: a frame over the size limit is refused by its length alone,
        # and msgpack decodes the others straight from libzmq's buffer.
        return self._on_request(route, payload.buffer)

    def _remember(self, route: bytes, payload: zmq.Frame) -> None:
        """The authenticated "role:name" of the message just read (its ZAP User-Id)."""
        identities = self._identities
        if route not in identities and len(identities) >= IDENTITY_CACHE:
            identities.pop(next(iter(identities)))
        try:
            identities[route] = payload.get("User-Id")
        except zmq.ZMQError:
            identities[route] = ""

    def identity(self, route: bytes) -> str:
        """Who sent the latest message from `route`, as its connection authenticated it:
        "role:name" when secure, else the anonymous local peer."""
        if not self.secure:
            return ANONYMOUS
        return self._identities.get(route, "")

    def send(self, route: bytes, frame: bytes) -> None:
        """Queue a frame for one peer; this loop turn's frames to it leave together."""
        box = self._outboxes.get(route)
        if box is None:
            box = self._outboxes[route] = _Outbox()
        if box.add(frame):
            self._send_now(route, box.take())
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._drain.loop.call_soon(self.flush)

    def send_now(self, route: bytes) -> None:
        """Send what is queued for one peer now, not at the end of the turn."""
        box = self._outboxes.pop(route, None)
        if box is not None:
            frame = box.take()
            if frame is not None:
                self._send_now(route, frame)

    def flush(self) -> None:
        self._flush_scheduled = False
        boxes, self._outboxes = self._outboxes, {}
        for route, box in boxes.items():
            frame = box.take()
            if frame is not None:
                self._send_now(route, frame)
        self._drain.poke()

    def _send_now(self, route: bytes, frame: bytes) -> None:
        if not self._out.may_send(route, len(frame)):
            self.dropped += 1
            self.unread_dropped += 1
            return
        try:
            self.sock.send(route, _SNDMORE_NOBLOCK)
            self.sock.send(frame, _NOBLOCK)
            self.sent += 1
        except zmq.ZMQError as exc:  # EHOSTUNREACH: peer gone; EAGAIN: its queue is full
            self.dropped += 1
            log.debug("reply to a peer dropped: %s", exc.strerror)

    def _read_event(self, sock: zmq.Socket) -> None:
        try:
            event = parse_monitor_message(sock.recv_multipart(_NOBLOCK))
        except (ValueError, KeyError, struct.error):  # a malformed event would be a libzmq bug
            return
        fd = int(event["value"])
        if event["event"] == zmq.EVENT_ACCEPTED:
            self._conns.setdefault(fd, [0, 0])
        else:
            self._conns.pop(fd, None)

    def check_partial(self) -> None:
        """Cut connections that hold too much unfinished: bytes received from the peer that
        never became a whole message. Called a few times a second by the node."""
        for fd, (delivered, messages) in list(self._conns.items()):
            received = bytes_received(fd)
            if received is None:
                self._conns.pop(fd, None)
                continue
            # framing, CURVE boxes and the handshake cost a little per message and once
            unfinished = received - delivered - 64 * messages - 64 * 1024
            if unfinished > self.partial_limit:
                self.cut += 1
                log.warning("cut a connection holding %d bytes of an unfinished message (limit %d)",
                            unfinished, self.partial_limit)
                self._conns.pop(fd, None)
                try:
                    sock = socket.socket(fileno=fd)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # ZeroMQ sees it close and frees what it held
                    finally:
                        sock.detach()
                except OSError:
                    pass

    def close(self) -> None:
        if not self.sock.closed:
            self.flush()
        _close_watched(self.sock, self._drain, self._monitor, self._monitor_drain, 0)


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
            security.client(s, endpoint)
        self.up = False
        self.refused = False
        self.pending: deque[bytes] = deque()
        self.pending_until: deque[float] = deque()  # per pending frame: dropped unsent after this
        self.expired = 0
        self._outbox = _Outbox()
        self._flush_scheduled = False
        self._drained: asyncio.Event | None = None
        self._on_response = on_response
        self._on_state = on_state
        self._monitor = s.get_monitor_socket(_MONITOR_EVENTS)
        s.connect(endpoint)
        self._drain = _Drain(s, self._read, batch)
        self._monitor_drain = _Drain(self._monitor, self._read_event, 64)
        self._retry_timer: asyncio.TimerHandle | None = None

    def _read(self, sock: zmq.Socket) -> None:
        frame = sock.recv(_NOBLOCK, copy=False)
        if frame.more:
            _rest_of(sock, frame)
            return self._on_response(b"")  # malformed: counted by the receiver
        return self._on_response(frame.bytes)

    def _read_event(self, sock: zmq.Socket) -> None:
        self._event(sock.recv_multipart(_NOBLOCK))

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
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # the peer's authenticator said no
            self.up, self.refused = False, True
            log.warning("handshake with %s refused", self.endpoint)
            if self._on_state:
                self._on_state(None)
        else:  # a handshake that broke off (its peer killed mid-way, or not a mesh peer)
            log.debug("handshake with %s failed; trying again", self.endpoint)
            if self.up:
                self.up = False
                if self._on_state:
                    self._on_state(False)

    def send(self, frame: bytes, ttl: float | None = None) -> None:
        """Queue a frame; this loop turn's frames leave together. While the connection is
        down they wait in a bounded queue; raises Busy when that is full. A frame with a
        `ttl` (its sender waits that long) that is still waiting when it runs out is
        dropped: sent late, a call whose caller gave up (or was answered elsewhere) would
        run on a node that has no way to know."""
        if len(self.pending) >= PENDING_LIMIT:
            raise Busy(f"send queue to {self.endpoint} is full ({PENDING_LIMIT} messages)")
        until = time.monotonic() + ttl if ttl is not None else math.inf
        if self._outbox.add(frame, until):
            self._flush_outbox(scheduled=False)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._drain.loop.call_soon(self._flush_outbox)

    def _flush_outbox(self, scheduled: bool = True) -> None:
        if scheduled:
            self._flush_scheduled = False
        if not self._outbox.frames:
            return
        if self.up and not self.pending:
            self._push(self._outbox.take())
        else:  # held: one by one, so that each leaves, or is dropped, on its own deadline
            for frame, until in self._outbox.take_each():
                self._push(frame, until)

    def _push(self, frame: bytes, until: float = math.inf) -> None:
        if self.up and not self.pending:
            try:
                self.sock.send(frame, _NOBLOCK)
                self._drain.poke()
                return
            except zmq.Again:
                pass
        self.pending.append(frame)
        self.pending_until.append(until)
        if self.up:  # connected but its queue is full: try again shortly
            self._schedule_retry()

    def _flush(self) -> None:
        self._retry_timer = None
        now = time.monotonic()
        while self.pending:
            if self.pending_until[0] < now:
                self.pending.popleft()
                self.pending_until.popleft()
                self.expired += 1
                continue
            try:
                self.sock.send(self.pending[0], _NOBLOCK)
            except zmq.Again:
                if self.up:
                    self._schedule_retry()
                break
            except zmq.ZMQError:
                return
            self.pending.popleft()
            self.pending_until.popleft()
        if not self.pending and self._drained is not None:
            self._drained.set()
        self._drain.poke()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything sent so far has been handed to a live connection."""
        self._flush_outbox()
        if not self.pending:
            return True
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _schedule_retry(self) -> None:
        if self._retry_timer is None and not self.sock.closed:
            self._retry_timer = asyncio.get_running_loop().call_later(0.005, self._flush)

    def take_held(self) -> list[tuple[bytes, float]]:
        """The frames not yet handed to a connection, each with its deadline, taken out
        (for the link that replaces this one: see `hold`)."""
        held = list(zip(self.pending, self.pending_until)) + self._outbox.take_each()
        self.pending.clear()
        self.pending_until.clear()
        return held

    def hold(self, held: list[tuple[bytes, float]]) -> None:
        """Take over frames another link held (a reconnect must not lose the calls that
        were waiting on the old connection)."""
        for frame, until in held:
            self._push(frame, until)

    def close(self, linger_ms: int = 0) -> None:
        """Close; `linger_ms` gives messages already handed to ZeroMQ that long to leave."""
        if not self.sock.closed and self.up:
            self._flush_outbox()
        if self._retry_timer:
            self._retry_timer.cancel()
        _close_watched(self.sock, self._drain, self._monitor, self._monitor_drain, linger_ms)


def _close_watched(sock: zmq.Socket, drain: _Drain, monitor: zmq.Socket, monitor_drain: _Drain,
                   linger_ms: int) -> None:
    """Close a socket and the monitor that watches it, with their readers."""
    drain.close()
    monitor_drain.close()
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(0)
    sock.close(linger_ms)


def new_context() -> zmq.Context:
    """A fresh context for this process. Never create one before a fork (see TRAPS.md)."""
    return zmq.Context()
