"""Lock engines the core semantic tests run against: in-process, and each distributed backend.

A backend registers a factory here: `namespace -> LockBackend` (sync; connect lazily). The
`make_lock` fixture (tests/conftest.py) builds a `KeyedLock` on each engine, with a fresh
namespace per test, and closes it afterwards. Engines in ASYNCIO_ONLY are skipped on trio.
"""

from __future__ import annotations

from collections.abc import Callable

from keyedlock_asgi.backends import LockBackend

EngineFactory = Callable[[str], "LockBackend | None"]


def memory_engine(namespace: str) -> LockBackend | None:
    """The default: no backend, the in-process lock alone."""
    return None


ENGINES: dict[str, EngineFactory] = {
    "memory": memory_engine,
}

ASYNCIO_ONLY: set[str] = set()


def _register_postgres() -> None:
    from tests.support.engine_postgres import postgres_engine

    ENGINES["postgres"] = postgres_engine
    ASYNCIO_ONLY.add("postgres")  # asyncpg runs on asyncio only


_register_postgres()
