"""PostgreSQL backend: configure it, and let the protected row refuse a stale holder's write.

`main()` plays the story the docs page tells: holder A's lease is lost (its lock session is
terminated, as `idle_session_timeout` would for a frozen process), holder B gets the key with a
larger token and writes; A wakes up and tries to write with its old token: the row refuses it.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import asyncpg

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.backends.postgres import LeaseLost, PostgresBackend

DSN = os.environ.get("KEYEDLOCK_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def make_lock(dsn: str, namespace: str, lost: list[LeaseLost]) -> KeyedLock:
    # --8<-- [start:setup]
    backend = PostgresBackend.from_dsn(
        dsn,  # the lock's own pool: never the app's connections
        namespace=namespace,  # apps sharing a database keep their keys apart
        lease=30.0,  # a frozen holder keeps a key at most this long (PostgreSQL 14+)
        pool_size=10,  # keys one process holds or waits for in PostgreSQL at once
        on_lease_lost=lost.append,  # told when the server dropped a hold
    )
    lock = KeyedLock(backend=backend, timeout=10.0)  # fails closed: 503 if PG is down
    # --8<-- [end:setup]
    return lock


# --8<-- [start:fenced_write]
async def pay(db: Any, table: str, account: int, amount: int, token: int) -> bool:
    """Write only if no newer holder of the key has written: the token must be the largest."""
    status = await db.execute(
        f"UPDATE {table} SET balance = balance - $1, fence = $2 WHERE id = $3 AND fence < $2",
        amount,
        token,
        account,
    )
    return bool(status == "UPDATE 1")


# --8<-- [end:fenced_write]


async def main(dsn: str = DSN) -> dict[str, Any]:
    table = f"fence_demo_{uuid.uuid4().hex[:10]}"
    namespace = f"fence-demo-{uuid.uuid4().hex[:10]}"
    lost: list[LeaseLost] = []
    db = await asyncpg.connect(dsn)
    process_a = make_lock(dsn, namespace, lost)
    process_b = make_lock(dsn, namespace, [])
    await db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, balance int, fence bigint)")
    try:
        await db.execute(f"INSERT INTO {table} VALUES (1, 100, 0)")
        async with process_a.hold("account:1") as a:
            # A stalls; its session ends (here: terminated; in production: the lease ran out).
            holder = await db.fetchval(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = $1",
                process_a.backend.lock_id("account:1"),  # type: ignore[union-attr]
            )
            await db.execute("SELECT pg_terminate_backend($1)", holder)
            async with process_b.hold("account:1") as b:
                b_paid = await pay(db, table, 1, 30, b.token)
            a_paid = await pay(db, table, 1, 30, a.token)  # A wakes up and writes late
        balance = await db.fetchval(f"SELECT balance FROM {table} WHERE id = 1")
        return {
            "b_paid": b_paid,
            "a_paid": a_paid,
            "balance": balance,
            "a_told": [event.token for event in lost] == [a.token],
            "tokens_increase": b.token > a.token,
        }
    finally:
        await db.execute(f"DROP TABLE {table}")
        await db.close()
        await process_a.aclose()
        await process_b.aclose()
