"""Security: key by the authenticated user, bound the queue, never trust a client's key.

(docs/security.md)
"""

from __future__ import annotations

import anyio
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

TOKENS = {"token-alice": "alice", "token-bob": "bob"}  # your session or token store
gate: anyio.Event | None = None  # for the test: hold requests inside


class TokenAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        user = TOKENS.get(conn.headers.get("authorization", "").removeprefix("Bearer "))
        return None if user is None else (AuthCredentials(["authenticated"]), SimpleUser(user))


async def withdraw(request: Request) -> JSONResponse:
    if gate is not None and request.user.identity == "alice":
        await gate.wait()
    return JSONResponse({"user": request.user.display_name})


# --8<-- [start:app]
lock = KeyedLock(
    key_prefix="withdraw:",  # its own namespace: other features' keys never collide with these
    timeout=10.0,  # nobody waits forever: 503 + Retry-After
    max_waiting=5,  # at most 5 queued per user: 429 + Retry-After beyond
)
app = Starlette(
    routes=[Route("/withdraw", withdraw, methods=["POST"])],
    middleware=[
        Middleware(AuthenticationMiddleware, backend=TokenAuth()),  # outer: runs first
        Middleware(
            KeyedLockMiddleware,
            key=keys.user(),  # the authenticated identity, not a header the client chose
            lock=lock,
            on_missing_key="reject",  # not authenticated: 400, never unlocked
        ),
    ],
)
# --8<-- [end:app]
