"""Every message of the mesh, as data: one envelope, one encode, one decode.

A message is one ZeroMQ frame (plus the routing id a ROUTER adds) holding a msgpack
array of eight fields:

    [version, kind, id, target, sender, ttl_ms, body, meta]

    version  int   PROTOCOL_VERSION; anything else is refused
    kind     int   one of Kind below
    id       str   request id (1..128 bytes of UTF-8) or nil; replies carry the id they answer
    target   str   agent name, 1..200 bytes (or nil where the kind needs none)
    sender   str   who the peer says it is, up to 200 bytes: a claim, never trusted
                   (the node takes the peer's authenticated identity from CURVE)
    ttl_ms   int   how long the sender will wait, relative, or nil
    body     any   the payload; its shape is checked per kind below
    meta     map   small optional flags (str keys) or nil

Requests travel DEALER -> ROUTER; responses (REPLY, ERROR, CHUNK) travel back the
same way. Decoding checks the frame size, msgpack itself, then every field and the
body shape of the kind: decoding is not validation, so `decode` does both. A frame
that fails raises ProtocolError (with the request id when it could be read), and the
node answers with an ERROR and counts it; it never reaches an agent.
See docs/protocol.md for the kinds and their bodies.
"""

from __future__ import annotations

import hashlib
import re
from enum import IntEnum
from typing import Any, Callable

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128      # request ids: limits in bytes of UTF-8, which is what a store key holds
MAX_NAME_CHARS = 200
MAX_SENDER_CHARS = 200
MAX_ID_BYTES, MAX_NAME_BYTES, MAX_SENDER_BYTES = MAX_ID_CHARS, MAX_NAME_CHARS, MAX_SENDER_CHARS
MAX_ELEMENTS = 100_000  # entries of one array or map, for peers that are not mesh nodes
MAX_TTL_MS = 24 * 3600 * 1000
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MAX_BATCH = 4096

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/+=-]*\Z")


class Kind(IntEnum):
    CALL = 1        # id, target, ttl_ms; body: the request
    CAST = 2        # target; body: the message; no reply
    REPLY = 3       # id; body: the reply
    ERROR = 4       # id or nil; body: [type, message, data]
    CHUNK = 5       # id; body: one piece of a streamed reply
    INFO = 6        # target; body: delivered to handle_info
    BATCH = 7       # body: up to MAX_BATCH envelopes (not batches) sent in one loop turn
    SPAWN = 10      # id; body: {name, kind, args?, restart?, supervisor?, group?}
    STOP = 11       # id, target: the agent to stop
    STATUS = 12     # id; body: nil -> cluster status (from the supervisor)
    WHEREIS = 13    # id, target; body: {after?: incarnation, wait_ms?: int}
    UPGRADE = 14    # id; body: {kind, to?, extra?, rollback?, check?} -> this node's agents of kind on new code
    DRAIN = 15      # id; body: {node, undrain?} -> (the supervisor) its agents moved off, no placements there
    RESTART = 16    # id; body: nil -> (a drained node) {node, pid}; it stops, its launcher starts a new interpreter
    INSPECT = 17    # id, target; body: {max_bytes?} -> the agent as its node sees it (mesh inspect)
    TRACE = 18      # id, target; body: {for_ms?, max_body?} -> CHUNKs: the agent's events, then {ended, ...}
    HELLO = 20      # id; node -> supervisor: {node, boot, pid, agents (its inventory), previous?, drops?, store_full?}
    HEARTBEAT = 21  # id; node -> supervisor: lease renewal {node, boot, seq, health, store_full?} -> {known}
    START = 22      # id, target; supervisor -> node: {kind, args, incarnation}
    TERMINATE = 23  # id, target; supervisor -> node: {incarnation, reason, forget}
    EXIT = 24       # node -> supervisor: {name, incarnation, reason, how}
    REGISTRY = 25   # supervisor -> node: {seq, updates} or {seq, snapshot, last}; failed: why the tree gave up
    GOODBYE = 26    # id; node -> supervisor: {node, boot}
    INVENTORY = 27  # id; supervisor -> node: -> its agents and counters
    REPLICATE = 28  # id; node -> node on a replica host: {puts, claims, deletes} -> {fenced}
    FETCH = 29      # id, target, {incarnation}; node -> node: -> {record, replies}, read under a fence


