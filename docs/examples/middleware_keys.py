"""Choosing the key: a user id header, else the authenticated user, else the client address."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLockMiddleware, keys


async def tenant_of(scope: Any) -> str | None:
    """Any callable works, sync or async; here, a made-up lookup from a header."""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return "tenant-" + value.decode("latin-1")[:8]
    return None


async def checkout(request: Request) -> PlainTextResponse:
    return PlainTextResponse(", ".join(h.keys[0] for h in request.scope.get("keyedlock", [])))


app = Starlette(
    routes=[Route("/checkout", checkout, methods=["POST"])],
    middleware=[
        Middleware(
            KeyedLockMiddleware,
            key=keys.combine(
                tenant_of,
                keys.first(keys.header("X-User-Id"), keys.cookie("session"), keys.client_ip()),
            ),
        )
    ],
)
