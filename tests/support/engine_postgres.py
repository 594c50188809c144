"""The PostgreSQL engine for the shared test suites: DSN, reachability, backend factory.

`KEYEDLOCK_PG_DSN` overrides the server (default: the CI one, trust auth, database `test`).
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from keyedlock_asgi.backends.postgres import PostgresBackend

PG_DSN = os.environ.get("KEYEDLOCK_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@functools.cache
def postgres_unreachable() -> str | None:
    """Why the test server cannot be reached, or None when it answers."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed"
    parts = urlsplit(PG_DSN)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc}"


def require_postgres() -> None:
    """Skip (or fail in CI) the current test when PostgreSQL does not answer."""
    reason = postgres_unreachable()
    if reason is not None:
        from tests.conftest import service_missing

        service_missing("PostgreSQL", reason)


def postgres_backend(namespace: str, **options: Any) -> PostgresBackend:
    """A backend on the test server under a namespace of its own."""
    require_postgres()
    return PostgresBackend.from_dsn(PG_DSN, namespace=namespace, **options)


def postgres_backend_via(port: int, namespace: str, **options: Any) -> PostgresBackend:
    """`postgres_backend`, reaching the test server through 127.0.0.1:`port` (a proxy)."""
    require_postgres()
    parts = urlsplit(PG_DSN)
    dsn = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}"))
    return PostgresBackend.from_dsn(dsn, namespace=namespace, **options)


def postgres_server_port() -> int:
    """The test server's port (what a proxy in front of it forwards to)."""
    return urlsplit(PG_DSN).port or 5432


def postgres_engine(namespace: str) -> PostgresBackend:
    """The engine factory the core semantic tests use."""
    return postgres_backend(namespace)
