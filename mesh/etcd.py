"""A small asyncio client for etcd's v3 JSON gateway, spoken with httpx.

etcd is the mesh's consensus engine (G8): who leads the supervision, the supervisor's
records, and every node's lease live there. The gateway needs nothing but HTTP, and
httpx is already a dependency; what it costs per request (a few ms of CPU) is kept
small by batching many writes into one transaction (`txn`), which is what the
supervisor does.

What the gateway does that surprises (checked against etcd 3.4 and 3.5):
  * keys and values are base64, int64s come back as JSON strings, absent fields mean 0;
  * a write whose answer is lost may have been applied: `EtcdUnavailable.unknown` says
    so, and every write the mesh makes is safe to repeat (compare-and-swap on revisions);
  * a quiet watch must not have a read timeout, and a member's death ends its stream, but
    a member cut off ends nothing: `watch` asks a silent stream's member for a read, and
    resumes on the next endpoint from the next revision when the stream ends or that
    read goes unanswered.

Keys are text (the mesh's own names), values bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

import httpx

from .errors import MeshError

log = logging.getLogger("mesh.etcd")

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class EtcdError(MeshError):
    """etcd answered, and said no (`code` is its gRPC code, 0 when it gave none)."""

    def __init__(self, reason: str, code: int = 0):
        self.code = code
        super().__init__(reason)


class EtcdUnavailable(EtcdError):
    """No member answered in time. `unknown`: a write was sent and may have been applied."""

    def __init__(self, reason: str, unknown: bool = False):
        self.unknown = unknown
        super().__init__(reason, 14)


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away; `revision` is the oldest left."""

    def __init__(self, revision: int):
        self.revision = revision
        super().__init__(f"revision compacted; the oldest left is {revision}", 11)


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str         # "put" or "delete"
    kv: KV            # for a delete: the key and the revision of its deletion
    prev: KV | None   # the value before (a delete's last value)


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict] = field(default_factory=list)

    def kvs(self, index: int) -> list[KV]:
        """The keys a range at `index` of the branch that ran found."""
        return [_kv(d) for d in self.responses[index].get("response_range", {}).get("kvs", [])]


# --- encoding ---------------------------------------------------------------------------------

def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


def _kv(d: dict) -> KV:
    return KV(_unb64(d.get("key")).decode(errors="replace"), _unb64(d.get("value")),
              int(d.get("create_revision", 0)), int(d.get("mod_revision", 0)),
              int(d.get("version", 0)), int(d.get("lease", 0)))


def _range_body(key: str, prefix: bool) -> dict:
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(prefix_end(key))
    return body


# --- operations and comparisons for txn ---------------------------------------------------------

def put_op(key: str, value: bytes, lease: int = 0) -> dict:
    body = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def delete_op(key: str, prefix: bool = False) -> dict:
    return {"request_delete_range": _range_body(key, prefix)}


def range_op(key: str, prefix: bool = False) -> dict:
    return {"request_range": _range_body(key, prefix)}


def created_at(key: str, revision: int) -> dict:
    """Holds while `key` exists and was created at `revision` (0: while it is absent)."""
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}


def absent(key: str) -> dict:
    return created_at(key, 0)


