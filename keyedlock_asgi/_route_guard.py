"""The per-route guard: one request's pass through `lock.serialize` or `lock.depends`.

Framework-neutral on purpose: it takes the key (unless a layer further out already holds it for
this request), records the hold in `scope["keyedlock"]` so layers further in can see it, and
gives it back. Rejections come out as `Rejected`; the Starlette/FastAPI glue
(`_route_decorator.py`, `_route_dependency.py`) turns them into the framework's HTTP exception.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

from ._errors import BackendUnavailable, LockAborted, LockBusy, LockTimeout, QueueFull
from ._hooks import Hooks, OnAcquired, OnRejected, OnReleased
from ._lock import UNSET, Held, KeyedLock, OnError, _Unset
from ._middleware import SCOPE_KEY
from ._responses import INVALID_KEY, MISSING_KEY, Rejection, rejection_for
from .keys import DEFAULT_MAX_KEY_LENGTH, _key_is_valid

if TYPE_CHECKING:
    from ._types import Scope

__all__ = ["OnMissingKey", "Rejected", "RouteGuard", "RouteHold", "depends", "serialize"]

F = TypeVar("F", bound=Callable[..., Any])
OnMissingKey = Literal["pass", "reject"]

_REJECTED_BY_LOCK = (LockBusy, LockAborted, QueueFull, LockTimeout, BackendUnavailable)


class Rejected(Exception):
    """The guard will not let this request in; `rejection` says how to answer it.

    `__cause__` is the lock's error (busy, timeout, ...), None for a missing or invalid key.
    """

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.detail)
        self.rejection = rejection


class RouteHold:
    """What the guard did for one request: the hold it took, or the outer one it reused."""

    __slots__ = ("held", "owned", "started")

    def __init__(self, held: Held | None, owned: bool) -> None:
        self.held = held
        """The hold covering the key (ours or an outer layer's); None when there is no key."""
        self.owned = owned
        """Whether this guard took the hold (and so must give it back)."""
        self.started = perf_counter() if owned else 0.0


_PASS = RouteHold(None, False)


class RouteGuard:
    """The configuration of one decorated route or dependency: lock, options, hooks."""

    __slots__ = (
        "hooks",
        "lock",
        "max_key_length",
        "max_waiting",
        "on_error",
        "on_missing_key",
        "timeout",
    )

    def __init__(
        self,
        lock: KeyedLock,
        *,
        timeout: float | _Unset | None = UNSET,
        max_waiting: int | _Unset | None = UNSET,
        on_error: OnError | _Unset = UNSET,
        on_missing_key: OnMissingKey = "pass",
        max_key_length: int = DEFAULT_MAX_KEY_LENGTH,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> None:
        if not isinstance(lock, KeyedLock):
            raise TypeError("the route guard needs a KeyedLock")
        if on_missing_key not in ("pass", "reject"):
            raise ValueError("on_missing_key must be 'pass' or 'reject'")
        if isinstance(max_key_length, bool) or not isinstance(max_key_length, int):
            raise TypeError("max_key_length must be an int")
        if max_key_length < 1:
            raise ValueError("max_key_length must be at least 1")
        # Validate the lock options now, at decoration time, not on the first request.
        lock.hold("-", timeout=timeout, max_waiting=max_waiting, on_error=on_error)
        self.lock = lock
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.on_error = on_error
        self.on_missing_key: OnMissingKey = on_missing_key
        self.max_key_length = max_key_length
        self.hooks = Hooks(on_acquired, on_released, on_rejected)

    async def enter(self, scope: Scope, key: str | None) -> RouteHold:
        """Take `key` for this request, or find it already held by an outer layer.

        Raises `Rejected` (nothing held) when the request must be answered without running.
        """
        if key is None:
            if self.on_missing_key == "reject":
                await self._reject(scope, MISSING_KEY, None)
            return _PASS
        if not _key_is_valid(key, self.max_key_length):
            await self._reject(scope, INVALID_KEY, None)
        lock = self.lock
        records: list[Held] | None = scope.get(SCOPE_KEY)
        if records:
            for outer in records:
                if outer.lock is lock and key in outer.keys:
                    return RouteHold(outer, owned=False)
        held = lock.hold(
            key, timeout=self.timeout, max_waiting=self.max_waiting, on_error=self.on_error
        )
        try:
            await held.__aenter__()
        except _REJECTED_BY_LOCK as exc:
            await self._reject(scope, rejection_for(exc), exc)
        if records is None:
            records = scope[SCOPE_KEY] = []
        records.append(held)
        hold = RouteHold(held, owned=True)
        if self.hooks.on_acquired is not None:
            try:
                await self.hooks.acquired(scope, held)
            except BaseException:  # cancelled inside the hook: the caller never sees the hold
                with anyio.CancelScope(shield=True):
                    await self.exit(scope, hold, None)
                raise
        return hold

    async def exit(self, scope: Scope, hold: RouteHold, error: BaseException | None) -> None:
        """Give back what `enter` took. `error`: an exception that counts as the holder
        failing (for `on_error="stop"`); None for a normal end or a handled exception."""
        if not hold.owned:
            return
        held = hold.held
        assert held is not None
        try:  # release first: nothing the endpoint did to the scope can keep the key held
            if error is None:
                await held.__aexit__(None, None, None)
            else:
                await held.__aexit__(type(error), error, error.__traceback__)
        finally:
            records = scope.get(SCOPE_KEY)
            if records is not None and held in records:
                records.remove(held)
        if self.hooks.on_released is not None:
            await self.hooks.released(scope, held, perf_counter() - hold.started)

    async def _reject(
        self, scope: Scope, rejection: Rejection, cause: BaseException | None
    ) -> None:
        if self.hooks.on_rejected is not None:
            await self.hooks.rejected(scope, rejection)
        raise Rejected(rejection) from cause


def key_value(value: object) -> str | None:
    """A key given by a FastAPI dependency: `str` (empty means none), an `int`, or None."""
    if value is None or type(value) is str:
        return value or None
    if isinstance(value, str):
        return str(value) or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"a lock key must be str, int or None, not {type(value).__name__}")


def serialize(lock: KeyedLock, key: Any, **options: Any) -> Callable[[F], F]:
    from ._route_decorator import serialize as build

    return build(lock, key, **options)


def depends(lock: KeyedLock, key: Any, **options: Any) -> Any:
    from ._route_dependency import depends as build

    return build(lock, key, **options)
