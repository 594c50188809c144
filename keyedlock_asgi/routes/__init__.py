"""Per-route locking: `lock.serialize` (Starlette endpoints, FastAPI path operations) and
`lock.depends` (a FastAPI dependency), on the public `KeyedLock`.

The top layer of the package: the core lock knows nothing of HTTP, so the public `KeyedLock`
is the core class plus these two factories. The glue modules import Starlette or FastAPI, which
are optional extras, so each is imported when its form is first used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .. import _lock
from .._hooks import OnAcquired, OnRejected, OnReleased
from .._http_options import OnMissingKey, http_options
from .._options import LOCK_DEFAULT, LockDefault, OnError
from ..keys import DEFAULT_MAX_KEY_LENGTH, KeyExtractor
from ._guard import RouteGuard

__all__ = ["KeyedLock"]

F = TypeVar("F", bound=Callable[..., Any])


class KeyedLock(_lock.KeyedLock):
    __doc__ = _lock.KeyedLock.__doc__

    def serialize(
        self,
        key: str | KeyExtractor,
        *,
        timeout: float | LockDefault | None = LOCK_DEFAULT,
        max_waiting: int | LockDefault | None = LOCK_DEFAULT,
        on_error: OnError | LockDefault = LOCK_DEFAULT,
        max_hold: float | LockDefault | None = LOCK_DEFAULT,
        shared: bool = False,
        on_missing_key: OnMissingKey = "pass",
        max_key_length: int = DEFAULT_MAX_KEY_LENGTH,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> Callable[[F], F]:
        """Decorate a Starlette endpoint or FastAPI path operation to run under `key`.

        `key`: a string, or a key extractor `(scope) -> str | None` (see `keys`). The key is
        held until the response has been sent, streamed bodies included. Options left out
        are the lock's defaults; rejections answer like `KeyedLockMiddleware`.
        """
        from ._starlette import serialize  # Starlette is an optional extra

        options = http_options(
            self,
            timeout=timeout,
            max_waiting=max_waiting,
            on_error=on_error,
            max_hold=max_hold,
            shared=shared,
            on_missing_key=on_missing_key,
            max_key_length=max_key_length,
            on_acquired=on_acquired,
            on_released=on_released,
            on_rejected=on_rejected,
        )
        return serialize(RouteGuard(self, options), key)

    def depends(
        self,
        key: str | Callable[..., Any],
        *,
        timeout: float | LockDefault | None = LOCK_DEFAULT,
        max_waiting: int | LockDefault | None = LOCK_DEFAULT,
        on_error: OnError | LockDefault = LOCK_DEFAULT,
        max_hold: float | LockDefault | None = LOCK_DEFAULT,
        shared: bool = False,
        on_missing_key: OnMissingKey = "pass",
        max_key_length: int = DEFAULT_MAX_KEY_LENGTH,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> Any:
        """A FastAPI dependency (`dependencies=[lock.depends(...)]`) that holds `key`.

        `key`: a string, an extractor made by `keys` (read from the request), or any other
        callable, which is a FastAPI dependency returning the key (its own parameters are
        resolved and validated by FastAPI first). Used as a parameter, it gives the `Held`
        covering the key, or None when the request has no key.
        """
        from ._fastapi import depends  # FastAPI is an optional extra

        options = http_options(
            self,
            timeout=timeout,
            max_waiting=max_waiting,
            on_error=on_error,
            max_hold=max_hold,
            shared=shared,
            on_missing_key=on_missing_key,
            max_key_length=max_key_length,
            on_acquired=on_acquired,
            on_released=on_released,
            on_rejected=on_rejected,
        )
        return depends(RouteGuard(self, options), key)