def modified_at(key: str, revision: int) -> dict:
    """Holds while `key` was last written at `revision` (0: while it is absent)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


# --- the client ---------------------------------------------------------------------------------

class Etcd:
    """One connection pool to an etcd cluster; tries the endpoints in turn.

    `timeout_s` bounds each request (a write that times out raises EtcdUnavailable with
    `unknown` set). `tls` is an ssl.SSLContext for https endpoints (client certificates).
    """

    def __init__(self, endpoints: Iterable[str], timeout_s: float = 1.0, tls: ssl.SSLContext | None = None):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        if not self.endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.timeout_s = timeout_s
        self._at = 0  # the endpoint that answered last
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), verify=tls if tls else True,
                                       limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))

    async def close(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict, write: bool, timeout_s: float | None = None) -> dict:
        """POST to one endpoint after another until one answers; raise what etcd said.

        A write that reached a member and got no clear answer is not sent again
        (EtcdUnavailable with `unknown`): the caller knows whether a repeat is safe.
        The next request starts at the member after the one that failed.
        """
        last: Exception | None = None
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        for i in range(len(self.endpoints)):
            at = (self._at + i) % len(self.endpoints)
            try:
                reply = await self._http.post(self.endpoints[at] + path, content=json.dumps(body), timeout=timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc  # never reached it: the next endpoint may take it
                continue
            except httpx.HTTPError as exc:
                self._at = at + 1
                if write:
                    raise EtcdUnavailable(f"etcd at {self.endpoints[at]} did not answer {path}: {exc!r}",
                                          unknown=True) from None
                last = exc
                continue
            data = _json(reply)
            if reply.status_code == 200 and "error" not in data:
                self._at = at
                return data
            code = int(data.get("code", 0) or 0)
            message = str(data.get("message") or data.get("error") or f"HTTP {reply.status_code}")
            if code == 14 or reply.status_code == 503:  # no leader, or it just changed: perhaps applied
                self._at = at + 1
                if write:
                    raise EtcdUnavailable(f"etcd at {self.endpoints[at]}: {message}", unknown=True)
                last = EtcdError(message, code)
                continue
            raise EtcdError(message, code)
        self._at += 1
        raise EtcdUnavailable(f"no etcd member answered {path}: {last}")

    # --- keys ---

    async def get(self, key: str) -> KV | None:
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def range(self, key: str, prefix: bool = False) -> tuple[list[KV], int]:
        """The keys at `key` (or under it), and the revision they were read at."""
        data = await self._post("/v3/kv/range", _range_body(key, prefix), write=False)
        return [_kv(d) for d in data.get("kvs", [])], int(data.get("header", {}).get("revision", 0))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        data = await self._post("/v3/kv/put", put_op(key, value, lease)["request_put"], write=True)
        return int(data.get("header", {}).get("revision", 0))

    async def delete(self, key: str, prefix: bool = False) -> int:
        data = await self._post("/v3/kv/deleterange", _range_body(key, prefix), write=True)
        return int(data.get("header", {}).get("revision", 0))

    async def txn(self, compare: list[dict], success: list[dict], failure: list[dict] = ()) -> TxnResult:
        if len(success) > MAX_TXN_OPS or len(failure) > MAX_TXN_OPS:
            raise ValueError(f"a transaction holds at most {MAX_TXN_OPS} operations per branch")
        data = await self._post("/v3/kv/txn", {"compare": compare, "success": success, "failure": list(failure)},
                                write=True)
        return TxnResult(bool(data.get("succeeded", False)), int(data.get("header", {}).get("revision", 0)),
                         data.get("responses", []))

    # --- leases ---

    async def grant(self, ttl_s: int) -> int:
        data = await self._post("/v3/lease/grant", {"TTL": int(ttl_s)}, write=True)
        return int(data["ID"])

    async def keepalive(self, lease: int, timeout_s: float | None = None) -> int:
        """Renew `lease`; its TTL in seconds from now, 0 when it is gone (expired or revoked)."""
        data = await self._post("/v3/lease/keepalive", {"ID": str(lease)}, write=True, timeout_s=timeout_s)
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)}, write=True)
        except EtcdError as exc:
            if exc.code != 5:  # not found: already gone
                raise

    # --- watching ---

    async def watch(self, key: str, prefix: bool = False, start_revision: int = 0) -> AsyncIterator[list[Event]]:
        """Yield the events at `key` (or under it) from `start_revision` on, batch by batch.

        Resumes on another endpoint from the revision after the last one seen when a
        stream ends, or when it has been silent for `timeout_s` and its member does not
        answer a read either (a member cut off sends nothing, not even an end: without
        that check the stream would wait for ever). Raises Compacted when the revision
        asked for is gone, and EtcdUnavailable when no member answers.
        """
        next_rev = start_revision
        failures = 0
        while True:
            at = self._at % len(self.endpoints)
            stream = self._stream(at, key, prefix, next_rev)
            pending: asyncio.Future | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(stream.__anext__())
                    done, _ = await asyncio.wait({pending}, timeout=self.timeout_s)
                    if not done:
                        if await self._answers(at, key, prefix):
                            continue  # a quiet key, not a silent member
                        log.debug("etcd watch on %s: the member is silent", self.endpoints[at])
                        break
                    try:
                        events = pending.result()
                    except StopAsyncIteration:
                        break
                    finally:
                        pending = None
                    failures = 0
                    if events:
                        next_rev = events[-1].kv.mod_revision + 1
                        yield events
            except httpx.HTTPError as exc:
                log.debug("etcd watch on %s ended: %s", self.endpoints[at], exc)
            finally:
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
                await stream.aclose()
            failures += 1
            self._at = at + 1
            if failures >= 2 * len(self.endpoints):
                raise EtcdUnavailable(f"no etcd member keeps a watch on {key!r}")
            await asyncio.sleep(min(0.5, 0.02 * 2 ** failures))

    async def _stream(self, at: int, key: str, prefix: bool, start_revision: int) -> AsyncIterator[list[Event]]:
        """One watch stream from endpoint `at`: each result's events (an empty list for a
        result without any), until the stream ends."""
        request = {"create_request": {**_range_body(key, prefix), "prev_kv": True}}
        if start_revision:
            request["create_request"]["start_revision"] = str(start_revision)
        async with self._http.stream("POST", self.endpoints[at] + "/v3/watch", content=json.dumps(request),
                                     timeout=httpx.Timeout(self.timeout_s, read=None)) as reply:
            if reply.status_code != 200:
                raise EtcdError(f"watch refused: HTTP {reply.status_code}")
            async for line in reply.aiter_lines():
                data = _json_text(line)
                if "error" in data:  # the stream broke inside its 200: resume elsewhere
                    log.debug("etcd watch on %s: %s", self.endpoints[at], data["error"])
                    return
                result = data.get("result")
                if result is None:
                    continue
                if result.get("canceled"):
                    compact = int(result.get("compact_revision", 0))
                    if compact:
                        raise Compacted(compact)
                    raise EtcdError(f"watch canceled: {result.get('cancel_reason', '')}")
                yield [Event("delete" if e.get("type") == "DELETE" else "put", _kv(e.get("kv", {})),
                             _kv(e["prev_kv"]) if e.get("prev_kv") else None)
                       for e in result.get("events", [])]

    async def _answers(self, at: int, key: str, prefix: bool) -> bool:
        """Whether endpoint `at` answers a linearizable read within the timeout (it can
        reach its cluster's majority, so a watch there would hear of changes)."""
        try:
            reply = await self._http.post(self.endpoints[at] + "/v3/kv/range",
                                          content=json.dumps({**_range_body(key, prefix), "count_only": True}))
        except httpx.HTTPError:
            return False
        try:
            return reply.status_code == 200 and "error" not in _json(reply)
        except EtcdError:
            return False


def _json(reply: httpx.Response) -> dict:
    return _json_text(reply.text)


def _json_text(text: str) -> dict:
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        raise EtcdError(f"etcd answered something that is not JSON: {text[:80]!r}") from None
    return data if isinstance(data, dict) else {}
