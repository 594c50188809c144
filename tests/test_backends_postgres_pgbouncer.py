"""PostgresBackend behind pgbouncer in transaction pooling (tests/support/engine_pgbouncer.py).

Transaction mode works through it (the PostgreSQL suites run their transaction-mode tests and
the core semantic tests through it too); session mode must refuse to start there, with a clear
error, and must never be refused on a direct connection.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from keyedlock_asgi import KeyedLock, LockBusy
from keyedlock_asgi.backends._pg_pooling import served_per_transaction
from keyedlock_asgi.backends.postgres import PostgresBackend, TransactionPoolingError
from tests.support.engine_pgbouncer import pgbouncer_backend, pgbouncer_dsn
from tests.support.engine_postgres import PG_DSN, postgres_backend, require_postgres

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="session")
def bouncer() -> str:
    """The DSN through the session's pgbouncer (transaction pooling)."""
    return pgbouncer_dsn()


async def connect(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(dsn, statement_cache_size=0)


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
async def test_the_probe_tells_a_transaction_pooler_from_a_session(
    bouncer: str, through: str
) -> None:
    require_postgres()
    dsn = bouncer if through == "pgbouncer" else PG_DSN
    conn = await connect(dsn)
    try:
        for _ in range(5):  # the same answer every time
            assert await served_per_transaction(conn, lambda: connect(dsn)) is (
                through == "pgbouncer"
            )
    finally:
        await conn.close()


async def test_session_mode_through_pgbouncer_is_refused_at_start_up(bouncer: str) -> None:
    backend = PostgresBackend.from_dsn(bouncer, namespace=f"test-{uuid.uuid4().hex[:12]}")
    lock = KeyedLock(backend=backend, on_backend_error="open")  # a misconfiguration: never open
    for _ in range(2):  # the first acquire probes; later ones raise without asking again
        with pytest.raises(TransactionPoolingError, match="mode='transaction'"):
            async with lock.hold("k"):
                raise AssertionError("must not run on a lock that cannot hold")
    assert lock.stats().active_keys == 0
    await lock.aclose()


async def test_session_mode_on_a_direct_connection_is_not_refused() -> None:
    lock = KeyedLock(backend=postgres_backend(f"test-{uuid.uuid4().hex[:12]}"))
    async with lock.hold("k") as held:
        assert held.token > 0
    await lock.aclose()


async def test_transaction_mode_through_pgbouncer_holds_and_fences(bouncer: str) -> None:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    a = KeyedLock(backend=pgbouncer_backend(namespace))
    b = KeyedLock(backend=pgbouncer_backend(namespace))
    async with a.hold("k") as first:
        with pytest.raises(LockBusy):
            async with b.hold("k", timeout=0):
                pass
    async with b.hold("k", timeout=0) as second:
        assert second.token > first.token
    await a.aclose()
    await b.aclose()
