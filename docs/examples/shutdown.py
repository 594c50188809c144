"""Graceful shutdown: drain the lock in the app's lifespan (docs/middleware.md)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

# --8<-- [start:lifespan]
lock = KeyedLock(name="checkout", max_hold=30)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    # Shutdown: new requests now get 503 + Retry-After; the ones holding or queued finish.
    await lock.aclose(timeout=25)  # then close the lock engine's connections, if any


async def checkout(request: Request) -> JSONResponse:
    return JSONResponse({"charged": request.headers["x-user-id"]})


app = Starlette(
    routes=[Route("/checkout", checkout, methods=["POST"])],
    middleware=[Middleware(KeyedLockMiddleware, key=keys.header("X-User-Id"), lock=lock)],
    lifespan=lifespan,
)
# --8<-- [end:lifespan]
