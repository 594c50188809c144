"""The per-route guard: one request's pass through `lock.serialize` or `lock.depends`.

Framework-neutral on purpose: it takes the key (unless a layer further out already holds it for
this request), records the hold in `scope["keyedlock"]` so layers further in can see it, and
gives it back. Rejections come out as `Rejected`; the Starlette/FastAPI glue
(`routes/_starlette.py`, `routes/_fastapi.py`) turns them into the framework's HTTP exception.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from .._errors import (
    BackendUnavailable,
    HoldExpired,
    LockAborted,
    LockBusy,
    LockClosed,
    LockTimeout,
    QueueFull,
)
from .._http_options import HttpOptions
from .._lock import Held, KeyedLock
from .._responses import INVALID_KEY, MISSING_KEY, Rejection, log_revoked, rejection_for
from .._scope import held_by_outer_layer, record, unrecord
from .._watcher import Watcher, enter_watching
from ..keys import _key_is_valid

if TYPE_CHECKING:
    from .._types import Receive, Scope

__all__ = ["ClientGone", "Rejected", "RouteGuard", "RouteHold", "key_value", "revoked"]

_REJECTED_BY_LOCK = (
    LockBusy,
    LockAborted,
    QueueFull,
    LockTimeout,
    BackendUnavailable,
    LockClosed,
)


class Rejected(Exception):
    """The guard will not let this request in; `rejection` says how to answer it.

    `__cause__` is the lock's error (busy, timeout, ...), None for a missing or invalid key.
    """

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.detail)
        self.rejection = rejection


def revoked(expired: HoldExpired) -> Rejected:
    """The answer for a hold revoked under a running endpoint (`max_hold`, a lost engine
    lease), when its response has not started: the middleware's 503 with Retry-After."""
    rejected = Rejected(rejection_for(expired))
    rejected.__cause__ = expired
    return rejected


class ClientGone(Exception):
    """The client disconnected while its request queued: the endpoint must not run.

    Nothing is held when this is raised (a grant that came as the client left is given back).
    """


class RouteHold:
    """What the guard did for one request: the hold it took, or the outer one it reused."""

    __slots__ = ("held", "ours", "owned", "records", "replay", "started")
    records: list[Held]
    """The request's `scope["keyedlock"]` list this hold is recorded in (when owned)."""
    ours: bool
    """Whether that list was made for this hold."""

    def __init__(self, held: Held | None, owned: bool) -> None:
        self.held = held
        """The hold covering the key (ours or an outer layer's); None when there is no key."""
        self.owned = owned
        """Whether this guard took the hold (and so must give it back)."""
        self.started = perf_counter() if owned else 0.0
        self.replay: Receive | None = None
        """For a request that queued and had body chunks read meanwhile: the `receive` that
        gives them first, then the rest. None: read the original `receive`."""


_PASS = RouteHold(None, False)


class RouteGuard:
    """One decorated route or dependency: its lock and its validated `HttpOptions`."""

    __slots__ = ("lock", "options")

    def __init__(self, lock: KeyedLock, options: HttpOptions) -> None:
        self.lock = lock
        self.options = options

    async def enter(
        self, scope: Scope, key: str | None, receive: Receive | None = None
    ) -> RouteHold:
        """Take `key` for this request, or find it already held by an outer layer.

        Raises `Rejected` (nothing held) when the request must be answered without running.
        Given the request's `receive`, a request that has to queue is watched meanwhile (see
        `_watcher.py`): `ClientGone` (nothing held) if the client leaves first, and the hold's
        `replay` gives the body chunks read while it waited.
        """
        options = self.options
        if key is None:
            if options.on_missing_key == "reject":
                await self._reject(scope, MISSING_KEY, None)
            return _PASS
        if not _key_is_valid(key, options.max_key_length):
            await self._reject(scope, INVALID_KEY, None)
        lock = self.lock
        outer = held_by_outer_layer(scope, lock, key)
        if outer is not None:
            return RouteHold(outer, owned=False)
        held = lock.hold(key)  # then this route's options and the scope for observers
        held._options = options.hold_options(scope)
        held.context = scope
        watcher: Watcher | None = None
        try:
            if receive is None:
                await held.__aenter__()
            elif held._try_enter() is not None:  # it must queue: watch the client meanwhile
                watcher = Watcher(receive)
                if not await enter_watching(watcher, held):
                    raise ClientGone
        except _REJECTED_BY_LOCK as exc:
            if watcher is not None and watcher.gone is not None:
                raise ClientGone from exc
            await self._reject(scope, rejection_for(exc), exc)
        if receive is not None and held._revocable:
            held._start_limit()  # as `__aenter__` does for `max_hold`, and an engine lease too
        hold = RouteHold(held, owned=True)
        if watcher is not None and watcher.messages:
            hold.replay = watcher.replay()
        hold.records, hold.ours = record(scope, held)
        hooks = options.hooks
        if hooks.on_acquired is not None:
            try:
                await hooks.acquired(scope, held)
            except BaseException as exc:  # cancelled in the hook: the caller never sees the hold
                # Given back like any block's end, with what ended it and unshielded (the engine
                # release shields itself): the revoking scope must close in the task's own
                # order of scopes, or anyio refuses to close it and the key stays held.
                try:
                    await self.exit(scope, hold, exc)
                except HoldExpired as expired:  # revoked during the hook: the endpoint never ran
                    log_revoked(expired, False)
                    raise revoked(expired) from expired
                raise
        return hold

    async def exit(self, scope: Scope, hold: RouteHold, error: BaseException | None) -> None:
        """Give back what `enter` took. `error`: an exception that counts as the holder
        failing (for `on_error="stop"`); None for a normal end or a handled exception.

        Raises `HoldExpired` when the hold had been revoked (the key is given back all the
        same): the glue answers it with `revoked` or cuts the response off."""
        if not hold.owned:
            return
        held = hold.held
        assert held is not None
        hooks = self.options.hooks
        try:  # release first: nothing the endpoint did to the scope can keep the key held
            if error is None:
                await held.__aexit__(None, None, None)
            else:
                await held.__aexit__(type(error), error, error.__traceback__)
        finally:  # a revoked hold (`HoldExpired`) was released too: the hook hears of it
            try:
                if hooks.on_released is not None:
                    await hooks.released(scope, held, perf_counter() - hold.started)
            finally:
                unrecord(scope, hold.records, held, hold.ours)  # after: the hook may read it

    async def _reject(
        self, scope: Scope, rejection: Rejection, cause: BaseException | None
    ) -> None:
        hooks = self.options.hooks
        if hooks.on_rejected is not None:
            await hooks.rejected(scope, rejection)
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
