"""Runs docs/examples/idempotency.py: the app of docs/idempotency.md, on each store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from docs.examples import idempotency
from tests.support.engine_postgres import PG_DSN, require_postgres
from tests.support.engine_redis import REDIS_URL, require_redis

pytestmark = pytest.mark.anyio


def alice(key: str = "pay-1") -> dict[str, str]:
    return {"Authorization": "Bearer alice", "Idempotency-Key": key}


async def check_the_table(app: Any) -> None:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        first = await http.post("/charges", headers=alice(), json={"amount": 10})
        assert first.status_code == 201
        replay = await http.post("/charges", headers=alice(), json={"amount": 10})
        assert replay.content == first.content
        assert replay.headers["idempotent-replayed"] == "true"
        reused = await http.post("/charges", headers=alice(), json={"amount": 99})
        assert reused.status_code == 422
        bob = {"Authorization": "Bearer bob", "Idempotency-Key": "pay-1"}
        assert (await http.post("/charges", headers=bob, json={"amount": 10})).json()[
            "id"
        ] == "ch_2"
        missing = await http.post("/charges", headers={"Authorization": "Bearer alice"}, json={})
        assert missing.status_code == 400
    assert [charge["id"] for charge in app.state.charges] == ["ch_1", "ch_2"]


async def test_the_docs_app_in_memory() -> None:
    await check_the_table(idempotency.payments_app())


@pytest.fixture
def asyncio_only(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("redis-py and asyncpg are asyncio-only")


@pytest.fixture
async def redis_parts(asyncio_only: None) -> AsyncIterator[tuple[Any, Any]]:
    require_redis()
    store, lock = idempotency.redis_setup(REDIS_URL, f"test-docs-idem-{uuid.uuid4().hex[:12]}")
    yield store, lock
    await store.aclose()
    await lock.aclose()


async def test_the_docs_app_on_redis(redis_parts: tuple[Any, Any]) -> None:
    store, lock = redis_parts
    await check_the_table(idempotency.payments_app(store, lock))


@pytest.fixture
async def postgres_parts(asyncio_only: None) -> AsyncIterator[tuple[Any, Any]]:
    require_postgres()
    import asyncpg

    run = uuid.uuid4().hex[:12]
    table = f"kl_docs_idem_{run}"
    store, lock = idempotency.postgres_setup(PG_DSN, table, f"test-docs-idem-{run}")
    yield store, lock
    await store.aclose()
    await lock.aclose()
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.close()


async def test_the_docs_app_on_postgres(postgres_parts: tuple[Any, Any]) -> None:
    store, lock = postgres_parts
    await check_the_table(idempotency.payments_app(store, lock))
