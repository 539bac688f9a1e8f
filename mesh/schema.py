"""Reading a TOML table key by key, for config.py: the type and check of every key, and
an error that names the file, the key and the reason (never a bare KeyError or
TypeError). A check takes a value and returns what is wrong with it, or None.

Kept apart from config.py so that the sections' readers there say only what a section
holds, not how a key is read.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from .errors import ConfigError
from .wire import valid_name


class Reader:
    """Reads keys out of one TOML table, remembering which were used."""

    def __init__(self, path: str, where: str, table: Any):
        self.path, self.where = path, where
        if not isinstance(table, dict):
            raise ConfigError(path, where, "must be a table")
        self.table, self.used = table, set()

    def key(self, k: str) -> str:
        return f"{self.where}.{k}" if self.where else k

    def get(self, k: str, typ: type | tuple, default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        self.used.add(k)
        if k not in self.table:
            if default is ...:
                raise ConfigError(self.path, self.key(k), "is required")
            return default
        value = self.table[k]
        if typ is float and type(value) is int:
            value = float(value)
        if type(value) is float and not math.isfinite(value):
            raise ConfigError(self.path, self.key(k), f"must be a finite number, got {value!r}")
        ok = type(value) is int if typ is int else isinstance(value, typ)
        if not ok or (typ is not bool and type(value) is bool):
            want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise ConfigError(self.path, self.key(k), f"must be {want}, got {type(value).__name__} {value!r:.60}")
        if check:
            problem = check(value)
            if problem:
                raise ConfigError(self.path, self.key(k), problem)
        return value

    def strings(self, k: str, default: tuple = ()) -> tuple[str, ...]:
        values = self.get(k, list, list(default))
        for v in values:
            if not isinstance(v, str):
                raise ConfigError(self.path, self.key(k), f"must be a list of strings, has {v!r:.40}")
        return tuple(values)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(self.path, self.key(unknown[0]), "unknown key")


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low:,} and {high:,}, got {v!r}"


def host_address(v: Any) -> str | None:
    """An IP address or a host name (RFC 1123), which is what a ZeroMQ endpoint can hold."""
    import ipaddress
    try:
        ipaddress.ip_address(v)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", v) \
            and not re.fullmatch(r"[0-9.]+", v):
        return None
    return f"is not an IP address or a host name: {v!r:.60}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must not be negative"


def mesh_name(v: Any) -> str | None:
    return None if valid_name(v) else "is not a valid name (letters, digits and _.:@/+=- only)"


def tables(path: str, root: dict, section: str) -> dict[str, dict]:
    value = root.get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(path, section, "must be a table of tables")
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(path, f"{section}.{name}", "must be a table")
        if not valid_name(name):
            raise ConfigError(path, f"{section}.{name}", "is not a valid name")
    return value


def field_type(f) -> type:
    """A dataclass field's type (annotations are strings under `from __future__ import annotations`)."""
    return f.type if isinstance(f.type, type) else {"str": str, "float": float, "int": int, "bool": bool}[f.type]


def z85_key(value: str) -> str | None:
    return None if len(value) == 40 and all(c in _Z85 for c in value) else "must be a 40-character z85 CURVE key"


_Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
