"""The mesh: long-lived, stateful agents on ZeroMQ, supervised the OTP way.

    from mesh import Agent, connect, connect_sync

`Agent` and the client are imported on first use (PEP 562), so that `import mesh`,
and the `mesh` command's quick verbs, do not pay for what they do not use.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import (AgentCrashed, AgentDown, AlreadyExists, BadRequest, Busy, CallError, CallTimeout,
                     ConfigError, MeshError, NoSuchAgent, NotAllowed, Unavailable)

if TYPE_CHECKING:
    from .agent import Agent, CallContext
    from .client import Client, connect, connect_sync

_LAZY = {"Agent": ".agent", "CallContext": ".agent", "Client": ".client", "connect": ".client",
         "connect_sync": ".client"}

__all__ = [
    "Agent", "CallContext", "Client", "connect", "connect_sync",
    "MeshError", "ConfigError", "CallError", "NoSuchAgent", "AlreadyExists", "AgentDown",
    "AgentCrashed", "CallTimeout", "Busy", "NotAllowed", "BadRequest", "Unavailable",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
