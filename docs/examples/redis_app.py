"""One checkout at a time per user across every worker process and host, through Redis."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from keyedlock_asgi.backends.redis import LeaseLost, RedisBackend


def report_lost_lease(event: LeaseLost) -> None:
    # Wire this to your alerting: another process may have run with the same key.
    print(f"lease lost: {event.reason} after {event.held_for:.1f} s (token {event.token})")


lock = KeyedLock(
    timeout=10.0,  # wait at most 10 s for the key, then 503 + Retry-After
    backend=RedisBackend.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        namespace="shop",  # several apps can share one Redis
        lease=30.0,  # a crashed or frozen worker keeps the key at most this long
        max_hold=300.0,  # stop renewing after 5 minutes, whatever the request does
        on_lease_lost=report_lost_lease,
    ),
)


async def checkout(request: Request) -> JSONResponse:
    held = request.scope["keyedlock"][-1]
    # Pass held.token with every write to the resource you protect (see "Fencing tokens").
    return JSONResponse({"user": held.keys[0], "token": held.token})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield  # connections open lazily in each worker, after the fork
    await lock.aclose()  # releases open holds, closes the worker's connections


app = Starlette(
    routes=[Route("/checkout", checkout, methods=["POST"])],
    middleware=[Middleware(KeyedLockMiddleware, key=keys.header("X-User-Id"), lock=lock)],
    lifespan=lifespan,
)
