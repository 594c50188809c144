"""Several workers: the checkout app under `uvicorn --workers 4`, locked through Redis.

Each worker process has its own memory, so an in-process lock cannot see the other workers'
requests. With the Redis backend, same-user checkouts run one at a time across every worker
(in-process queue first, then Redis). The shop's state lives in Redis too, shared by all.

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.multi_worker_redis:app --workers 4
    for i in $(seq 20); do curl -s -X POST -H 'X-User-Id: alice' localhost:8000/checkout & done
"""

from __future__ import annotations

import os

import anyio
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from keyedlock_asgi.backends.redis import RedisBackend

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("SHOP_NAMESPACE", "shop")  # lock keys and shop data live under it
PRICE = 100


def shop_app(redis: Redis, namespace: str) -> Starlette:
    """The checkout of examples/checkout.py, with balances and orders kept in Redis."""

    async def checkout(request: Request) -> JSONResponse:
        user = request.headers["x-user-id"]
        balance = int(await redis.get(f"{namespace}:balance:{user}") or 0)
        if balance < PRICE:
            return JSONResponse({"detail": "insufficient funds"}, status_code=402)
        await anyio.sleep(0.01)  # the payment provider
        await redis.decrby(f"{namespace}:balance:{user}", PRICE)
        order = await redis.incr(f"{namespace}:orders:{user}")
        return JSONResponse({"order": order, "worker": os.getpid()}, status_code=201)

    return Starlette(routes=[Route("/checkout", checkout, methods=["POST"])])


def build(redis_url: str = REDIS_URL, namespace: str = NAMESPACE) -> tuple[ASGIApp, KeyedLock]:
    """One worker's app and lock (uvicorn imports this module once per worker)."""
    # --8<-- [start:lock]
    lock = KeyedLock(
        backend=RedisBackend.from_url(redis_url, lease=30.0, namespace=namespace),
        timeout=10.0,  # then 503 + Retry-After
        max_waiting=50,  # per key, per worker
    )  # Redis unreachable: 503 + Retry-After (fail closed, the default)
    app = KeyedLockMiddleware(
        shop_app(Redis.from_url(redis_url), namespace), key=keys.header("X-User-Id"), lock=lock
    )
    # --8<-- [end:lock]
    return app, lock


app, lock = build()
