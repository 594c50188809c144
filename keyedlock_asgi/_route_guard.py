"""Per-route serialization (decorator and FastAPI dependency): arrives with the per-route issue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._lock import KeyedLock


def serialize(lock: KeyedLock, key: Any, **options: Any) -> Any:
    raise NotImplementedError("lock.serialize is not built yet")


def depends(lock: KeyedLock, key: Any, **options: Any) -> Any:
    raise NotImplementedError("lock.depends is not built yet")
