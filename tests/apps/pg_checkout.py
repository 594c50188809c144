"""A checkout app for the multi-worker PostgreSQL tests (uvicorn imports it once per worker).

Configured by environment variables: PG_DSN, PG_NAMESPACE (lock namespace), PG_TABLE (the
balance table; its event log is PG_TABLE_log), PG_LEASE (seconds). The endpoint reads the
balance, awaits, then writes it back: without the lock, concurrent checkouts lose updates.
Every critical section writes `enter`/`exit` rows to the log table (a bigserial orders them
across workers), and a lost lease writes `lost`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from keyedlock_asgi.backends.postgres import LeaseLost, PostgresBackend

DSN = os.environ["PG_DSN"]
NAMESPACE = os.environ["PG_NAMESPACE"]
TABLE = os.environ["PG_TABLE"]
LEASE = float(os.environ.get("PG_LEASE", "30"))

_data: dict[str, Any] = {}


async def data_pool() -> Any:
    """The app's own connections (the lock's pool is separate and never shared)."""
    pool = _data.get("pool")
    if pool is None:
        pool = _data["pool"] = await asyncpg.create_pool(DSN, min_size=1, max_size=4)
    return pool


async def log(request_id: str, event: str, token: int) -> None:
    pool = await data_pool()
    await pool.execute(
        f"INSERT INTO {TABLE}_log (request, event, worker, token) VALUES ($1, $2, $3, $4)",
        request_id,
        event,
        os.getpid(),
        token,
    )


def token_of(request: Request) -> int:
    return int(request.scope["keyedlock"][0].token)


async def checkout(request: Request) -> JSONResponse:
    request_id = request.headers["x-request-id"]
    token = token_of(request)
    await log(request_id, "enter", token)
    pool = await data_pool()
    balance = await pool.fetchval(f"SELECT balance FROM {TABLE} WHERE id = 1")
    await asyncio.sleep(0.001)  # the payment provider: other checkouts would slip in here
    await pool.execute(f"UPDATE {TABLE} SET balance = $1 WHERE id = 1", balance - 1)
    await log(request_id, "exit", token)
    return JSONResponse({"worker": os.getpid(), "token": token})


async def hold(request: Request) -> JSONResponse:
    """Hold the key until the test inserts a `go` row for this request (a holder to fault)."""
    request_id = request.headers["x-request-id"]
    token = token_of(request)
    await log(request_id, "enter", token)
    pool = await data_pool()
    while not await pool.fetchval(  # noqa: ASYNC110 - the signal lives in another process
        f"SELECT count(*) FROM {TABLE}_log WHERE request = $1 AND event = 'go'", request_id
    ):
        await asyncio.sleep(0.02)
    await log(request_id, "exit", token)
    return JSONResponse({"worker": os.getpid(), "token": token})


def lease_lost(event: LeaseLost) -> None:
    """Tell the test, through the shared log, that this worker's hold was lost."""
    task = asyncio.get_running_loop().create_task(log(f"lost:{event.key}", "lost", event.token))
    _data.setdefault("tasks", set()).add(task)
    task.add_done_callback(_data["tasks"].discard)


lock = KeyedLock(
    backend=PostgresBackend.from_dsn(
        DSN, namespace=NAMESPACE, lease=LEASE, on_lease_lost=lease_lost
    ),
    timeout=60.0,
)
app = KeyedLockMiddleware(
    Starlette(
        routes=[
            Route("/checkout", checkout, methods=["POST"]),
            Route("/hold", hold, methods=["POST"]),
        ]
    ),
    key=keys.header("X-User-Id"),
    lock=lock,
)
