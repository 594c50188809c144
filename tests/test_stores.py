"""The idempotency stores on their real engines: Redis and PostgreSQL (asyncio-only drivers).

MemoryStore's own tests are in test_idempotency.py (it runs on asyncio and trio).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from keyedlock_asgi.stores import StoredResponse
from tests.support.engine_postgres import PG_DSN, require_postgres
from tests.support.engine_redis import REDIS_URL, require_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def entry(body: bytes | None = b"body", fingerprint: str = "f") -> StoredResponse:
    return StoredResponse(fingerprint, 201, ((b"content-type", b"application/json"),), body)


# -- Redis -------------------------------------------------------------------------------------


@pytest.fixture
async def redis_ns() -> AsyncIterator[str]:
    require_redis()
    import redis.asyncio as aioredis

    ns = f"test-store-{uuid.uuid4().hex[:12]}"
    yield ns
    client = aioredis.Redis.from_url(REDIS_URL)
    names = [name async for name in client.scan_iter(match=f"{ns}*")]
    if names:
        await client.delete(*names)
    await client.aclose()


async def test_redis_store_round_trip_keeps_first_and_namespaces(redis_ns: str) -> None:
    from keyedlock_asgi.stores import RedisStore

    store = RedisStore.from_url(REDIS_URL, namespace=redis_ns)
    other = RedisStore.from_url(REDIS_URL, namespace=redis_ns + "-other")
    try:
        assert await store.get("k") is None
        await store.put("k", entry(b"first"), ttl=60)
        await store.put("k", entry(b"second"), ttl=60)
        assert await store.get("k") == entry(b"first")
        await store.put("not-kept", entry(None), ttl=60)
        assert (await store.get("not-kept")) == entry(None)
        assert await other.get("k") is None
    finally:
        await store.aclose()
        await other.aclose()


async def test_redis_store_expiry_is_redis_own(redis_ns: str) -> None:
    import redis.asyncio as aioredis

    from keyedlock_asgi.stores import RedisStore

    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisStore(client, namespace=redis_ns)
    try:
        await store.put("day", entry(), ttl=86_400)
        assert 86_000_000 < await client.pttl(store.redis_key("day")) <= 86_400_000
        await store.put("brief", entry(), ttl=0.05)
        with anyio.fail_after(10):  # Redis deletes it: nobody sweeps
            while await client.exists(store.redis_key("brief")):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert await store.get("brief") is None
    finally:
        await store.aclose()  # a client we gave is not closed by the store
        assert await client.ping()
        await client.aclose()


async def test_redis_store_refuses_a_decoding_client(redis_ns: str) -> None:
    import redis.asyncio as aioredis

    from keyedlock_asgi.stores import RedisStore

    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    store = RedisStore(client, namespace=redis_ns)
    try:
        await store.put("k", entry(), ttl=60)
        with pytest.raises(TypeError, match="decode_responses"):
            await store.get("k")
    finally:
        await client.aclose()


# -- PostgreSQL --------------------------------------------------------------------------------


async def _fetch(sql: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
async def pg_table() -> AsyncIterator[str]:
    require_postgres()
    table = f"kl_idem_{uuid.uuid4().hex[:12]}"
    yield table
    await _fetch(f"DROP TABLE IF EXISTS {table}")


async def test_postgres_store_creates_its_table_once_under_concurrent_first_use(
    pg_table: str,
) -> None:
    from keyedlock_asgi.stores import PostgresStore

    stores = [PostgresStore.from_dsn(PG_DSN, table=pg_table, pool_size=1) for _ in range(4)]
    try:
        async with anyio.create_task_group() as tg:  # four workers starting at once
            for n, store in enumerate(stores):
                tg.start_soon(store.put, f"k{n}", entry(), 60.0)
        for n, store in enumerate(stores):
            assert await store.get(f"k{n}") == entry()
        await stores[0].put("k0", entry(b"second"), 60.0)
        assert await stores[1].get("k0") == entry()  # the first is kept
    finally:
        for store in stores:
            await store.aclose()


async def test_postgres_store_hides_expired_rows_and_deletes_them_on_write(pg_table: str) -> None:
    from keyedlock_asgi.stores import PostgresStore

    store = PostgresStore(PG_DSN, table=pg_table, namespace="ns", cleanup_batch=100)
    other = PostgresStore(PG_DSN, table=pg_table, namespace="other")
    try:
        await store.put("live", entry(), 3600.0)
        assert await other.get("live") is None  # namespaces are apart
        await _fetch(
            f"INSERT INTO {pg_table} (key, entry, expires_at) "
            "SELECT 'ns:old' || n, '\\x00'::bytea, now() - interval '1 hour' "
            "FROM generate_series(1, 250) n"
        )
        assert await store.get("old1") is None  # expired: invisible at once
        await store.put("old1", entry(b"again"), 3600.0)  # an expired key can be used again
        assert await store.get("old1") == entry(b"again")
        count = f"SELECT count(*) AS n FROM {pg_table} WHERE expires_at <= now()"
        # One bounded batch of 100 per write (old1 itself was deleted or replaced).
        assert (await _fetch(count))[0]["n"] in (149, 150)
        for n in range(3):
            await store.put(f"more{n}", entry(), 3600.0)
        assert (await _fetch(count))[0]["n"] == 0
        await store.put("brief", entry(), 0.05)
        with anyio.fail_after(10):
            while await store.get("brief") is not None:  # noqa: ASYNC110 - the server's clock
                await anyio.sleep(0.01)
    finally:
        await store.aclose()
        await other.aclose()


def test_postgres_store_checks_its_table_name() -> None:
    pytest.importorskip("asyncpg")
    from keyedlock_asgi.stores import PostgresStore

    with pytest.raises(ValueError, match="identifier"):
        PostgresStore(PG_DSN, table="x; DROP TABLE users")


# -- importing -------------------------------------------------------------------------------


def test_stores_import_without_redis_or_asyncpg() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None
        sys.modules["asyncpg"] = None
        from keyedlock_asgi import IdempotencyMiddleware
        from keyedlock_asgi.stores import MemoryStore
        MemoryStore()
        try:
            from keyedlock_asgi.stores import RedisStore
        except ImportError as exc:
            assert "keyedlock_asgi[redis]" in str(exc), exc
        else:
            raise AssertionError("RedisStore imported without redis")
        try:
            from keyedlock_asgi.stores import PostgresStore
        except ImportError as exc:
            assert "keyedlock_asgi[postgres]" in str(exc), exc
        else:
            raise AssertionError("PostgresStore imported without asyncpg")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
