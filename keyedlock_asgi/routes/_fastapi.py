"""`lock.depends(key)`: a FastAPI dependency that holds the request's key.

It is a `yield` dependency with `Depends(scope="request")`, whose exit code FastAPI runs after the
response has been sent (streamed bodies and background tasks included: FastAPI >= 0.121 wraps
`await response(...)` in the request's exit stack). `scope="request"` is passed explicitly, so
a FastAPI too old to keep that promise fails loudly here instead of releasing early.

The key is either read from the request (a string, or an extractor made by `keys`) or is the
result of a FastAPI dependency of the user's, whose parameters FastAPI resolves and validates
first: a typed path parameter that does not parse gives 422 before any lock is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import fastapi
from fastapi import Depends
from starlette.requests import Request

from .._errors import HoldExpired
from .._lock import Held
from .._responses import log_revoked
from ..keys import _is_scope_extractor, _resolve_key
from ._errors import LockRejected, is_failure, to_http
from ._guard import ClientGone, Rejected, RouteGuard, RouteHold, key_value, revoked
from ._replay import replay_into

__all__ = ["FastAPILockRejected", "depends", "guard_dependency"]


class FastAPILockRejected(fastapi.HTTPException, LockRejected):
    """The rejection as FastAPI's `HTTPException` too, so a handler registered for either
    FastAPI's or Starlette's `HTTPException` takes it."""


def depends(guard: RouteGuard, key: Any) -> Any:
    """`Depends(...)` for `dependencies=[...]` or a parameter (`held: Held | None = ...`)."""
    return _request_scoped(guard_dependency(guard, key, from_dependency=True))


class ClientLeft(fastapi.HTTPException):
    """The client disconnected while its request queued: the endpoint does not run.

    A dependency can only stop a request by raising; this one is answered 499 (nginx's "client
    closed request"), which no client receives: the server drops it.
    """

    def __init__(self) -> None:
        super().__init__(499, "Client closed the request while it waited for its lock key.")


def guard_dependency(
    guard: RouteGuard, key: Any, *, from_dependency: bool
) -> Callable[..., AsyncIterator[Held | None]]:
    """The dependency function: takes the key, yields the covering `Held` (None: no key).

    `from_dependency`: a callable `key` that `keys` did not make is a FastAPI dependency (for
    `lock.depends`); otherwise every callable `key` is read from the scope (the decorator).
    """
    if isinstance(key, str):
        constant = key or None

        async def key_of(request: Request, value: Any) -> str | None:
            return constant

        parameters = [_request_parameter()]
    elif callable(key) and (_is_scope_extractor(key) or not from_dependency):

        async def key_of(request: Request, value: Any) -> str | None:
            return await _resolve_key(key, request.scope)

        parameters = [_request_parameter()]
    elif callable(key):

        async def key_of(request: Request, value: Any) -> str | None:
            return key_value(value)

        parameters = [
            _request_parameter(),
            inspect.Parameter("key", inspect.Parameter.KEYWORD_ONLY, default=Depends(key)),
        ]
    else:
        raise TypeError(f"a lock key must be a str or a callable, not {type(key).__name__}")

    async def hold_key(request: Request, key: Any = None) -> AsyncIterator[Held | None]:
        scope = request.scope
        try:
            # FastAPI has read the body already when the endpoint takes one: then only
            # `http.disconnect` is left for the wait to watch.
            hold = await guard.enter(scope, await key_of(request, key), request.receive)
        except ClientGone as gone:
            raise ClientLeft() from gone
        except Rejected as rejected:
            raise to_http(rejected, FastAPILockRejected) from rejected.__cause__
        if hold.replay is not None:
            replay_into(request, hold.replay)
        try:
            yield hold.held
        except BaseException as exc:
            await _exit(guard, scope, hold, exc if is_failure(scope, exc) else None)
            raise
        await _exit(guard, scope, hold, None)

    hold_key.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return hold_key


async def _exit(
    guard: RouteGuard, scope: Any, hold: RouteHold, error: BaseException | None
) -> None:
    """`guard.exit`; a hold revoked under the endpoint is answered 503 with Retry-After. The
    dependency cannot see the response: had it started, Starlette refuses the answer ("response
    already started") and the response is cut off, as under the middleware."""
    try:
        await guard.exit(scope, hold, error)
    except HoldExpired as expired:
        log_revoked(expired, None)  # the dependency cannot tell whether the response started
        raise to_http(revoked(expired), FastAPILockRejected) from expired


def _request_parameter() -> inspect.Parameter:
    return inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)


def _request_scoped(dependency: Callable[..., Any]) -> Any:
    try:
        return Depends(dependency, scope="request")
    except TypeError as exc:  # pragma: no cover - depends on the installed FastAPI
        raise RuntimeError(
            "lock.depends and lock.serialize need FastAPI >= 0.121 (Depends(scope='request')), "
            "which runs the release after the response has been sent"
        ) from exc
