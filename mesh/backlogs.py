"""What each connection of a listener holds unread, by the kernel's count (TCP_INFO).

ZeroMQ bounds its queues in messages, not bytes, and says nothing of a connection's
bytes: how much of what a node sent a peer has not read, or how much a peer sent that
never became a whole message. The kernel knows both for TCP. transport.Listener asks it
through these, to bound what one peer can make a node hold (G5, docs/security.md).
"""

from __future__ import annotations

import socket
import struct

import zmq

LOOK_EVERY = 256 << 10      # bytes sent to a peer between looks at its connection's send queue
_TCPI_BYTES_ACKED = 120     # Linux: offsets in struct tcp_info (4.1+): bytes the peer acknowledged ...
_TCPI_BYTES_RECEIVED = 128  # ... and bytes received from it


class Backlogs:
    """How far each peer has fallen behind in reading its answers, so a peer that never
    reads cannot make the node queue answers without bound (ZeroMQ bounds its queues in
    messages, not bytes, and an answer may be megabytes).

    Per connection: the bytes of answers handed to ZeroMQ, against the bytes the peer's
    TCP has acknowledged (TCP_INFO); the difference waits in ZeroMQ or in the kernel. Past
    `limit` bytes, answers to that peer are dropped (counted) and its requests left unread,
    until it catches up. The connection's descriptor comes with each message (ZMQ_SRCFD)."""

    def __init__(self, limit: int, max_routes: int):
        self.limit, self.max_routes = limit, max_routes
        self.fds: dict[bytes, int] = {}
        # route -> [bytes handed to ZeroMQ since the last look, bytes handed in all, acked at the start]
        self.conns: dict[bytes, list[int]] = {}
        self.over: set[bytes] = set()  # routes whose answers were refused: looked at when they send

    def learn(self, route: bytes, payload: zmq.Frame) -> bool:
        """Note the connection of `route`; True when its requests are to be left unread."""
        if route not in self.fds:
            if len(self.fds) >= self.max_routes:
                old = next(iter(self.fds))
                self.fds.pop(old)
                self.conns.pop(old, None)
                self.over.discard(old)
            try:
                fd = payload.get(zmq.SRCFD)
            except zmq.ZMQError:
                fd = -1
            self.fds[route] = fd
            acked = _tcp_info(fd, _TCPI_BYTES_ACKED) if fd >= 0 else None
            if acked is not None and self.limit > 0:
                self.conns[route] = [0, 0, acked]
        if route not in self.over:  # the usual case: no look at the connection per message
            return False
        entry = self.conns.get(route)
        if entry is None or self._behind(route, entry) + LOOK_EVERY <= self.limit:
            self.over.discard(route)  # it caught up (or is gone): room for answers again
            return False
        return True

    def may_send(self, route: bytes, size: int) -> bool:
        entry = self.conns.get(route)
        if entry is None:
            return True
        entry[0] += size
        if entry[0] < LOOK_EVERY:
            entry[1] += size
            return True
        entry[0] = 0
        if self._behind(route, entry) + size > self.limit:
            self.over.add(route)
            return False  # not handed over: not counted
        entry[1] += size
        return True

    def _behind(self, route: bytes, entry: list[int]) -> int:
        acked = _tcp_info(self.fds.get(route, -1), _TCPI_BYTES_ACKED)
        if acked is None:  # the connection is gone (or its descriptor was reused)
            self.conns.pop(route, None)
            self.over.discard(route)
            return 0
        return entry[1] - (acked - entry[2])


def bytes_received(fd: int) -> int | None:
    """tcpi_bytes_received of a TCP connection (Linux), None if it is gone or not TCP."""
    return _tcp_info(fd, _TCPI_BYTES_RECEIVED)


def _tcp_info(fd: int, offset: int) -> int | None:
    """One unsigned 64-bit field of a TCP connection's tcp_info (Linux), None if it is
    gone or not TCP (ipc, inproc)."""
    if fd < 0:
        return None
    try:
        sock = socket.socket(fileno=fd)
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        finally:
            sock.detach()
    except OSError:
        return None
    return struct.unpack_from("Q", info, offset)[0] if len(info) >= offset + 8 else None
