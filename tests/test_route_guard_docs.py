"""Runs the examples of docs/per-route.md and checks what the page says about them."""

from __future__ import annotations

import anyio
import httpx
import pytest

from docs.examples import per_route_fastapi, per_route_handlers, per_route_starlette
from keyedlock_asgi import LockBusy
from tests.support.route_guard import (
    answer,
    assert_idle,
    client,
    expected,
    held_elsewhere,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def test_starlette_decorator_serializes_one_order(anyio_backend: str) -> None:
    example = per_route_starlette
    example.entered.clear()
    example.gate = anyio.Event()
    results: list[int] = []

    async def pay(order_id: int) -> None:
        results.append((await http.post(f"/orders/{order_id}/pay")).status_code)

    try:
        async with client(example.app) as http, anyio.create_task_group() as tg:
            tg.start_soon(pay, 1)
            await wait_until(lambda: example.entered == ["1 in"], 'example.entered == ["1 in"]')
            tg.start_soon(pay, 1)
            await wait_until(lambda: example.lock.waiting("1") == 1, "the second payment queued")
            example.gate.set()
    finally:
        example.gate = None
    assert example.entered == ["1 in", "1 out", "1 in", "1 out"]
    assert results == [200, 200]
    assert_idle(example.lock)


async def test_starlette_stream_and_route_middleware(anyio_backend: str) -> None:
    example = per_route_starlette
    async with client(example.app) as http:
        assert (await http.get("/exports/e1")).text == "row 0\nrow 1\nrow 2\n"
        async with held_elsewhere(example.lock, "e1"):
            busy = await http.get("/exports/e1")
        assert answer(busy) == expected(LockBusy())
        refund = await http.post("/orders/7/refund")
        assert refund.json() == {"refunded": 7}
    assert_idle(example.lock)


async def test_fastapi_examples(anyio_backend: str) -> None:
    example = per_route_fastapi
    async with client(example.app) as http:
        stock = await http.put("/products/3/stock", json={"quantity": 5})
        assert stock.json() == {"product_id": 3, "quantity": 5}
        assert (await http.post("/checkout", headers={"X-Cart-Id": "c1"})).status_code == 200
        assert (await http.post("/orders/abc/pay")).status_code == 422
        assert (await http.post("/orders/12/pay")).json() == {"paid": 12}
        signed_in = {"Authorization": "Bearer ann"}
        assert (await http.post("/wallet/withdraw", headers=signed_in)).json() == {"user": "ann"}
        assert (await http.post("/wallet/withdraw")).status_code == 422  # no header at all
        bad = await http.post("/wallet/withdraw", headers={"Authorization": "Basic x"})
        assert bad.status_code == 401
        async with held_elsewhere(example.lock, "user:ann"):
            busy = await http.post("/wallet/withdraw", headers=signed_in)
        assert answer(busy) == expected(LockBusy())  # this router: timeout=0
        first = (await http.post("/jobs/j/run")).json()["fencing_token"]
        second = (await http.post("/jobs/j/run")).json()["fencing_token"]
        assert second > first
    assert_idle(example.lock)


async def test_fastapi_openapi_is_the_endpoints_own(anyio_backend: str) -> None:
    schema = per_route_fastapi.app.openapi()["paths"]["/products/{product_id}/stock"]["put"]
    assert [p["name"] for p in schema["parameters"]] == ["product_id"]
    assert "requestBody" in schema


async def test_handler_example_renders_problem_json(anyio_backend: str) -> None:
    example = per_route_handlers
    async with client(example.app) as http:
        async with held_elsewhere(example.lock, "acct-1"):
            busy: httpx.Response = await http.post("/transfers", headers={"X-Account": "acct-1"})
        assert busy.status_code == 409
        assert busy.headers["content-type"] == "application/problem+json"
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["type"] == "/problems/request-in-progress"
        done = await http.post("/transfers", headers={"X-Account": "acct-1"})
        assert done.json() == {"status": "done"}
    assert_idle(example.lock)