RESPONSES = frozenset({Kind.REPLY, Kind.ERROR, Kind.CHUNK})
_KINDS = {int(k): k for k in Kind}


class Msg:
    """One decoded, validated message."""

    __slots__ = ("kind", "id", "target", "sender", "ttl_ms", "body", "meta")

    def __init__(self, kind, id=None, target=None, sender=None, ttl_ms=None, body=None, meta=None):
        self.kind, self.id, self.target, self.sender = kind, id, target, sender
        self.ttl_ms, self.body, self.meta = ttl_ms, body, meta

    def __repr__(self) -> str:
        return f"Msg({self.kind.name}, id={self.id!r}, target={self.target!r}, body={self.body!r:.80})"


def encode(kind: Kind, id=None, target=None, sender=None, ttl_ms=None, body=None, meta=None) -> bytes:
    """Pack one message. Raises TypeError when body holds something msgpack cannot carry."""
    return msgpack.packb([PROTOCOL_VERSION, int(kind), id, target, sender, ttl_ms, body, meta])


def encode_msg(m: Msg) -> bytes:
    return encode(m.kind, m.id, m.target, m.sender, m.ttl_ms, m.body, m.meta)


def reply(id: str, body: Any, sender: str | None = None) -> bytes:
    return encode(Kind.REPLY, id, None, sender, None, body)


def error(id: str | None, err: list, sender: str | None = None) -> bytes:
    return encode(Kind.ERROR, id, None, sender, None, err)


# A *response* is a packed reply or error body behind one tag byte. Agents record
# responses in their window and answer a repeated request id from the record, so the
# reply value is packed once and never again.
REPLY_TAG, ERROR_TAG = b"R", b"E"
_NIL = b"\xc0"
_BATCH_HEAD = b"\x98" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb(7) + _NIL * 4


def response_frame(id: str, response: bytes) -> bytes:
    """The frame answering `id` with a tagged, packed response."""
    kind = Kind.REPLY if response[:1] == REPLY_TAG else Kind.ERROR
    return b"".join((b"\x98", msgpack.packb(PROTOCOL_VERSION), msgpack.packb(int(kind)),
                     msgpack.packb(id), _NIL, _NIL, _NIL, memoryview(response)[1:], _NIL))


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


# msgpack decodes its timestamp extension (type -1) itself, without asking ext_hook. Its
# three encodings begin with these bytes; only a frame holding one of them is searched.
_TIMESTAMP_HEAD = re.compile(rb"[\xd6\xd7]\xff|\xc7\x0c\xff", re.DOTALL)


