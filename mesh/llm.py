"""An httpx client for OpenAI-compatible model APIs (OpenAI, vLLM, llama.cpp, Ollama).

    result = await agent.llm.chat([{"role": "user", "content": "hi"}], deadline=ctx.deadline)
    vectors = await agent.llm.embed(["a", "b"])

One client per node process and loop, shared by its agents, with a bounded connection
pool: a thousand agents talking at once wait their turn (in order, within their
deadlines) instead of opening a thousand connections. Settings (base URL, model, key) come from the config's [llm]
table or the environment (see config.LLMSettings), never from code.

Failures: connect errors, dropped connections, read timeouts, 429 and 5xx are retried
with exponential backoff and full jitter, honouring Retry-After, within the caller's
deadline; once streamed output has reached the caller nothing is retried. A circuit
breaker per upstream fails fast after repeated failures, so a dead API is not hammered
by every agent, and lets one request through to probe after a pause. The deadline
cancels the upstream request itself (its connection is closed). Every failure becomes
an LLMError with the status and a short reason; httpx's exceptions end here.

Only upstream outcomes move the breaker: a caller whose deadline passes while it waits
for one of this client's own connection slots says nothing about the API. An error
event inside a stream (`data: {"error": ...}`) fails the call, however much text came
before it. The configured key never appears in an error's text or in a log line,
whatever the upstream echoes. A reply with `tool_calls` (and `content: null`) is a
result: ChatResult.tool_calls holds them in the API's own form.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from . import otel
from .clock import Clock
from .config import LLMSettings
from .errors import LLMError

log = logging.getLogger("mesh.llm")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass
class ChatResult:
    """One answer. `finish_reason` is the API's ("stop", "length": cut at max_tokens,
    "tool_calls"); `tool_calls` are in the API's form, ready to go back into messages:
    [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]."""

    text: str
    model: str = ""
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    tool_calls: list = field(default_factory=list)


class Breaker:
    """A circuit breaker: closed, open after `failures` failures in a row, then after
    `reset_s` half-open (one probe); the probe's outcome closes or reopens it."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, failures: int, reset_s: float, clock: Clock):
        self.limit, self.reset_s, self.clock = failures, reset_s, clock
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probe_at: float | None = None

    def allow(self) -> bool:
        now = self.clock.now()
        if self.state == self.OPEN and now - self.opened_at >= self.reset_s:
            self.state, self.probe_at = self.HALF_OPEN, None
        if self.state == self.CLOSED:
            return True
        # half-open: one probe at a time (a probe that never reported is replaced after reset_s)
        if self.state == self.HALF_OPEN and (self.probe_at is None or now - self.probe_at >= self.reset_s):
            self.probe_at = now
            return True
        return False

    def success(self) -> None:
        self.state, self.failures, self.probe_at = self.CLOSED, 0, None

    def failure(self) -> None:
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.limit:
            if self.state != self.OPEN:
                log.warning("model API circuit opened after %d failures", self.failures)
            self.state, self.opened_at, self.probe_at = self.OPEN, self.clock.now(), None

    def retry_in(self) -> float:
        return max(0.0, self.reset_s - (self.clock.now() - self.opened_at))


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random = random._inst) -> float:
    """Full jitter: a uniform pause in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2 ** attempt)))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), if readable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class _Retryable(Exception):
    def __init__(self, err: LLMError, wait: float | None = None, counts: bool = True):
        self.err, self.wait, self.counts = err, wait, counts


class LLMClient:
    def __init__(self, settings: LLMSettings, clock: Clock | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self.clock = clock or Clock()
        key = settings.api_key()
        self._secrets = [k for k in (key,) if k]  # scrubbed from every error text
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                                  write=settings.read_timeout_s, pool=settings.pool_timeout_s),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_keepalive),
            headers={"Authorization": f"Bearer {key}"} if key else None,
            transport=transport,
        )
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_reset_s, self.clock)
        self.usage: Counter = Counter()
        # Callers queue here, not in httpx's pool: its queue costs O(waiting) per event, and a
        # thousand waiting requests there lag the whole loop.
        self._slots = asyncio.Semaphore(settings.max_connections)

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- the API ---------------------------------------------------------------------------

    async def chat(self, messages: list[dict], *, model: str | None = None, deadline: float | None = None,
                   on_delta: Callable[[str], None] | None = None, **params: Any) -> ChatResult:
        """One chat completion. With `on_delta`, the reply is streamed and each piece is
        passed to it as it arrives. `deadline` is on this client's clock (monotonic).
        While tracing (mesh.otel), a span with the model and the tokens used."""
        model = model or self.settings.model
        if otel.tracer is None:
            return await self._chat(messages, model, deadline, on_delta, params)
        span = otel.start(f"chat {model}", kind=otel.kinds().CLIENT,
                          attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": model,
                                      "server.address": self.settings.base_url})
        token = otel.current(span)
        try:
            result = await self._chat(messages, model, deadline, on_delta, params)
        except BaseException as exc:
            otel.end(span, exc)
            raise
        finally:
            otel.restore(token)
        for attribute, key in (("gen_ai.usage.input_tokens", "prompt_tokens"),
                               ("gen_ai.usage.output_tokens", "completion_tokens")):
            if isinstance(result.usage.get(key), int):
                span.set_attribute(attribute, result.usage[key])
        if result.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
        otel.end(span)
        return result

    async def _chat(self, messages: list[dict], model: str, deadline: float | None,
                    on_delta: Callable[[str], None] | None, params: dict) -> ChatResult:
        body = {"model": model, "messages": messages, **params}
        if on_delta is None:
            data = await self._request("chat/completions", body, deadline)
            result = _chat_result(data)
            self._count(data)
            return result
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return await self._with_retries(lambda streamed: self._stream_chat(body, on_delta, streamed), deadline)

    async def embed(self, texts: list[str], *, model: str | None = None, deadline: float | None = None) -> list[list[float]]:
        """Embeddings of `texts`, in order, from one upstream request."""
        body = {"model": model or self.settings.embedding_model, "input": list(texts)}
        data = await self._request("embeddings", body, deadline)
        try:
            items = sorted(data["data"], key=lambda d: d["index"])
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMError(f"malformed embeddings reply: {exc!r}"[:200]) from None
        if len(vectors) != len(texts):
            raise LLMError(f"asked for {len(texts)} embeddings, got {len(vectors)}")
        self._count(data)
        return vectors

    # --- requests, retries and the breaker -------------------------------------------------

    async def _request(self, path: str, body: dict, deadline: float | None) -> dict:
        async def once(streamed):
            try:
                response = await self._http.post(path, json=body)
            except httpx.HTTPError as exc:
                raise _translate(exc, False) from None
            return self._json_or_raise(response)
        return await self._with_retries(once, deadline)

    async def _with_retries(self, attempt_fn, deadline: float | None):
        s = self.settings
        deadline = deadline if deadline is not None else self.clock.now() + s.total_timeout_s
        streamed = [False]  # set once output reached the caller: from then on, no retry
        attempt = 0
        while True:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise LLMError("the caller's deadline passed before the model answered")
            if not self.breaker.allow():
                raise LLMError(f"model API unavailable (circuit open; next try in {self.breaker.retry_in():.1f}s)", status=503)
            sent = False  # whether this attempt got a slot (its outcome is the upstream's)
            try:
                async with asyncio.timeout(remaining):
                    async with self._slots:
                        sent = True
                        self.usage["requests"] += 1
                        result = await attempt_fn(streamed)
            except TimeoutError:
                self.usage["deadline_exceeded"] += 1
                if sent:
                    self.breaker.failure()
                else:  # our own pool was full: the API was never asked
                    self.usage["slot_timeouts"] += 1
                    raise LLMError("the caller's deadline passed while waiting for a free connection "
                                   f"to the model API ({s.max_connections} in use)") from None
                raise LLMError("the caller's deadline passed before the model answered") from None
            except _Retryable as r:
                r.err = self._scrub(r.err)
                if r.counts:
                    self.breaker.failure()
                if streamed[0] or attempt >= s.max_retries:
                    self.usage["failures"] += 1
                    raise r.err from None
                wait = r.wait if r.wait is not None else backoff_s(attempt, s.backoff_base_s, s.backoff_max_s)
                if self.clock.now() + wait >= deadline:
                    self.usage["failures"] += 1
                    raise r.err from None
                attempt += 1
                self.usage["retries"] += 1
                log.info("model API: %s; retry %d in %.2fs", r.err, attempt, wait)
                await asyncio.sleep(wait)
                continue
            except LLMError as err:
                self.usage["failures"] += 1
                if err.status is not None and 400 <= err.status < 500:
                    self.breaker.success()  # it answered: the API is up, the request was wrong
                else:
                    self.breaker.failure()
                raise self._scrub(err) from None
            self.breaker.success()
            return result

    def _scrub(self, err: LLMError) -> LLMError:
        """The error with the configured key cut out of its text (an upstream or a proxy
        may echo the Authorization header in its error body)."""
        text = str(err)
        if not any(k in text for k in self._secrets):
            return err
        for k in self._secrets:
            text = text.replace(k, "[key]")
        return LLMError(text, err.data)

    def _json_or_raise(self, response: httpx.Response) -> dict:
        if response.status_code != 200:
            self._raise_status(response.status_code, response.headers, response.text)
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LLMError(f"model API sent a reply that is not JSON: {response.text[:100]!r}", status=200) from None
        if not isinstance(data, dict):
            raise LLMError("model API sent JSON that is not an object", status=200)
        return data

    def _raise_status(self, status: int, headers, text: str) -> None:
        reason = _error_reason(text) or httpx.codes.get_reason_phrase(status)
        err = LLMError(f"model API answered {status}: {reason}"[:300], status=status)
        if status in RETRY_STATUSES:
            raise _Retryable(err, retry_after_s(headers.get("retry-after")), counts=status != 429)
        raise err

    async def _stream_chat(self, body: dict, on_delta, streamed: list) -> ChatResult:
        pieces: list[str] = []
        calls: dict[int, dict] = {}  # tool calls by index, their arguments joined piece by piece
        result = ChatResult("")
        try:
            async with self._http.stream("POST", "chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._raise_status(response.status_code, response.headers, response.text)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        raise LLMError(f"model API streamed a bad event: {data[:80]!r}") from None
                    if not isinstance(chunk, dict):
                        raise LLMError(f"model API streamed a bad event: {data[:80]!r}")
                    if chunk.get("error") is not None:
                        raise _stream_error(chunk["error"], streamed[0])
                    result.model = chunk.get("model", result.model)
                    if chunk.get("usage"):
                        result.usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            pieces.append(delta["content"])
                            streamed[0] = True
                            on_delta(delta["content"])
                        for part in delta.get("tool_calls") or ():
                            _add_tool_call_part(calls, part)
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
        except httpx.HTTPError as exc:
            raise _translate(exc, streamed[0]) from None
        result.text = "".join(pieces)
        result.tool_calls = [calls[i] for i in sorted(calls)]
        self._count({"usage": result.usage})
        return result

    def _count(self, data: dict) -> None:
        usage = data.get("usage") or {}
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                self.usage[key] += usage[key]


def _chat_result(data: dict) -> ChatResult:
    try:
        choice = data["choices"][0]
        message = choice["message"]
        text, calls = message.get("content"), message.get("tool_calls") or []
        if text is None and calls:
            text = ""  # a tool call: the API sends content null
        if not isinstance(text, str):
            raise TypeError("content is not text")
        if not isinstance(calls, list) or not all(_is_tool_call(c) for c in calls):
            raise TypeError("tool_calls are not a list of function calls")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise LLMError(f"malformed chat reply: {exc!r}"[:200]) from None
    return ChatResult(text, data.get("model", ""), choice.get("finish_reason"), data.get("usage") or {}, calls)


def _is_tool_call(call) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", ""), str)


def _add_tool_call_part(calls: dict[int, dict], part) -> None:
    """Join one streamed piece of a tool call into `calls`: the first piece of an index
    carries its id and name, later ones more of its arguments."""
    if not isinstance(part, dict) or not isinstance(part.get("index", 0), int):
        raise LLMError("model API streamed a malformed tool call")
    call = calls.setdefault(part.get("index", 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    fn = part.get("function") or {}
    if part.get("id"):
        call["id"] = str(part["id"])
    if isinstance(fn.get("name"), str):
        call["function"]["name"] += fn["name"]
    if isinstance(fn.get("arguments"), str):
        call["function"]["arguments"] += fn["arguments"]


def _stream_error(error, streamed: bool) -> Exception:
    """An error event inside a stream: the answer so far is not an answer. Retried like
    an error status while nothing reached the caller (a 4xx code never is)."""
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    err = LLMError(f"model API failed inside its streamed reply: {str(message)[:200]}", status=status)
    if 400 <= status < 500 and status != 429:
        return err
    return _Retryable(err, counts=status != 429)


def _error_reason(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        return str(err.get("message") if isinstance(err, dict) else err)[:200]
    except (json.JSONDecodeError, AttributeError, TypeError):
        return text.strip()[:200]


def _translate(exc: httpx.HTTPError, streamed: bool) -> Exception:
    """httpx's exceptions, as retryable or final LLMErrors."""
    what = {
        httpx.ConnectError: "cannot connect to the model API",
        httpx.ConnectTimeout: "connecting to the model API timed out",
        httpx.ReadTimeout: "the model API went silent",
        httpx.RemoteProtocolError: "the model API dropped the connection",
        httpx.ReadError: "the model API connection broke",
        httpx.PoolTimeout: "no free connection to the model API in time",
    }
    reason = next((text for cls, text in what.items() if isinstance(exc, cls)), f"model API request failed ({type(exc).__name__})")
    if streamed:
        reason += " in the middle of a streamed reply"
    err = LLMError(reason, status=503)
    return _Retryable(err, counts=not isinstance(exc, httpx.PoolTimeout))

