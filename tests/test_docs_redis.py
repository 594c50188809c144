"""The code examples of docs/redis.md run against a real Redis and do what the page says."""

from __future__ import annotations

import importlib
import uuid

import anyio
import httpx
import pytest

from tests.support.engine_redis import REDIS_URL, require_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the Redis backend is asyncio-only


async def test_fencing_example_refuses_the_stale_writer() -> None:
    require_redis()
    example = importlib.import_module("docs.examples.redis_fencing")
    outcome = await example.demo(REDIS_URL, f"test-{uuid.uuid4().hex[:12]}")
    assert outcome == {"b": True, "a": False, "kept_b": True}


async def test_app_example_serializes_checkouts_per_user() -> None:
    require_redis()
    example = importlib.import_module("docs.examples.redis_app")
    example.lock.backend.namespace = f"test-{uuid.uuid4().hex[:12]}"
    transport = httpx.ASGITransport(app=example.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        answers = []

        async def checkout(user: str) -> None:
            answers.append(await http.post("/checkout", headers={"x-user-id": user}))

        async with anyio.create_task_group() as tg:
            for user in ("alice", "alice", "bob"):
                tg.start_soon(checkout, user)
    assert sorted(a.json()["user"] for a in answers) == ["alice", "alice", "bob"]
    alice = sorted(a.json()["token"] for a in answers if a.json()["user"] == "alice")
    assert alice[0] < alice[1]
    assert example.lock.stats().active_keys == 0
    await example.lock.aclose()
