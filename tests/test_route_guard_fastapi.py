"""FastAPI specifics of the per-route forms: signatures, OpenAPI, typed keys from dependencies,
router/app-level dependencies, and when FastAPI runs a dependency's exit code.

This module uses string annotations on purpose: FastAPI must still resolve the decorated
endpoints' annotations in this module's globals.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from keyedlock_asgi import Held, KeyedLock, keys
from tests.support.route_guard import assert_idle, client
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


class Payment(BaseModel):
    amount: int
    currency: str = "EUR"


class Receipt(BaseModel):
    order_id: int
    amount: int
    note: str | None


def settings(x_tenant: Annotated[str, Header()] = "main") -> str:
    return x_tenant


def build(lock: KeyedLock | None) -> FastAPI:
    """The same path operations, guarded by `lock` or (None) left alone."""
    app = FastAPI()

    def guard(endpoint: Any) -> Any:
        if lock is None:
            return endpoint
        return lock.serialize(keys.path_param("order_id"))(endpoint)

    @app.post("/orders/{order_id}/pay", response_model=Receipt)
    @guard
    async def pay(
        order_id: int,
        payment: Payment,
        tenant: Annotated[str, Depends(settings)],
        note: str | None = None,
    ) -> Receipt:
        return Receipt(order_id=order_id, amount=payment.amount, note=f"{tenant}:{note}")

    @app.get("/orders/{order_id}")
    @guard
    def show(order_id: int, verbose: bool = False) -> dict[str, Any]:
        return {"order_id": order_id, "thread": threading.current_thread().name}

    return app


async def test_decorated_path_operation_keeps_its_parameters_and_schema(
    anyio_backend: str,
) -> None:
    lock = KeyedLock()
    app = build(lock)
    assert app.openapi() == build(None).openapi()
    async with client(app) as http:
        response = await http.post(
            "/orders/7/pay?note=hi", json={"amount": 12}, headers={"x-tenant": "eu"}
        )
        assert response.json() == {"order_id": 7, "amount": 12, "note": "eu:hi"}
        invalid = await http.post("/orders/7/pay", json={"amount": "lots"})
        assert invalid.status_code == 422
        assert [error["loc"] for error in invalid.json()["detail"]] == [["body", "amount"]]
    assert_idle(lock)


async def test_sync_path_operation_runs_in_a_worker_thread_under_the_key(
    anyio_backend: str,
) -> None:
    lock = KeyedLock(timeout=0)
    app = build(lock)
    main_thread = threading.current_thread().name
    async with client(app) as http:
        response = await http.get("/orders/3")
        assert response.json()["order_id"] == 3
        assert response.json()["thread"] != main_thread
    assert_idle(lock)


def order_key(order_id: int) -> int:
    return order_id


async def test_typed_key_dependency_validates_before_any_lock(anyio_backend: str) -> None:
    lock = KeyedLock()
    acquired: list[tuple[str, ...]] = []
    app = FastAPI()

    @app.post(
        "/orders/{order_id}/pay",
        dependencies=[lock.depends(order_key, on_acquired=lambda s, h: acquired.append(h.keys))],
    )
    async def pay(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    async with client(app) as http:
        bad = await http.post("/orders/abc/pay")
        assert bad.status_code == 422
        assert acquired == []
        good = await http.post("/orders/007/pay")
        assert good.json() == {"order_id": 7}
    assert acquired == [("7",)]  # the typed value, not the raw path segment
    assert_idle(lock)


class User(BaseModel):
    id: int
    name: str


USERS = {"t-alice": User(id=1, name="alice"), "t-bob": User(id=2, name="bob")}


def current_user(x_token: Annotated[str, Header()]) -> User:
    user = USERS.get(x_token)
    if user is None:
        raise HTTPException(401, "who are you?")
    return user


def user_key(user: Annotated[User, Depends(current_user)]) -> str:
    return f"user:{user.id}"


async def test_user_key_from_an_auth_dependency(anyio_backend: str) -> None:
    lock = KeyedLock()
    log: list[str] = []
    inside = anyio.Event()
    go = anyio.Event()
    app = FastAPI()

    @app.post("/checkout", dependencies=[lock.depends(user_key)])
    async def checkout(
        user: Annotated[User, Depends(current_user)], x_name: Annotated[str, Header()]
    ) -> dict[str, str]:
        log.append(f"{x_name}:enter")
        if x_name == "alice-1":
            inside.set()
            await go.wait()
        log.append(f"{x_name}:exit")
        return {"user": user.name}

    async def run(name: str, token: str) -> None:
        response = await http.post("/checkout", headers={"x-token": token, "x-name": name})
        log.append(f"{name}:{response.status_code}")

    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(run, "alice-1", "t-alice")
        await inside.wait()
        tg.start_soon(run, "alice-2", "t-alice")
        await wait_until(lambda: lock.waiting("user:1") == 1, 'lock.waiting("user:1") == 1')
        await run("bob", "t-bob")  # another user is not held up
        await run("nobody", "t-nobody")  # 401 from the auth dependency, no lock involved
        go.set()
    assert log == [
        "alice-1:enter",
        "bob:enter",
        "bob:exit",
        "bob:200",
        "nobody:401",
        "alice-1:exit",
        "alice-1:200",
        "alice-2:enter",
        "alice-2:exit",
        "alice-2:200",
    ]
    assert_idle(lock)


async def test_router_and_app_level_dependencies(anyio_backend: str) -> None:
    lock = KeyedLock(timeout=0)
    by_tenant = lock.depends(keys.header("x-tenant"))
    app = FastAPI(dependencies=[lock.depends(keys.header("x-app-key"))])
    router = APIRouter(prefix="/stock", dependencies=[by_tenant])
    seen: list[bool] = []

    @router.put("/{sku}")
    async def put_stock(sku: str) -> dict[str, str]:
        seen.append(lock.locked("acme") and lock.locked("app-1"))
        return {"sku": sku}

    app.include_router(router)
    async with client(app) as http:
        headers = {"x-tenant": "acme", "x-app-key": "app-1"}
        assert (await http.put("/stock/a1", headers=headers)).status_code == 200
        assert seen == [True]
        async with anyio.create_task_group() as tg:
            taken = anyio.Event()
            done = anyio.Event()

            async def holder() -> None:
                async with lock.hold("acme"):
                    taken.set()
                    await done.wait()

            tg.start_soon(holder)
            await taken.wait()
            busy = await http.put("/stock/a1", headers=headers)
            done.set()
        assert busy.status_code == 409
    assert_idle(lock)


async def test_parameter_form_gives_the_hold(anyio_backend: str) -> None:
    lock = KeyedLock()
    app = FastAPI()

    @app.post("/jobs")
    async def job(held: Held | None = lock.depends(keys.header("x-job"))) -> dict[str, Any]:  # noqa: B008
        if held is None:
            return {"held": None}
        return {"held": list(held.keys), "token": held.token, "locked": lock.locked("j1")}

    async with client(app) as http:
        first = (await http.post("/jobs", headers={"x-job": "j1"})).json()
        second = (await http.post("/jobs", headers={"x-job": "j1"})).json()
        assert (await http.post("/jobs")).json() == {"held": None}
    assert first["held"] == ["j1"]
    assert first["locked"] is True
    assert second["token"] > first["token"]  # fencing tokens increase per key
    assert_idle(lock)


async def test_a_function_scoped_dependency_would_release_before_the_stream(
    anyio_backend: str,
) -> None:
    """The control for the streaming tests: FastAPI runs a `Depends(scope="function")` exit
    before the body is sent, so such a lock lets the next request in mid-stream. The
    streaming tests would catch `lock.depends` doing this."""
    lock = KeyedLock()
    log: list[str] = []
    streaming = anyio.Event()
    finish = anyio.Event()

    async def function_scoped(x_name: Annotated[str, Header()]) -> AsyncIterator[None]:
        async with lock.hold("k"):
            yield

    async def body(name: str) -> AsyncIterator[bytes]:
        log.append(f"{name}:stream-start")
        yield b"x"
        if name == "A":
            streaming.set()
            await finish.wait()
        log.append(f"{name}:stream-end")

    app = FastAPI()

    @app.post("/s", dependencies=[Depends(function_scoped, scope="function")])
    async def stream(x_name: Annotated[str, Header()], request: Request) -> StreamingResponse:
        log.append(f"{x_name}:enter")
        return StreamingResponse(body(x_name))

    async def run(name: str) -> None:
        await http.post("/s", headers={"x-name": name})

    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(run, "A")
        await streaming.wait()
        tg.start_soon(run, "B")
        await wait_until(
            lambda: lock.waiting("k") == 1 or "B:enter" in log,
            "B queued or in",
        )
        await wait_until(lambda: "B:stream-end" in log, '"B:stream-end" in log')
        finish.set()
    assert log.index("B:enter") < log.index("A:stream-end")
    assert_idle(lock)
