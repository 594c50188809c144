"""`HttpOptions`: what every HTTP layer is told, resolved and validated once.

The middleware, the Starlette decorator and the FastAPI dependency take the same keyword
options for the lock (timeout, max_waiting, on_error, max_hold, shared), the key (missing-key
policy, maximum length) and the hooks. `http_options` turns them into one immutable value at
construction time, so a mistake fails at start-up and no request re-reads loose arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ._hooks import Hooks, OnAcquired, OnRejected, OnReleased
from ._lock import KeyedLock
from ._options import LOCK_DEFAULT, HoldOptions, LockDefault, OnError
from ._types import Scope
from .keys import DEFAULT_MAX_KEY_LENGTH

__all__ = ["HttpOptions", "OnMissingKey", "http_options"]

OnMissingKey = Literal["pass", "reject"]


@dataclass(frozen=True)
class HttpOptions:
    """The options of one HTTP layer (see `http_options` for what each means)."""

    exclusive: HoldOptions
    """How requests hold their key by default."""
    shared: HoldOptions
    """How requests whose method is in `shared_methods` hold it."""
    shared_methods: frozenset[str] | None
    """Methods that take the key shared; None: none (every method, for `shared=True`: ALL)."""
    on_missing_key: OnMissingKey
    max_key_length: int
    hooks: Hooks

    def hold_options(self, scope: Scope) -> HoldOptions:
        """The hold options for this request (shared or exclusive by its method)."""
        methods = self.shared_methods
        if methods is None:
            return self.exclusive
        if methods is ALL_METHODS or scope.get("method") in methods:
            return self.shared
        return self.exclusive


ALL_METHODS: frozenset[str] = frozenset({"*"})
"""`shared_methods` of a per-route form with `shared=True`: every request is a reader."""


def http_options(
    lock: KeyedLock,
    *,
    timeout: float | LockDefault | None = LOCK_DEFAULT,
    max_waiting: int | LockDefault | None = LOCK_DEFAULT,
    on_error: OnError | LockDefault = LOCK_DEFAULT,
    max_hold: float | LockDefault | None = LOCK_DEFAULT,
    shared: bool = False,
    shared_methods: Iterable[str] | None = None,
    on_missing_key: OnMissingKey = "pass",
    max_key_length: int = DEFAULT_MAX_KEY_LENGTH,
    on_acquired: OnAcquired | None = None,
    on_released: OnReleased | None = None,
    on_rejected: OnRejected | None = None,
) -> HttpOptions:
    """Validate an HTTP layer's options against `lock`'s defaults, once."""
    if not isinstance(lock, KeyedLock):
        raise TypeError("lock must be a KeyedLock")
    exclusive = lock.defaults.resolve(timeout, max_waiting, on_error, False, max_hold)
    if not isinstance(shared, bool):
        raise TypeError("shared must be a bool")
    if isinstance(shared_methods, str):
        raise TypeError("shared_methods takes a list of method names, not one str")
    methods: frozenset[str] | None = None
    if shared:
        methods = ALL_METHODS
    elif shared_methods is not None:
        methods = frozenset(method.upper() for method in shared_methods) or None
    if on_missing_key not in ("pass", "reject"):
        raise ValueError("on_missing_key must be 'pass' or 'reject'")
    if isinstance(max_key_length, bool) or not isinstance(max_key_length, int):
        raise TypeError("max_key_length must be an int")
    if max_key_length < 1:
        raise ValueError("max_key_length must be at least 1")
    return HttpOptions(
        exclusive=exclusive,
        shared=exclusive._replace(shared=True),
        shared_methods=methods,
        on_missing_key=on_missing_key,
        max_key_length=max_key_length,
        hooks=Hooks(on_acquired, on_released, on_rejected),
    )
