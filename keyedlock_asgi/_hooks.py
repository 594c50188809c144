"""Event hooks: let users wire lock events to logs or metrics without touching lock state.

Shared by every ASGI layer (middleware, per-route guard). A hook may be sync or async; an
exception it raises is logged and swallowed, so a broken metrics call can never strand a key
or fail a request.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ._lock import Held
    from ._responses import Rejection
    from ._types import Scope

__all__ = ["Hooks", "OnAcquired", "OnRejected", "OnReleased"]

logger = logging.getLogger("keyedlock_asgi")

OnAcquired: TypeAlias = "Callable[[Scope, Held], Awaitable[None] | None]"
"""`on_acquired(scope, held)`: the request got its keys (`held.waited` says how long it queued)."""
OnReleased: TypeAlias = "Callable[[Scope, Held, float], Awaitable[None] | None]"
"""`on_released(scope, held, held_for)`: the keys were given back after `held_for` seconds."""
OnRejected: TypeAlias = "Callable[[Scope, Rejection], Awaitable[None] | None]"
"""`on_rejected(scope, rejection)`: the request was answered without running
(`rejection.reason`: busy, aborted, queue_full, timeout, backend_unavailable, missing_key,
invalid_key, body_too_large)."""


class Hooks:
    """The three optional hooks of one layer, each called safely."""

    __slots__ = ("on_acquired", "on_rejected", "on_released")

    def __init__(
        self,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> None:
        for name, hook in (
            ("on_acquired", on_acquired),
            ("on_released", on_released),
            ("on_rejected", on_rejected),
        ):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable")
        self.on_acquired = on_acquired
        self.on_released = on_released
        self.on_rejected = on_rejected

    async def acquired(self, scope: Scope, held: Held) -> None:
        if self.on_acquired is not None:
            await _call("on_acquired", self.on_acquired, scope, held)

    async def released(self, scope: Scope, held: Held, held_for: float) -> None:
        if self.on_released is not None:
            await _call("on_released", self.on_released, scope, held, held_for)

    async def rejected(self, scope: Scope, rejection: Rejection) -> None:
        if self.on_rejected is not None:
            await _call("on_rejected", self.on_rejected, scope, rejection)


async def _call(name: str, hook: Callable[..., Any], *args: Any) -> None:
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("keyedlock %s hook raised; ignored", name)