def _holds_ext(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        t = type(item)
        if t is list:
            stack.extend(item)
        elif t is dict:
            stack.extend(item.values())
        elif t is msgpack.Timestamp:
            return True
    return False


def decode(frame: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_elements: int | None = None) -> Msg:
    """Decode and validate one frame; raise ProtocolError naming what is wrong.

    `max_elements` bounds the entries of any one array or map (decoding time grows with
    them, not only with bytes: a million-key map takes a second). A BATCH comes back with
    `body` a list holding, per element, its Msg or the ProtocolError that element earned
    (one bad element does not spoil the others)."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    bound = {} if max_elements is None else {"max_array_len": max_elements, "max_map_len": max_elements}
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_reject_ext, **bound)
    except Exception as exc:  # msgpack raises several types for bad bytes; all mean the same
        raise ProtocolError(f"not a msgpack message: {type(exc).__name__}: {exc}"[:300]) from None
    if _TIMESTAMP_HEAD.search(frame) is not None and _holds_ext(obj):
        raise ProtocolError("msgpack extension type -1 (timestamp) is not allowed")
    msg = _envelope(obj)
    if msg.kind == Kind.BATCH:
        msg.body = [_element(e) for e in msg.body]
    return msg


def _element(obj: Any) -> "Msg | ProtocolError":
    try:
        msg = _envelope(obj)
    except ProtocolError as exc:
        return exc
    if msg.kind == Kind.BATCH:
        return ProtocolError("a batch cannot hold a batch")
    return msg


def _envelope(obj: Any) -> Msg:
    if type(obj) is not list or len(obj) != 8:
        raise ProtocolError("not a mesh envelope (expected an array of 8 fields)")
    version, kind, rid, target, sender, ttl, body, meta = obj
    if rid is not None and not (type(rid) is str and fits(rid, MAX_ID_BYTES)):
        raise ProtocolError(f"request id must be a string of 1..{MAX_ID_BYTES} bytes")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (this node speaks {PROTOCOL_VERSION})", rid)
    k = _KINDS.get(kind) if type(kind) is int else None
    if k is None:
        raise ProtocolError(f"unknown message kind {kind!r}", rid)
    if sender is not None and not (type(sender) is str and (not sender or fits(sender, MAX_SENDER_BYTES))):
        raise ProtocolError("sender must be a short string", rid)
    if ttl is not None and not (type(ttl) is int and 0 <= ttl <= MAX_TTL_MS):
        raise ProtocolError(f"ttl_ms must be an integer in 0..{MAX_TTL_MS}", rid)
    if meta is not None and type(meta) is not dict:
        raise ProtocolError("meta must be a map or nil", rid)
    needs_id, needs_target, check = _SPECS[k]
    if needs_id and rid is None:
        raise ProtocolError(f"{k.name} needs a request id")
    if needs_target:
        # a target is only looked up, never stored, so type and length are all it needs;
        # names are checked in full where they are created (SPAWN)
        if type(target) is not str or not fits(target, MAX_NAME_BYTES):
            raise ProtocolError(f"{k.name} needs a target name of 1..{MAX_NAME_BYTES} bytes", rid)
    elif target is not None and type(target) is not str:
        raise ProtocolError("target must be a string or nil", rid)
    if check is not None:
        problem = check(body)
        if problem:
            raise ProtocolError(f"{k.name}: {problem}", rid)
    return Msg(k, rid, target, sender, ttl, body, meta)


def batch_frame(frames: list[bytes]) -> bytes:
    """One BATCH frame carrying already-encoded envelopes, without packing them again."""
    n = len(frames)
    header = bytes((0xdc, n >> 8, n & 0xff)) if n > 15 else bytes((0x90 | n,))
    return b"".join((_BATCH_HEAD, header, *frames, _NIL))


def digest(body: Any) -> bytes:
    """A short fingerprint of a request's body: a repeated request id must ask the same."""
    return hashlib.blake2b(msgpack.packb(body), digest_size=12).digest()


def fits(text: str, max_bytes: int) -> bool:
    """1..max_bytes bytes of UTF-8 (ASCII, the usual case, is checked without encoding)."""
    n = len(text)
    if n == 0 or n > max_bytes:
        return False
    return text.isascii() or len(text.encode("utf-8", "surrogatepass")) <= max_bytes


def valid_name(name: Any) -> bool:
    return type(name) is str and 0 < len(name) <= MAX_NAME_CHARS and NAME_RE.match(name) is not None


# --- body checks: each returns None when fine, else what is wrong -----------------------

def _fields(required: dict[str, type | tuple], optional: dict[str, type | tuple] | None = None):
    optional = optional or {}
    allowed = required.keys() | optional.keys()

    def check(body: Any) -> str | None:
        if type(body) is not dict:
            return "body must be a map"
        for key, typ in required.items():
            if key not in body:
                return f"body lacks {key!r}"
            if not _is(body[key], typ):
                return f"{key!r} has the wrong type"
        for key, value in body.items():
            if key not in allowed:
                return f"unknown field {key!r}"
            if key in optional and value is not None and not _is(value, optional[key]):
                return f"{key!r} has the wrong type"
        return None

    return check


def _is(value: Any, typ: type | tuple) -> bool:
    # bool is an int in Python; a field typed int must not accept True.
    if typ is int or typ == (int,):
        return type(value) is int
    return isinstance(value, typ)


def _error_body(body: Any) -> str | None:
    if not (type(body) is list and len(body) == 3 and type(body[0]) is str and type(body[1]) is str):
        return "body must be [type, message, data]"
    if body[2] is not None and type(body[2]) is not dict:
        return "error data must be a map or nil"
    return None


def _spawn_body(body: Any) -> str | None:
    problem = _fields(
        {"name": str, "kind": str},
        {"args": dict, "restart": str, "supervisor": str, "group": str},
    )(body)
    if problem:
        return problem
    if not valid_name(body["name"]):
        return f"invalid agent name {body['name']!r:.80}"
    if body.get("group") is not None and not valid_name(body["group"]):
        return f"invalid group name {body['group']!r:.80}"
    if body.get("restart") not in (None, "permanent", "transient", "temporary"):
        return "restart must be permanent, transient or temporary"
    return None


def _upgrade_body(body: Any) -> str | None:
    problem = _fields({"kind": str}, {"to": str, "extra": object, "rollback": bool, "check": bool})(body)
    if problem:
        return problem
    to = body.get("to")
    if to is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", to):
        return f"to must be MODULE:CLASS, not {to!r:.80}"
    return None


# STATUS: nil (every agent listed) or a view: counts only, agents filtered and paged, or
# a group's members
_status_body = _fields({}, {"agents": bool, "name": str, "kind": str, "node": str, "status": str, "limit": int,
                            "after": str, "group": str, "top": int})
_inventory_body = _fields({}, {"summary": bool, "top": int})  # summary: counts, not agents; top: the n busiest
_inspect_body = _fields({}, {"max_bytes": int})
_trace_body = _fields({}, {"for_ms": int, "max_body": int})


_SPECS: dict[Kind, tuple[bool, bool, Callable[[Any], str | None] | None]] = {
    Kind.CALL: (True, True, None),
    Kind.CAST: (False, True, None),
    Kind.REPLY: (True, False, None),
    Kind.ERROR: (False, False, _error_body),
    Kind.CHUNK: (True, False, None),
    Kind.INFO: (False, True, None),
    Kind.BATCH: (False, False, lambda b: None if type(b) is list and 0 < len(b) <= MAX_BATCH
                 else f"body must be a list of 1..{MAX_BATCH} envelopes"),
    Kind.SPAWN: (True, False, _spawn_body),
    Kind.STOP: (True, True, lambda body: None if body is None else _fields({}, {"incarnation": int})(body)),
    Kind.STATUS: (True, False, lambda body: None if body is None else _status_body(body)),
    Kind.WHEREIS: (True, True, _fields({}, {"after": int, "wait_ms": int})),
    Kind.UPGRADE: (True, False, _upgrade_body),
    Kind.DRAIN: (True, False, _fields({"node": str}, {"undrain": bool})),
    Kind.RESTART: (True, False, None),
    Kind.INSPECT: (True, True, lambda body: None if body is None else _inspect_body(body)),
    Kind.TRACE: (True, True, lambda body: None if body is None else _trace_body(body)),
    Kind.HELLO: (True, False, _fields(
        {"node": str, "boot": str, "pid": int, "agents": list},
        {"previous": dict, "address": str, "drops": int, "store_full": bool, "registry": list},
    )),
    Kind.HEARTBEAT: (True, False, _fields({"node": str, "boot": str, "seq": int},
                                          {"agents": int, "mailbox": int, "store_full": bool})),
    Kind.START: (True, True, _fields(
        {"kind": str, "incarnation": int},
        {"args": dict, "supervisor": str, "replicas": list, "sources": list, "since": int, "fresh": bool},
    )),
    Kind.TERMINATE: (True, True, _fields({"incarnation": int}, {"reason": str, "forget": bool, "replicas": list})),
    Kind.EXIT: (False, False, _fields(
        {"name": str, "incarnation": int, "how": str},
        {"reason": str, "node": str},
    )),
    Kind.REGISTRY: (False, False, _fields(
        {"seq": int},
        {"updates": list, "snapshot": list, "last": bool, "epoch": str, "failed": str, "since": int},
    )),
    Kind.GOODBYE: (True, False, _fields({"node": str, "boot": str})),
    Kind.INVENTORY: (True, False, lambda body: None if body is None else _inventory_body(body)),
    Kind.REPLICATE: (True, False, _fields({}, {"puts": list, "claims": list, "deletes": list, "replies": list,
                                               "forgotten": list})),
    Kind.FETCH: (True, True, _fields({"incarnation": int})),
}
