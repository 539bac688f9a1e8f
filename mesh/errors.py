"""One exception tree for the whole mesh.

    MeshError
    ├── ConfigError          a config file is wrong: names the file, the key and the reason
    ├── ProtocolError        bytes off a socket are not a valid message (never reaches an agent)
    ├── StoreError           LMDB failed or holds something unreadable
    │   └── SnapshotCorrupt  one agent's snapshot cannot be decoded (names the agent)
    └── CallError            what a caller gets back instead of a reply
        ├── Retryable        the same request may succeed later: wait, then send it again
        │   ├── AgentDown    the agent is not running now (restarting or moving)
        │   │   └── LinkDown the connection to its node is down (inside the caller)
        │   ├── Unavailable  the mesh cannot serve it now (store or supervisor down)
        │   └── Moved        the agent lives on another node (inside the caller, carries where)
        ├── NoSuchAgent      no agent has that name
        ├── AlreadyExists    spawn of a name that is already taken
        ├── AgentCrashed     the handler raised; names the exception
        ├── CallTimeout      no reply before the deadline
        ├── Busy             a mailbox or a per-peer limit is full
        ├── NotAllowed       a kind or an operation that the config does not allow
        ├── BadRequest       the request itself is malformed
        ├── SupervisorDown   the supervision tree gave up (too many restarts): names the supervisor
        └── LLMError         a language-model API failed: status and a short reason

A write from an older incarnation than the stored one is not an error the store raises:
it is reported per name in the commit's outcome (store.Outcome.fenced).

Errors cross the wire as ``[type, message, data]``; ``error_from_wire`` rebuilds the
same class on the caller's side, so ``except NoSuchAgent`` works across processes.
Foreign exceptions (zmq, lmdb, httpx) are translated where those libraries are used.
"""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    """Base of every error the mesh raises on purpose."""


class ConfigError(MeshError):
    def __init__(self, path: str, key: str, reason: str):
        self.path, self.key, self.reason = path, key, reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


class ProtocolError(MeshError):
    """Undecodable or invalid message. `request_id` is set when it could be read."""

    def __init__(self, reason: str, request_id: str | None = None):
        self.request_id = request_id
        super().__init__(reason)


class StoreError(MeshError):
    disk_full = False  # set when the disk has no room: freeing space mends it


class SnapshotCorrupt(StoreError):
    def __init__(self, name: str, reason: str):
        self.name = name
        super().__init__(f"snapshot of agent {name!r} is unreadable: {reason}")


class CallError(MeshError):
    """Raised to a caller. `data` carries machine-readable details across the wire."""

    def __init__(self, message: str = "", data: dict | None = None):
        self.data = data or {}
        super().__init__(message or type(self).__name__)

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again (same id, after a pause) may succeed."""
        return False


class Retryable(CallError):
    """The request may succeed if sent again with its id: the agent is restarting or
    moving, or the mesh cannot serve it now. Every retry decision (the caller's library,
    the supervisor's starts) asks `retryable`, which an instance turns off with
    `{"retry": false}` in its data when trying again would fail the same way (a full disk)."""

    @property
    def retryable(self) -> bool:
        return self.data.get("retry") is not False


class NoSuchAgent(CallError):
    pass


class AlreadyExists(CallError):
    pass


class AgentDown(Retryable):
    pass


class LinkDown(AgentDown):
    """The connection to the node that had the request went down (the caller's own
    verdict; never sent over the wire)."""


class AgentCrashed(CallError):
    pass


class CallTimeout(CallError):
    pass


class Busy(CallError):
    """Too much to do now. With `retry_after_ms` in its data (a spawn refused for a burst)
    the same request sent again after that long may succeed; without (a full mailbox or
    queue), it is the caller's to decide."""

    @property
    def retryable(self) -> bool:
        return "retry_after_ms" in self.data


class NotAllowed(CallError):
    pass


class BadRequest(CallError):
    pass


class Unavailable(Retryable):
    pass


def reused_id(rid: str) -> BadRequest:
    """The refusal of a request id used before for a different request (an id names one)."""
    return BadRequest(f"request id {rid!r} was used before for a different request: "
                      f"a request id names one request (use a new id for a new one)")


class SupervisorDown(CallError):
    """The root supervisor gave up (more restarts than its intensity allows): no agent
    of the tree runs, none is spawned or restarted, until the supervisor role restarts.
    The message names the supervisors that gave up. Not retryable."""


class Moved(Retryable):
    pass


class LLMError(CallError):
    """An upstream model API failed. An agent may let it pass: its caller gets it, and
    the agent neither crashes nor loses its state."""

    def __init__(self, message: str = "", data: dict | None = None, status: int | None = None):
        data = dict(data or {})
        if status is not None:
            data["status"] = status
        super().__init__(message, data)

    @property
    def status(self) -> int | None:
        return self.data.get("status")


_CALL_ERRORS = {
    cls.__name__: cls
    for cls in (
        NoSuchAgent,
        AlreadyExists,
        AgentDown,
        AgentCrashed,
        CallTimeout,
        Busy,
        NotAllowed,
        BadRequest,
        Unavailable,
        SupervisorDown,
        Moved,
        LLMError,
    )
}


def error_to_wire(exc: CallError) -> list[Any]:
    """An error as it crosses the wire, named by its nearest class the other side knows
    (a LinkDown that a node's own caller raised goes as the retryable AgentDown it is)."""
    name = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in _CALL_ERRORS),
                type(exc).__name__)
    return [name, str(exc), exc.data or None]


def error_from_wire(body: Any) -> CallError:
    """Rebuild a CallError from its wire form; anything unexpected becomes BadRequest."""
    if not (isinstance(body, list) and len(body) == 3):
        return BadRequest(f"malformed error reply: {body!r:.200}")
    name, message, data = body
    cls = _CALL_ERRORS.get(name) if isinstance(name, str) else None
    if cls is None:
        return CallError(f"{name}: {message}")
    return cls(message if isinstance(message, str) else repr(message), data if isinstance(data, dict) else None)
