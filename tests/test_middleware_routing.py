"""Keys from path params before routing (Mount, include_router, raw ASGI) and from auth."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.routing import Mount, Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from tests.support.middleware import Gated, client
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def assert_serialized(
    app: Any,
    gated: Gated,
    lock: KeyedLock,
    key: str,
    same: tuple[str, str],
    other: str,
    **client_options: Any,
) -> None:
    """`same` paths share `key` (run one after the other); `other` runs beside them."""
    async with client(app, **client_options) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.post(same[0], params={"n": "s1"}))
        await gated.entered("s1").wait()
        tg.start_soon(lambda: http.post(same[1], params={"n": "s2"}))
        await wait_until(lambda: lock.waiting(key) == 1, "second same-key request queued")
        tg.start_soon(lambda: http.post(other, params={"n": "o"}))
        await gated.entered("o").wait()  # other key: inside while s1 holds its key
        for name in ("s2", "o", "s1"):
            gated.gate(name).set()
    log = gated.log
    assert log.index(("in", "s2")) > log.index(("out", "s1"))
    assert log.index(("in", "o")) < log.index(("out", "s1"))
    assert gated.calls == 3
    assert lock.stats().active_keys == 0


async def test_starlette_mount_with_route_templates() -> None:
    lock, gated = KeyedLock(), Gated()
    app = Starlette(
        routes=[
            Mount(
                "/api",
                routes=[Route("/orders/{order_id:int}/pay", gated.endpoint, methods=["POST"])],
            )
        ],
        middleware=[
            Middleware(
                KeyedLockMiddleware,
                lock=lock,
                key=keys.path_param("order_id"),
                include=["/api/orders/{order_id:int}/pay"],
                methods=["POST"],
            )
        ],
    )
    await assert_serialized(
        app, gated, lock, "7", ("/api/orders/007/pay", "/api/orders/7/pay"), "/api/orders/8/pay"
    )


async def test_starlette_route_middleware_reads_router_path_params() -> None:
    lock, gated = KeyedLock(), Gated()
    guard = Middleware(KeyedLockMiddleware, lock=lock, key=keys.path_param("order_id"))
    app = Starlette(
        routes=[
            Mount(
                "/api",
                routes=[
                    Route(
                        "/orders/{order_id:int}/pay",
                        gated.endpoint,
                        methods=["POST"],
                        middleware=[guard],
                    )
                ],
            )
        ]
    )
    await assert_serialized(
        app, gated, lock, "7", ("/api/orders/7/pay", "/api/orders/07/pay"), "/api/orders/9/pay"
    )


async def test_fastapi_include_router_with_route_templates() -> None:
    lock, gated = KeyedLock(), Gated()
    router = APIRouter(prefix="/orders")

    @router.post("/{order_id}/pay")
    async def pay(order_id: int, request: Request) -> Any:
        return await gated.endpoint(request)

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.add_middleware(
        KeyedLockMiddleware,
        lock=lock,
        key=keys.path_param("order_id"),
        include=["/v1/orders/{order_id:int}/pay"],
    )
    await assert_serialized(
        app, gated, lock, "5", ("/v1/orders/5/pay", "/v1/orders/005/pay"), "/v1/orders/6/pay"
    )


async def test_raw_asgi_app_with_route_templates_and_root_path() -> None:
    lock, gated = KeyedLock(), Gated()

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await gated.endpoint(Request(scope, receive))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = KeyedLockMiddleware(
        raw,
        lock=lock,
        key=keys.combine(keys.path_param("shop"), keys.path_param("sku")),
        include=["/shops/{shop}/items/{sku:path}"],
    )
    await assert_serialized(
        app,
        gated,
        lock,
        "s1:a/b",
        ("/prefix/shops/s1/items/a/b", "/prefix/shops/s1/items/a/b"),
        "/prefix/shops/s2/items/a/b",
        root_path="/prefix",
    )


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("authorization")
        return None if name is None else (AuthCredentials(["user"]), SimpleUser(name))


async def test_user_key_with_authentication_middleware_outside() -> None:
    lock, gated = KeyedLock(), Gated()
    app = Starlette(
        routes=[Route("/", gated.endpoint, methods=["POST"])],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
            Middleware(KeyedLockMiddleware, lock=lock, key=keys.user()),
        ],
    )
    answers: dict[str, Any] = {}
    async with client(app) as http, anyio.create_task_group() as tg:

        async def call(name: str, user: str | None) -> None:
            headers = {} if user is None else {"authorization": user}
            answers[name] = await http.post("/", params={"n": name}, headers=headers)

        tg.start_soon(call, "a1", "alice")
        await gated.entered("a1").wait()
        tg.start_soon(call, "a2", "alice")
        await wait_until(lambda: lock.waiting("alice") == 1, "alice's second request queued")
        tg.start_soon(call, "anon", None)  # unauthenticated: no key, passes through
        await gated.entered("anon").wait()
        for name in ("a2", "anon", "a1"):
            gated.gate(name).set()
    assert gated.log.index(("in", "a2")) > gated.log.index(("out", "a1"))
    assert answers["anon"].json()["held"] == []
    assert answers["a2"].json()["held"][0]["keys"] == ["alice"]
    assert lock.stats().active_keys == 0
