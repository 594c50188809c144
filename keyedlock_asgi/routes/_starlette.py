"""`@lock.serialize(key)`: run one Starlette endpoint or FastAPI path operation under a key.

One wrapper serves both frameworks, told apart by how they call it:

- **FastAPI** reads the wrapper's `__signature__`: the endpoint's own parameters plus one hidden
  keyword-only parameter whose default is the `lock.depends` dependency. FastAPI resolves it
  like any dependency (it needs only the `Request`, so the OpenAPI schema does not change) and
  releases it after the response has been sent. The endpoint needs no `Request` parameter.
- **Starlette** calls `endpoint(request)` and then sends what it returns. The wrapper returns
  an ASGI app that, when Starlette calls it, takes the key, runs the endpoint and sends its
  response, then lets go: the key covers the endpoint, the whole body (streaming included) and
  the response's background tasks, and there is no window in which a key is held by a
  response that is never sent.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .._errors import HoldExpired
from .._responses import ResponseStart, log_revoked, send_rejection
from .._types import Receive, Scope, Send
from ..keys import _resolve_key
from ._errors import is_failure, renders_by_default, to_http
from ._guard import ClientGone, Rejected, RouteGuard, revoked
from ._replay import replay_into

__all__ = ["serialize"]

F = TypeVar("F", bound=Callable[..., Any])

_hidden_names = itertools.count(1)


def serialize(guard: RouteGuard, key: Any) -> Callable[[F], F]:
    """The decorator: `key` is a string or a key extractor `(scope) -> str | None`."""
    if not isinstance(key, str) and not callable(key):
        raise TypeError(f"a lock key must be a str or a key extractor, not {type(key).__name__}")
    fastapi_dependency = _fastapi_dependency(guard, key)

    def decorate(endpoint: F) -> F:
        if not callable(endpoint):
            raise TypeError("lock.serialize decorates an endpoint function")
        is_async = _is_async_callable(endpoint)
        hidden = f"keyedlock_guard_{next(_hidden_names)}_"

        @functools.wraps(endpoint)
        async def serialized(*args: Any, **kwargs: Any) -> Any:
            if hidden in kwargs:
                # Called by FastAPI: the hidden dependency holds the key already.
                del kwargs[hidden]
                if is_async:
                    return await endpoint(*args, **kwargs)
                return await run_in_threadpool(endpoint, *args, **kwargs)
            if not args or not isinstance(args[-1], Request) or kwargs:
                raise TypeError(
                    f"{endpoint.__qualname__} is decorated with lock.serialize: Starlette must "
                    "call it with the request (a FastAPI path operation must be registered "
                    "with @app.get(...) etc. above @lock.serialize)"
                )
            return _SerializedCall(guard, key, endpoint, is_async, args)

        if fastapi_dependency is not None:
            serialized.__signature__ = _with_hidden_parameter(  # type: ignore[attr-defined]
                endpoint, hidden, fastapi_dependency
            )
        return cast("F", serialized)

    return decorate


class _SerializedCall:
    """What a serialized Starlette endpoint returns: an ASGI app that runs the endpoint under
    its key and sends the endpoint's response before giving the key back."""

    __slots__ = ("_args", "_endpoint", "_guard", "_is_async", "_key")

    def __init__(
        self,
        guard: RouteGuard,
        key: Any,
        endpoint: Callable[..., Any],
        is_async: bool,
        args: tuple[Any, ...],
    ) -> None:
        self._guard = guard
        self._key = key
        self._endpoint = endpoint
        self._is_async = is_async
        self._args = args

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self._guard
        key = self._key
        try:
            value = (key or None) if isinstance(key, str) else await _resolve_key(key, scope)
            hold = await guard.enter(scope, value, receive)
        except ClientGone:
            return  # the client left while queued: the endpoint never runs
        except Rejected as rejected:
            await _answer(scope, send, rejected)
            return
        if hold.replay is not None:  # body chunks were read while queued: the endpoint gets them
            receive = replay_into(self._args[-1], hold.replay)
        # A hold that can be revoked (`max_hold`, an engine lease) is answered 503 if that
        # happens before the response starts, and cut off after.
        revocable = hold.held is not None and hold.owned and hold.held._revocable
        response_start = ResponseStart(send) if revocable else None
        error: BaseException | None = None
        try:
            if self._is_async:
                response = await self._endpoint(*self._args)
            else:
                response = await run_in_threadpool(self._endpoint, *self._args)
            await response(scope, receive, send if response_start is None else response_start.send)
        except BaseException as exc:
            error = exc
        try:
            failed = error is not None and is_failure(scope, error)
            await guard.exit(scope, hold, error if failed else None)
        except HoldExpired as expired:
            cut_off = response_start is None or response_start.started
            log_revoked(expired, cut_off)
            if cut_off:
                raise
            await _answer(scope, send, revoked(expired))
            return
        if error is not None:
            raise error


async def _answer(scope: Scope, send: Send, rejected: Rejected) -> None:
    """Answer a rejection through the app's exception handlers, or with the middleware's JSON
    answer where only Starlette's plain-text default would render it."""
    exc = to_http(rejected)
    if renders_by_default(scope, exc):
        await send_rejection(send, rejected.rejection)
        return
    raise exc from rejected.__cause__


def _fastapi_dependency(guard: RouteGuard, key: Any) -> Any:
    """The hidden parameter's `Depends(...)`, or None when FastAPI is not installed."""
    try:
        from ._fastapi import _request_scoped, guard_dependency
    except ImportError:
        return None
    return _request_scoped(guard_dependency(guard, key, from_dependency=False))


def _with_hidden_parameter(endpoint: Callable[..., Any], name: str, default: Any) -> Any:
    """The endpoint's signature plus a keyword-only `name=default` (before any `**kwargs`).

    Annotations stay as written: FastAPI resolves string annotations in the globals of the
    unwrapped endpoint (`__wrapped__`), which is the endpoint's own module.
    """
    signature = inspect.signature(endpoint)
    parameters = list(signature.parameters.values())
    hidden = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    at = len(parameters)
    if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
        at -= 1
    parameters.insert(at, hidden)
    return signature.replace(parameters=parameters)


def _is_async_callable(obj: Any) -> bool:
    """Whether calling `obj` gives a coroutine, judged as Starlette and FastAPI judge it (they
    run everything else in a worker thread, and so do we)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or (
        callable(obj) and inspect.iscoroutinefunction(getattr(obj, "__call__", None))  # noqa: B004
    )
