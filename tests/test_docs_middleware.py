"""The code examples of docs/middleware.md and docs/keys.md run and do what the pages say."""

from __future__ import annotations

import importlib

import anyio
import pytest

from tests.support.middleware import client

pytestmark = pytest.mark.anyio


async def test_payments_example_serializes_per_order(capsys: pytest.CaptureFixture[str]) -> None:
    example = importlib.import_module("docs.examples.middleware_payments")
    example.charges.clear()
    async with client(example.app) as http:
        async with anyio.create_task_group() as tg:
            for order in ("007", "7", "8"):
                tg.start_soon(http.post, f"/orders/{order}/pay")
        answer = await http.post("/orders/7/pay")
        assert answer.status_code == 200
        assert answer.json()["charges"] == 3
        assert answer.headers["server-timing"].startswith("keyedlock;dur=")
        assert (await http.get("/orders/7/pay")).status_code == 405  # GET is not locked
    assert example.charges == {7: 3, 8: 1}
    assert example.lock.stats().active_keys == 0


async def test_keys_example_combines_tenant_and_user() -> None:
    example = importlib.import_module("docs.examples.middleware_keys")
    async with client(example.app) as http:
        by_user = await http.post("/checkout", headers={"x-api-key": "abc", "x-user-id": "alice"})
        by_cookie = await http.post(
            "/checkout", headers={"x-api-key": "abc", "cookie": "session=s1"}
        )
        by_ip = await http.post("/checkout", headers={"x-api-key": "abc"})
        no_tenant = await http.post("/checkout", headers={"x-user-id": "alice"})
    assert by_user.text == "tenant-abc:alice"
    assert by_cookie.text == "tenant-abc:s1"
    assert by_ip.text == "tenant-abc:127.0.0.1"
    assert no_tenant.text == ""  # no key: passed straight through, nothing held


async def test_observability_example_counts_events() -> None:
    example = importlib.import_module("docs.examples.observability_hooks")
    example.metrics.clear()
    async with client(example.app) as http:
        assert (await http.post("/", headers={"x-user-id": "alice"})).status_code == 200
        assert (await http.post("/")).status_code == 400
    assert example.metrics == {"acquired": 1, "released": 1, "rejected.missing_key": 1}
