"""Lock engines the core semantic tests run against: in-process, and each distributed backend.

A backend registers a factory here: `namespace -> LockBackend` (sync; connect lazily). The
`make_lock` fixture (tests/conftest.py) builds a `KeyedLock` on each engine, with a fresh
namespace per test, and closes it afterwards. Engines in ASYNCIO_ONLY are skipped on trio.
"""

from __future__ import annotations

from collections.abc import Callable

from keyedlock_asgi.backends import LockBackend
from tests.support.engine_pgbouncer import pgbouncer_engine
from tests.support.engine_postgres import postgres_engine
from tests.support.engine_redis import redis_cluster_engine, redis_engine

EngineFactory = Callable[[str], "LockBackend | None"]


def memory_engine(namespace: str) -> LockBackend | None:
    """The default: no backend, the in-process lock alone."""
    return None


ENGINES: dict[str, EngineFactory] = {
    "memory": memory_engine,
}

ASYNCIO_ONLY: set[str] = set()

ENGINES["redis"] = redis_engine
ASYNCIO_ONLY.add("redis")  # redis-py's asyncio client cannot run under trio
ENGINES["redis-cluster"] = redis_cluster_engine
ASYNCIO_ONLY.add("redis-cluster")  # a real 3-master cluster on loopback (tests/support)
ENGINES["postgres"] = postgres_engine
ASYNCIO_ONLY.add("postgres")  # asyncpg runs on asyncio only
ENGINES["pgbouncer"] = pgbouncer_engine  # PostgreSQL through pgbouncer, transaction mode
ASYNCIO_ONLY.add("pgbouncer")

NO_SLOTS: dict[str, str] = {
    "pgbouncer": "transaction mode cannot hold max_concurrency > 1 (see docs/postgres.md)",
}
"""Engines that refuse `max_concurrency > 1`, and why: `make_lock` skips those tests there."""
