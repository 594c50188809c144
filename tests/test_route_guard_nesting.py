"""Layers on one request: a key an outer layer holds is not taken again; other keys are.
Plus the Starlette specifics of the decorator (sync endpoints, HTTPEndpoint, misuse)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.from_thread
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from tests.support.route_guard import FORMS, assert_idle, build_app, client

pytestmark = pytest.mark.anyio


def snapshot(lock: KeyedLock, request: Request) -> JSONResponse:
    """What the endpoint sees: which layers hold which keys, and the lock's totals."""
    layers = [list(held.keys) for held in request.scope.get("keyedlock", [])]
    return JSONResponse({"layers": layers, "holders": lock.stats().holders})


@pytest.mark.parametrize("form", FORMS)
async def test_key_held_by_outer_middleware_is_not_taken_again(
    anyio_backend: str, form: str
) -> None:
    lock = KeyedLock(timeout=0)

    async def endpoint(request: Request) -> Response:
        return snapshot(lock, request)

    outer = Middleware(KeyedLockMiddleware, lock=lock, key=keys.header("x-user"))
    app = build_app(form, lock, endpoint, key=keys.header("x-key"), middleware=[outer])
    async with client(app) as http:
        same = await http.post("/items/1", headers={"x-user": "u1", "x-key": "u1"})
        other = await http.post("/items/1", headers={"x-user": "u1", "x-key": "order-9"})
    assert same.json() == {"layers": [["u1"]], "holders": 1}  # no deadlock, no re-entry error
    assert other.json() == {"layers": [["u1"], ["order-9"]], "holders": 2}
    assert_idle(lock)


async def test_another_lock_with_the_same_key_is_taken(anyio_backend: str) -> None:
    outer_lock = KeyedLock()
    inner_lock = KeyedLock()

    @inner_lock.serialize(keys.header("x-key"))
    async def endpoint(request: Request) -> Response:
        return JSONResponse([inner_lock.locked("k"), outer_lock.locked("k")])

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(KeyedLockMiddleware, lock=outer_lock, key=keys.header("x-key"))],
    )
    async with client(app) as http:
        assert (await http.get("/", headers={"x-key": "k"})).json() == [True, True]
    assert_idle(outer_lock)
    assert_idle(inner_lock)


async def test_router_dependency_and_route_decorator_on_the_same_key(anyio_backend: str) -> None:
    lock = KeyedLock(timeout=0)
    router = APIRouter(dependencies=[lock.depends(keys.header("x-key"))])

    @router.post("/nested")
    @lock.serialize(keys.header("x-key"))
    async def nested(request: Request) -> Response:
        return snapshot(lock, request)

    app = FastAPI()
    app.include_router(router)
    async with client(app) as http:
        response = await http.post("/nested", headers={"x-key": "k"})
    assert response.json() == {"layers": [["k"]], "holders": 1}
    assert_idle(lock)


async def test_sync_starlette_endpoint_runs_in_a_thread_under_the_key(anyio_backend: str) -> None:
    lock = KeyedLock()
    main = threading.current_thread().name

    @lock.serialize(keys.path_param("name"))
    def hello(request: Request) -> Response:
        async def holders_now() -> int:
            return lock.stats().holders

        holders = anyio.from_thread.run(holders_now)
        return JSONResponse({"locked": holders, "thread": threading.current_thread().name != main})

    app = Starlette(routes=[Route("/hello/{name}", hello)])
    async with client(app) as http:
        assert (await http.get("/hello/x")).json() == {"locked": 1, "thread": True}
    assert_idle(lock)


async def test_http_endpoint_method(anyio_backend: str) -> None:
    lock = KeyedLock()

    class Order(HTTPEndpoint):
        @lock.serialize(keys.path_param("order_id"))
        async def post(self, request: Request) -> Response:
            return JSONResponse({"held": lock.locked(request.path_params["order_id"])})

    app = Starlette(routes=[Route("/orders/{order_id}", Order)])
    async with client(app) as http:
        assert (await http.post("/orders/5")).json() == {"held": True}
    assert_idle(lock)


async def test_calling_a_serialized_endpoint_without_a_request_is_a_clear_error(
    anyio_backend: str,
) -> None:
    lock = KeyedLock()

    @lock.serialize("k")
    async def endpoint(order_id: int) -> Any:
        return order_id

    with pytest.raises(TypeError, match=r"lock\.serialize"):
        await endpoint(3)


@pytest.mark.anyio
async def test_cancelled_inside_on_acquired_hook_strands_no_key() -> None:
    """Regression: a cancellation while an async on_acquired hook runs released nothing."""
    lock = KeyedLock()
    in_hook = anyio.Event()

    async def on_acquired(scope: object, held: object) -> None:
        in_hook.set()
        await anyio.sleep_forever()  # a slow metrics call

    @lock.serialize(keys.header("x-k"), on_acquired=on_acquired)
    async def pay(request: Request) -> Response:
        return Response("ok")

    app = Starlette(routes=[Route("/pay", pay, methods=["POST"])])
    scope = {
        "type": "http", "method": "POST", "path": "/pay", "root_path": "", "scheme": "http",
        "server": ("t", 80), "headers": [(b"x-k", b"A")], "query_string": b"",
    }  # fmt: skip

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: object) -> None:
        pass

    request_scope = anyio.CancelScope()

    async def request() -> None:
        with request_scope:
            await app(scope, receive, send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        await in_hook.wait()
        request_scope.cancel()
    assert lock.stats().active_keys == 0
    assert scope.get("keyedlock", []) == []
