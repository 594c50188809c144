"""KeyedLockMiddleware's entry point: a plain `__call__` that servers still see as ASGI 3.

A request the middleware does not lock gets the wrapped app's own awaitable (no coroutine of
ours in between); servers and helpers that tell ASGI 3 from ASGI 2 by looking for a coroutine
function must still find one, and errors must still surface when the result is awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import warnings
from collections.abc import Awaitable, Generator
from typing import Any

import pytest

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

HEADERS = [(b"host", b"test"), (b"accept", b"*/*")]


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def http_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": [*HEADERS, *headers]}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Any) -> None:
    pass


# -- detected as ASGI 3 -----------------------------------------------------------------------


def asyncio_iscoroutinefunction(function: Any) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated on 3.14
        return asyncio.iscoroutinefunction(function)


def test_call_attribute_is_a_coroutine_function_for_inspect_and_asyncio() -> None:
    middleware = KeyedLockMiddleware(ok_app, key=keys.header("x-key"))
    # How Hypercorn's is_asgi() and most ASGI 2/3 checks read it, on every Python version.
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert asyncio_iscoroutinefunction(middleware.__call__)
    # The class's own `__call__` is marked too, as each Python lets one mark it.
    if sys.version_info >= (3, 12):
        assert inspect.iscoroutinefunction(KeyedLockMiddleware.__call__)
    assert asyncio_iscoroutinefunction(KeyedLockMiddleware.__call__)


def test_uvicorn_loads_it_as_asgi3() -> None:
    from uvicorn.config import Config

    config = Config(app=KeyedLockMiddleware(ok_app, key=keys.header("x-key")), lifespan="off")
    config.load()
    assert config.interface == "asgi3"


def test_asgiref_sees_a_single_callable() -> None:
    compatibility = pytest.importorskip("asgiref.compatibility")
    middleware = KeyedLockMiddleware(ok_app, key=keys.header("x-key"))
    assert not compatibility.is_double_callable(middleware)
    assert compatibility.guarantee_single_callable(middleware) is middleware


def test_starlette_sees_an_async_callable() -> None:
    from starlette._utils import is_async_callable

    assert is_async_callable(KeyedLockMiddleware(ok_app, key=keys.header("x-key")))


@pytest.mark.anyio
async def test_call_attribute_serves_like_the_instance() -> None:
    lock = KeyedLock()
    seen: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(lock.locked("alice"))
        await ok_app(scope, receive, send)

    middleware = KeyedLockMiddleware(app, key=keys.header("x-key"), lock=lock)
    await middleware.__call__(http_scope((b"x-key", b"alice")), receive, discard)
    await middleware(http_scope((b"x-key", b"alice")), receive, discard)
    assert seen == [True, True]
    assert not lock.locked("alice")


# -- pass-through returns the app's own awaitable ---------------------------------------------


class Marker:
    """An awaitable an app returns, to see whether the middleware handed it on as is."""

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())


@pytest.mark.parametrize(
    ("scope", "options"),
    [
        ({"type": "lifespan"}, {}),
        ({"type": "websocket", "path": "/", "headers": []}, {}),
        (http_scope(), {}),  # no key
        (http_scope((b"x-key", b"")), {}),  # empty key
        (http_scope((b"x-key", b"alice")), {"methods": ["POST"]}),  # method not covered
        (http_scope((b"x-key", b"alice")), {"exclude": ["/"]}),  # route not covered
    ],
)
def test_pass_through_returns_the_apps_own_awaitable(
    scope: dict[str, Any], options: dict[str, Any]
) -> None:
    marker = Marker()
    calls: list[tuple[Any, ...]] = []

    def app(*args: Any) -> Awaitable[None]:
        calls.append(args)
        return marker  # type: ignore[return-value]

    middleware = KeyedLockMiddleware(app, key=keys.header("x-key"), **options)
    assert middleware(scope, receive, discard) is marker
    assert calls == [(scope, receive, discard)]


# -- errors surface on await, as from an async def --------------------------------------------


@pytest.mark.anyio
async def test_extractor_error_is_raised_on_await_not_on_call() -> None:
    def broken(scope: Any) -> str:
        raise LookupError("no key here")

    middleware = KeyedLockMiddleware(ok_app, key=broken)
    pending = middleware(http_scope(), receive, discard)
    with pytest.raises(LookupError, match="no key here"):
        await pending


@pytest.mark.anyio
async def test_malformed_scope_and_sync_app_errors_are_raised_on_await() -> None:
    def sync_failing_app(scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        raise RuntimeError("app failed before returning an awaitable")

    middleware = KeyedLockMiddleware(sync_failing_app, key=keys.header("x-key"))
    no_type = middleware({}, receive, discard)
    with pytest.raises(KeyError):
        await no_type
    pending = middleware(http_scope(), receive, discard)
    with pytest.raises(RuntimeError, match="before returning"):
        await pending


@pytest.mark.anyio
async def test_header_fast_path_reads_like_keys_header() -> None:
    """The middleware scans for `keys.header()` itself: same answer as the extractor."""
    lock = KeyedLock()
    held: list[tuple[str, ...]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        held.append(scope["keyedlock"][-1].keys if scope.get("keyedlock") else ())
        await ok_app(scope, receive, send)

    extractor = keys.header("X-Key")
    middleware = KeyedLockMiddleware(app, key=extractor, lock=lock)
    cases = [
        http_scope((b"x-key", b"first"), (b"x-key", b"second")),  # the first value
        http_scope((b"x-key", b""), (b"x-key", b"second")),  # first empty: no key
        http_scope((b"x-key", "caf\xe9".encode("latin-1"))),  # latin-1, like Starlette
        http_scope((b"x-other", b"alice")),
    ]
    for scope in cases:
        await middleware(scope, receive, discard)
    expected = [extractor(scope) for scope in cases]
    assert held == [(key,) if key else () for key in expected]
    assert held == [("first",), (), ("caf\xe9",), ()]


# -- scope["keyedlock"] after the request -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("options", [{}, {"server_timing": True}], ids=["fast", "general"])
async def test_scope_entry_made_for_the_request_is_dropped_an_outer_one_kept(
    fails: bool, options: dict[str, Any]
) -> None:
    lock = KeyedLock()
    seen: list[list[Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(list(scope["keyedlock"]))
        if fails:
            raise RuntimeError("app failed")
        await ok_app(scope, receive, send)

    middleware = KeyedLockMiddleware(app, key=keys.header("x-key"), lock=lock, **options)
    fresh = http_scope((b"x-key", b"alice"))
    outer_list: list[Any] = []
    nested = {**http_scope((b"x-key", b"bob")), "keyedlock": outer_list}
    for scope in (fresh, nested):
        try:
            await middleware(scope, receive, discard)
        except RuntimeError:
            assert fails
    assert [held.keys for [held] in seen] == [("alice",), ("bob",)]
    assert "keyedlock" not in fresh  # made for this request: gone with the hold
    assert nested["keyedlock"] is outer_list  # someone else's list: kept, our entry gone
    assert outer_list == []
    assert lock.stats().active_keys == 0
