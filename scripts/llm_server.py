#!/usr/bin/env python3
"""A stand-in for an OpenAI-compatible model server, on loopback, for tests and the demo.

    python3 scripts/llm_server.py --port 8700            # then point [llm] base_url at it
    python3 scripts/llm_server.py --port 0 --latency-ms 50 --error-rate 0.1 --seed 7

Endpoints: POST /v1/chat/completions (also streamed, as server-sent events),
POST /v1/embeddings, GET /v1/models; and for tests GET /stats and POST /admin/faults.

Replies are deterministic and show that the conversation was remembered: the server
reads every user message it is sent and answers from facts stated in earlier turns
("my name is Ada" ... "what is my name?" -> "Your name is Ada."), and otherwise
reports the turn number and the first thing the user said. Embeddings are unit vectors
derived from a hash of the text.

Faults, from flags or switched at run time with POST /admin/faults {...}:
  latency_ms        added before every answer (and between streamed pieces)
  hang_next N       the next N requests hang until the client goes away
  status_next N     the next N requests fail with `status` (default 500)
  status            the status those get; 429 comes with Retry-After: retry_after
  error_rate R      that share of requests fails with 500 (seeded, repeatable)
  drop_next N       the next N requests get their connection closed without an answer
  garbage_next N    the next N requests get a 200 whose body is not JSON
  cut_next N        the next N streamed replies stop after their first piece
  stream_error_next N  the next N streamed replies send their first piece, then an
                    error event (`data: {"error": {...}}`, as vLLM and OpenAI do)
  echo_auth 1       error bodies echo the request's Authorization header (as some
                    proxies do), to show that a client keeps its key out of errors

Chat honours `max_tokens` (a longer answer is cut, finish_reason "length"), and
`tools`: when the user's last message names a tool, the answer is a tool call
(content null, the tool's parameters filled in order from the numbers in the message);
after a tool's result, the answer repeats it ("The tool said: ...").
It prints "listening on http://HOST:PORT/v1" once it accepts connections.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HANG_LIMIT_S = 300.0
EMBED_DIM = 16


class Faults:
    def __init__(self, seed: int = 0, **settings):
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.latency_ms = 0
        self.hang_next = self.status_next = self.drop_next = self.garbage_next = self.cut_next = 0
        self.stream_error_next = self.echo_auth = 0
        self.status, self.retry_after, self.error_rate = 500, 1, 0.0
        self.update(settings)

    def update(self, settings: dict) -> None:
        with self.lock:
            for key, value in settings.items():
                if key not in ("latency_ms", "hang_next", "status_next", "drop_next", "garbage_next",
                               "cut_next", "status", "retry_after", "error_rate", "stream_error_next",
                               "echo_auth"):
                    raise ValueError(f"unknown fault {key!r}")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"fault {key!r} must be a non-negative number")
                setattr(self, key, value)

    def cut(self) -> bool:
        """Whether the next streamed reply is cut after its first piece."""
        return self.take("cut_next")

    def take(self, key: str) -> bool:
        """Whether a counted fault (`key`, e.g. "cut_next") applies now; counts it down."""
        with self.lock:
            if getattr(self, key):
                setattr(self, key, getattr(self, key) - 1)
                return True
        return False

    def draw(self) -> str | None:
        """The fault for the next request: 'hang', 'drop', 'status', 'garbage', or None."""
        with self.lock:
            for kind in ("hang", "drop", "status", "garbage"):
                left = getattr(self, f"{kind}_next")
                if left:
                    setattr(self, f"{kind}_next", left - 1)
                    return kind
            if self.error_rate and self.rng.random() < self.error_rate:
                return "error"
        return None


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.active = self.max_active = 0
        self.embedding_batches: list[int] = []
        self.connections: set = set()
        self.max_connections = 0

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def snapshot(self) -> dict:
        with self.lock:
            return {"counts": dict(self.counts), "active": self.active, "max_active": self.max_active,
                    "embedding_batches": list(self.embedding_batches),
                    "max_connections": self.max_connections, "connections": len(self.connections)}


# --- what the stand-in says --------------------------------------------------------------

FACTS = [
    (re.compile(r"\bmy name is ([\w' -]+?)[.!]?$", re.I), "name"),
    (re.compile(r"\bi (?:like|love) ([\w' -]+?)[.!]?$", re.I), "likes"),
    (re.compile(r"\bremember (?:that )?([\w' -]+?)[.!]?$", re.I), "notes"),
]


def answer(messages: list[dict]) -> str:
    if messages and messages[-1].get("role") == "tool":
        return f"The tool said: {messages[-1].get('content')}."
    said = [m.get("content", "") for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not said:
        return "Hello. What would you like to talk about?"
    facts: dict[str, list[str]] = {"name": [], "likes": [], "notes": []}
    for text in said[:-1]:
        for rx, key in FACTS:
            m = rx.search(text.strip())
            if m:
                facts[key].append(m.group(1).strip())
    last = said[-1].lower()
    if "what is my name" in last or "who am i" in last:
        return f"Your name is {facts['name'][-1]}." if facts["name"] else "You have not told me your name."
    if "what do i like" in last:
        return f"You like {' and '.join(facts['likes'])}." if facts["likes"] else "You have not told me what you like."
    if "remember" in last and "what" in last:
        return f"You asked me to remember: {'; '.join(facts['notes'])}." if facts["notes"] else "Nothing yet."
    return f"Noted. This is turn {len(said)} of our conversation; you first said: {said[0]!r}."


def tool_calls(messages: list[dict], tools) -> list[dict]:
    """The tool calls the stand-in answers with: one, when the user's last message names
    an offered tool; its parameters are filled in order from the numbers in that message."""
    if not isinstance(tools, list) or not messages or messages[-1].get("role") != "user":
        return []
    said = str(messages[-1].get("content", ""))
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and re.search(rf"\b{re.escape(name)}\b", said):
            params = list(((fn.get("parameters") or {}).get("properties") or {}))
            numbers = [float(n) if "." in n else int(n) for n in re.findall(r"-?\d+(?:\.\d+)?", said)]
            args = dict(zip(params, numbers))
            turn = sum(1 for m in messages if m.get("role") == "user")
            return [{"id": f"call_{turn}_{name}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args)}}]
    return []


def embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:EMBED_DIM]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def words(messages: list[dict]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages)


# --- HTTP --------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in separate writes: with Nagle's algorithm on, the body
    # waited for the client's delayed ACK (40 ms on Linux) on every kept-alive request
    disable_nagle_algorithm = True
    server_version = "mesh-stand-in/1"

    def log_message(self, fmt, *args):  # quiet: tests read /stats instead
        pass

    def setup(self):
        super().setup()
        stats = self.server.stats
        with stats.lock:
            stats.connections.add(id(self))
            stats.max_connections = max(stats.max_connections, len(stats.connections))

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.stats.lock:
                self.server.stats.connections.discard(id(self))

    # routing

    def do_GET(self):
        if self.path == "/stats":
            self._json(200, self.server.stats.snapshot())
        elif self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        stats = self.server.stats
        body = self._body()
        if body is None:
            return
        if self.path == "/admin/faults":
            try:
                self.server.faults.update(body)
            except ValueError as exc:
                return self._json(400, {"error": {"message": str(exc)}})
            return self._json(200, {"ok": True})
        route = {"/v1/chat/completions": self._chat, "/v1/embeddings": self._embeddings}.get(self.path)
        if route is None:
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        stats.add("requests")
        with stats.lock:
            stats.active += 1
            stats.max_active = max(stats.max_active, stats.active)
        try:
            if self._fault():
                return
            route(body)
        finally:
            with stats.lock:
                stats.active -= 1

    def _body(self) -> dict | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
            data = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return data
        except (ValueError, json.JSONDecodeError) as exc:
            self._json(400, {"error": {"message": f"bad request body: {exc}"}})
            return None

    def _fault(self) -> bool:
        """Apply the next fault, if any; True when the request is answered by it."""
        faults, stats = self.server.faults, self.server.stats
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        kind = faults.draw()
        if kind is None:
            return False
        stats.add(f"fault_{kind}")
        if kind == "hang":
            if self._wait_for_client_to_leave():
                stats.add("cancelled")
            self.close_connection = True
        elif kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif kind == "garbage":
            payload = b"<html>upstream proxy error</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif kind == "status" and faults.status == 429:
            self._json(429, {"error": {"message": "rate limited" + self._echo()}}, {"Retry-After": str(faults.retry_after)})
        else:
            status = faults.status if kind == "status" else 500
            self._json(status, {"error": {"message": "the stand-in failed on purpose" + self._echo()}})
        return True

    def _echo(self) -> str:
        """The request's Authorization header, for an error body, with faults.echo_auth."""
        if not self.server.faults.echo_auth:
            return ""
        return f" (request had Authorization: {self.headers.get('Authorization', '')})"

    def _wait_for_client_to_leave(self) -> bool:
        deadline = time.monotonic() + HANG_LIMIT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.connection], [], [], 1.0)
            if ready and not self.connection.recv(1, socket.MSG_PEEK):
                return True
        return False

    def _chat(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return self._json(400, {"error": {"message": "messages must be a list of objects"}})
        self.server.stats.add("chat")
        calls = tool_calls(messages, body.get("tools"))
        text = "" if calls else answer(messages)
        finish = "tool_calls" if calls else "stop"
        limit = body.get("max_tokens")
        if isinstance(limit, int) and limit > 0 and len(text.split()) > limit:
            text, finish = " ".join(text.split()[:limit]), "length"
        usage = {"prompt_tokens": words(messages), "completion_tokens": len(text.split()) + len(calls)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = body.get("model") or "stand-in"
        if not body.get("stream"):
            message = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = calls
            return self._json(200, {
                "id": "chatcmpl-stand-in", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            })
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if calls:  # streamed as OpenAI does: the name first, then the arguments in pieces
            for i, call in enumerate(calls):
                args = call["function"]["arguments"]
                self._event({"model": model, "choices": [{"index": 0, "delta": {"content": None, "tool_calls": [
                    {"index": i, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}]}, "finish_reason": None}]})
                for j in range(0, len(args), 4):
                    self._event({"model": model, "choices": [{"index": 0, "delta": {"tool_calls": [
                        {"index": i, "function": {"arguments": args[j:j + 4]}}]}, "finish_reason": None}]})
            self._event({"model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
            self._event({"model": model, "choices": [], "usage": usage})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            return
        pieces = re.findall(r"\S+\s*", text)
        if self.server.faults.take("stream_error_next"):
            self.server.stats.add("fault_stream_error")
            self._event({"model": model, "choices": [{"index": 0, "delta": {"content": pieces[0]}, "finish_reason": None}]})
            self._event({"error": {"message": "the stand-in failed mid-stream on purpose" + self._echo(),
                                   "type": "server_error", "code": 500}})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            return
        if self.server.faults.cut():
            self.server.stats.add("fault_cut")
            pieces = pieces[:1]
            self._event({"model": model, "choices": [{"index": 0, "delta": {"content": pieces[0]}, "finish_reason": None}]})
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            for i, piece in enumerate(pieces):
                self._event({"model": model, "choices": [{"index": 0, "delta": {"content": piece},
                                                          "finish_reason": finish if i == len(pieces) - 1 else None}]})
                if self.server.faults.latency_ms:
                    time.sleep(self.server.faults.latency_ms / 1000 / max(1, len(pieces)))
            self._event({"model": model, "choices": [], "usage": usage})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.server.stats.add("cancelled")
            self.close_connection = True

    def _event(self, data: dict) -> None:
        self._chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _embeddings(self, body: dict) -> None:
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self._json(400, {"error": {"message": "input must be a string or a list of strings"}})
        with self.server.stats.lock:
            self.server.stats.embedding_batches.append(len(texts))
        data = [{"object": "embedding", "index": i, "embedding": embedding(t)} for i, t in enumerate(texts)]
        n = sum(len(t.split()) for t in texts)
        self._json(200, {"object": "list", "data": data, "model": body.get("model") or "stand-in-embed",
                         "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
        payload = json.dumps(data).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class StandIn(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, host: str, port: int, faults: Faults):
        super().__init__((host, port), Handler)
        self.faults, self.stats = faults, Stats()

    def handle_error(self, request, client_address):
        """A client that went away mid-request is counted, not printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            self.stats.add("connection_errors")
        else:
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def start(host: str = "127.0.0.1", port: int = 0, **faults) -> StandIn:
    """Start a stand-in on a background thread (for tests in one process); returns it."""
    server = StandIn(host, port, Faults(**faults))
    threading.Thread(target=server.serve_forever, name="llm-stand-in", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8700, help="0 picks a free port")
    p.add_argument("--latency-ms", type=int, default=0)
    p.add_argument("--hang-next", type=int, default=0)
    p.add_argument("--status-next", type=int, default=0)
    p.add_argument("--status", type=int, default=500)
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--drop-next", type=int, default=0)
    p.add_argument("--garbage-next", type=int, default=0)
    p.add_argument("--cut-next", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        faults = Faults(a.seed, latency_ms=a.latency_ms, hang_next=a.hang_next, status_next=a.status_next,
                        status=a.status, retry_after=a.retry_after, error_rate=a.error_rate, drop_next=a.drop_next,
                        garbage_next=a.garbage_next, cut_next=a.cut_next)
        server = StandIn(a.host, a.port, faults)
    except (ValueError, OSError) as exc:
        print(f"llm_server: {exc}", file=sys.stderr)
        return 2
    print(f"listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
