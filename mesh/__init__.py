"""The mesh: long-lived, stateful agents on ZeroMQ, supervised the OTP way.

    from mesh import Agent, connect, connect_sync
"""

from .agent import Agent, CallContext
from .client import Client, connect, connect_sync
from .errors import (AgentCrashed, AgentDown, AlreadyExists, BadRequest, Busy, CallError, CallTimeout,
                     ConfigError, MeshError, NoSuchAgent, NotAllowed, Unavailable)

__all__ = [
    "Agent", "CallContext", "Client", "connect", "connect_sync",
    "MeshError", "ConfigError", "CallError", "NoSuchAgent", "AlreadyExists", "AgentDown",
    "AgentCrashed", "CallTimeout", "Busy", "NotAllowed", "BadRequest", "Unavailable",
]
