"""A checkout app for the multi-process Redis tests, configured by environment variables.

KL_LOCK_URL  Redis the lock uses           KL_LOG_URL  Redis for the entry/exit log and balances
KL_NS        namespace of this test run    KL_LEASE    lease seconds (default 2)
KL_WORK_MS   time spent inside the lock    KL_BREAKER  breaker cooldown seconds (default 0.5)
KL_CLUSTER   "1": KL_LOCK_URL is a startup node of a Redis Cluster

Each request records `enter`/`exit` (with the log Redis's clock and the worker's pid) around a
read-modify-write of the user's balance, so any overlap of two same-user requests would both
show in the log and break the balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from keyedlock_asgi.backends.redis import RedisBackend

NS = os.environ.get("KL_NS", "checkout")
WORK = float(os.environ.get("KL_WORK_MS", "2")) / 1000
lock = KeyedLock(
    timeout=30,
    backend=RedisBackend.from_url(
        os.environ.get("KL_LOCK_URL", "redis://127.0.0.1:6379/0"),
        cluster=os.environ.get("KL_CLUSTER") == "1",
        namespace=NS,
        lease=float(os.environ.get("KL_LEASE", "2")),
        breaker_cooldown=float(os.environ.get("KL_BREAKER", "0.5")),
    ),
)
log: Any = None


# Append `<Redis time>|<entry>` in one round trip, stamped by the log Redis's clock.
RECORD = """
local now = redis.call('TIME')
local stamp = now[1] .. '.' .. string.format('%06d', now[2])
return redis.call('RPUSH', KEYS[1], stamp .. '|' .. ARGV[1])
"""


async def record(event: str, user: str, rid: str, token: int) -> None:
    entry = {"ev": event, "user": user, "rid": rid, "pid": os.getpid(), "token": token}
    await log.eval(RECORD, 1, f"{NS}:log", json.dumps(entry))


async def checkout(request: Request) -> Response:
    """Runs under KeyedLockMiddleware, which holds the X-User-Id key around the whole call."""
    user = request.headers["x-user-id"]
    token = request.scope["keyedlock"][0].token
    rid = uuid.uuid4().hex
    await record("enter", user, rid, token)
    balance = int(await log.get(f"{NS}:balance:{user}") or 0)
    await asyncio.sleep(WORK)
    await log.set(f"{NS}:balance:{user}", balance - 1)
    await record("exit", user, rid, token)
    return JSONResponse({"token": token, "pid": os.getpid()})


async def hold_forever(request: Request) -> Response:
    """Enter, say which process holds the key, and keep holding until killed."""
    user = request.headers["x-user-id"]
    await record("enter", user, uuid.uuid4().hex, request.scope["keyedlock"][0].token)
    await log.set(f"{NS}:holder:{user}", os.getpid())
    await asyncio.sleep(3600)
    return Response(status_code=204)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global log
    # Blocking pool: hundreds of concurrent requests per worker wait for a log connection
    # instead of failing with "Too many connections" (the plain pool's limit is 100).
    pool = aioredis.BlockingConnectionPool.from_url(
        os.environ.get("KL_LOG_URL", "redis://127.0.0.1:6379/0"), max_connections=100, timeout=60
    )
    log = aioredis.Redis.from_pool(pool)  # closes the pool with the client
    yield
    await lock.aclose()
    await log.aclose()


app = Starlette(
    routes=[
        Route("/checkout", checkout, methods=["POST"]),
        Route("/hold", hold_forever, methods=["POST"]),
    ],
    middleware=[Middleware(KeyedLockMiddleware, key=keys.header("X-User-Id"), lock=lock)],
    lifespan=lifespan,
)
