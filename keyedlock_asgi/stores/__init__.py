"""Stores for `IdempotencyMiddleware`: where completed responses wait for their retries.

`MemoryStore` needs nothing; `RedisStore` (extra `redis`) and `PostgresStore` (extra
`postgres`) are imported on first access, so this package imports without their drivers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._base import IdempotencyStore, StoredResponse
from ._memory import MemoryStore

if TYPE_CHECKING:
    from .postgres import PostgresStore
    from .redis import RedisStore

__all__ = ["IdempotencyStore", "MemoryStore", "PostgresStore", "RedisStore", "StoredResponse"]

_LAZY = {"RedisStore": ".redis", "PostgresStore": ".postgres"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
