"""Apps for the per-route tests: the same endpoint behind each per-route form."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from keyedlock_asgi._errors import KeyedLockError
from keyedlock_asgi._responses import Rejection, rejection_for

Handler = Callable[[Request], Awaitable[Response]]

GUARD_FORMS = ["starlette_decorator", "fastapi_decorator", "fastapi_depends"]
"""The forms that answer rejections through the framework's exception handlers."""
FORMS = [*GUARD_FORMS, "starlette_route_middleware"]
"""Every per-route form, with its options (route middleware: `KeyedLockMiddleware` on a `Route`)."""

KEY = keys.header("x-key")


def build_app(
    form: str,
    lock: KeyedLock,
    handler: Handler,
    *,
    key: Any = KEY,
    exception_handlers: dict[Any, Any] | None = None,
    middleware: list[Middleware] | None = None,
    **options: Any,
) -> Any:
    """An app serving POST /items/{item_id} with `handler`, guarded by `form` on `lock`."""
    if form == "starlette_route_middleware":

        async def plain(request: Request) -> Response:
            return await handler(request)

        extractor = key if callable(key) else (lambda scope: key)
        guard = Middleware(KeyedLockMiddleware, lock=lock, key=extractor, **options)
        return Starlette(
            routes=[Route("/items/{item_id}", plain, methods=["POST"], middleware=[guard])],
            exception_handlers=exception_handlers,
            middleware=middleware,
        )
    if form == "starlette_decorator":

        @lock.serialize(key, **options)
        async def endpoint(request: Request) -> Response:
            return await handler(request)

        return Starlette(
            routes=[Route("/items/{item_id}", endpoint, methods=["POST"])],
            exception_handlers=exception_handlers,
            middleware=middleware,
        )
    app = FastAPI(exception_handlers=exception_handlers, middleware=middleware)
    if form == "fastapi_decorator":

        @app.post("/items/{item_id}")
        @lock.serialize(key, **options)
        async def decorated(item_id: str, request: Request) -> Response:
            return await handler(request)

    elif form == "fastapi_depends":

        @app.post("/items/{item_id}", dependencies=[lock.depends(key, **options)])
        async def dependent(item_id: str, request: Request) -> Response:
            return await handler(request)

    else:  # pragma: no cover - a typo in a test
        raise ValueError(form)
    return app


def hook_that_blocks(name: str) -> tuple[Callable[[Any, Any], Awaitable[None]], anyio.Event]:
    """An `on_acquired` hook that never returns for the request named `name` (its `x-name`
    header), and the event it sets once that request is inside it."""
    inside = anyio.Event()

    async def acquired(scope: Any, held: Any) -> None:
        if dict(scope["headers"])[b"x-name"] == name.encode():
            inside.set()
            await anyio.sleep_forever()

    return acquired, inside


def client(app: Any) -> httpx.AsyncClient:
    """An in-process client; app exceptions become 500 answers, as a server would send."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def answer(response: httpx.Response) -> tuple[int, Any, str | None, str | None]:
    """What a client sees of a rejection: status, JSON body, Retry-After, content type."""
    return (
        response.status_code,
        json.loads(response.content),
        response.headers.get("retry-after"),
        response.headers.get("content-type"),
    )


def expected(rejection: Rejection | KeyedLockError) -> tuple[int, Any, str | None, str]:
    """The middleware's table entry for a rejection, in `answer()` form."""
    if isinstance(rejection, KeyedLockError):
        rejection = rejection_for(rejection)
    retry = None if rejection.retry_after is None else str(rejection.retry_after)
    return rejection.status, {"detail": rejection.detail}, retry, "application/json"


def assert_idle(lock: KeyedLock) -> None:
    """No key left held or queued (call on the test's own event loop)."""
    stats = lock.stats()
    assert (stats.active_keys, stats.holders, stats.waiting) == (0, 0, 0), stats


@contextlib.asynccontextmanager
async def held_elsewhere(lock: KeyedLock, key: str) -> AsyncIterator[None]:
    """`key` held by another task for the length of the block (the in-process client runs
    the app in the test's own task, which would otherwise be re-entering its own hold)."""
    taken = anyio.Event()
    done = anyio.Event()

    async def holder() -> None:
        async with lock.hold(key):
            taken.set()
            await done.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await taken.wait()
        try:
            yield
        finally:
            done.set()
