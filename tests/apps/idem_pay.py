"""A payment app for the multi-worker idempotency tests (uvicorn imports it once per process).

IDEM_ENGINE  "redis" or "postgres": the lock engine, the store and where runs are counted
IDEM_NS      namespace of this test run (lock namespace, store namespace/table, counter names)
IDEM_URL     Redis URL or PostgreSQL DSN      IDEM_LEASE  lock lease seconds (default 2)
IDEM_WORK_MS time the endpoint spends after counting its run (default 5)
IDEM_HANG    "1": the endpoint counts its run, says so, then never answers (to be SIGKILLed)

Each run of the endpoint is counted in the database before anything else, so "ran once" is
read from the engine, not from the responses. The response carries the worker's pid and a
random id, so a replay from another worker is recognisably the first run's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyedlock_asgi import IdempotencyMiddleware, KeyedLock
from keyedlock_asgi.stores import IdempotencyStore

ENGINE = os.environ.get("IDEM_ENGINE", "redis")
NS = os.environ["IDEM_NS"]
URL = os.environ["IDEM_URL"]
LEASE = float(os.environ.get("IDEM_LEASE", "2"))
WORK = float(os.environ.get("IDEM_WORK_MS", "5")) / 1000
HANG = os.environ.get("IDEM_HANG") == "1"

counter: Any = None  # a Redis client or an asyncpg pool, opened in lifespan
store: IdempotencyStore
if ENGINE == "redis":
    import redis.asyncio as aioredis

    from keyedlock_asgi.backends.redis import RedisBackend
    from keyedlock_asgi.stores import RedisStore

    lock = KeyedLock(backend=RedisBackend.from_url(URL, namespace=NS, lease=LEASE))
    store = RedisStore.from_url(URL, namespace=f"{NS}:idem")
else:
    import asyncpg

    from keyedlock_asgi.backends.postgres import PostgresBackend
    from keyedlock_asgi.stores import PostgresStore

    lock = KeyedLock(backend=PostgresBackend.from_dsn(URL, namespace=NS, lease=LEASE))
    store = PostgresStore.from_dsn(URL, table=f"{NS}_idem", namespace=NS, pool_size=2)


async def count_run(key: str) -> None:
    if ENGINE == "redis":
        await counter.rpush(f"{NS}:runs", f"{key}|{os.getpid()}")
    else:
        await counter.execute(f"INSERT INTO {NS}_runs (key, pid) VALUES ($1, $2)", key, os.getpid())


async def pay(request: Request) -> Response:
    key = request.headers["idempotency-key"]
    body = await request.json()
    await count_run(key)
    if HANG:
        await asyncio.sleep(3600)  # killed here, its run counted and nothing answered
    await asyncio.sleep(WORK)
    payment = {"key": key, "amount": body["amount"], "pid": os.getpid(), "id": uuid.uuid4().hex}
    return JSONResponse(payment, status_code=201, headers={"x-payment-id": payment["id"]})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global counter
    if ENGINE == "redis":
        counter = aioredis.Redis.from_url(URL)
    else:
        counter = await asyncpg.create_pool(URL, min_size=1, max_size=2)
    yield
    await store.aclose()
    await lock.aclose()
    await (counter.aclose() if ENGINE == "redis" else counter.close())


app = Starlette(
    routes=[Route("/pay", pay, methods=["POST"])],
    middleware=[Middleware(IdempotencyMiddleware, store=store, lock=lock)],
    lifespan=lifespan,
)
