"""The examples of docs/idempotency.md (run by tests/test_docs_idempotency.py)."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import IdempotencyMiddleware, KeyedLock, keys
from keyedlock_asgi.stores import IdempotencyStore, MemoryStore


class TokenAuth(AuthenticationBackend):
    """Stands in for your authentication: `Authorization: Bearer <user>`."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        scheme, _, user = conn.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not user:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(user)


def payments_app(store: IdempotencyStore | None = None, lock: KeyedLock | None = None) -> Any:
    """A payments API whose POSTs are idempotent per user and Idempotency-Key."""
    charges: list[dict[str, Any]] = []

    async def create_charge(request: Request) -> JSONResponse:
        charge = {"id": f"ch_{len(charges) + 1}", **await request.json()}
        charges.append(charge)  # the side effect that must happen once
        return JSONResponse(charge, status_code=201)

    # --8<-- [start:app]
    app = Starlette(
        routes=[Route("/charges", create_charge, methods=["POST"])],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenAuth()),  # sets scope["user"]
            Middleware(
                IdempotencyMiddleware,
                # The user AND the header: one user can never replay another's response.
                key=keys.combine(keys.user(), keys.header("Idempotency-Key")),
                store=store or MemoryStore(),  # one process; see below for several workers
                lock=lock,  # None: in-process
                methods=["POST", "PATCH"],
                ttl=24 * 3600,  # seconds a completed response is kept
                max_response_body=1 << 20,  # larger ones are not kept: retries get 409
                on_missing_key="reject",  # 400 without the header
            ),
        ],
    )
    # --8<-- [end:app]
    app.state.charges = charges
    return app


def redis_setup(url: str, namespace: str) -> tuple[IdempotencyStore, KeyedLock]:
    # --8<-- [start:redis]
    from keyedlock_asgi.backends.redis import RedisBackend
    from keyedlock_asgi.stores import RedisStore

    store = RedisStore.from_url(url, namespace=f"{namespace}:idem")
    lock = KeyedLock(backend=RedisBackend.from_url(url, namespace=namespace, lease=30))
    # --8<-- [end:redis]
    return store, lock


def postgres_setup(dsn: str, table: str, namespace: str) -> tuple[IdempotencyStore, KeyedLock]:
    # --8<-- [start:postgres]
    from keyedlock_asgi.backends.postgres import PostgresBackend
    from keyedlock_asgi.stores import PostgresStore

    store = PostgresStore.from_dsn(dsn, table=table, namespace=namespace)  # created on first use
    lock = KeyedLock(backend=PostgresBackend.from_dsn(dsn, namespace=namespace, lease=30))
    # --8<-- [end:postgres]
    return store, lock
