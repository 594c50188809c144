"""The Redis engine for the shared semantic tests, and helpers for the Redis-specific ones."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

from keyedlock_asgi.backends import LockBackend

REDIS_URL = os.environ.get("KEYEDLOCK_REDIS_URL", "redis://127.0.0.1:6379/0")


def ping(host: str, port: int, limit: float = 1.0) -> str | None:
    """None if a Redis answers PING at host:port, else why not."""
    try:
        with socket.create_connection((host, port), limit) as sock:
            sock.settimeout(limit)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        return f"{host}:{port}: {exc}"
    if not reply.startswith(b"+PONG"):
        return f"{host}:{port} answered {reply[:40]!r} to PING"
    return None


@functools.lru_cache(maxsize=1)
def _shared_redis_problem() -> str | None:
    parts = urlsplit(REDIS_URL)
    return ping(parts.hostname or "127.0.0.1", parts.port or 6379)


def require_redis() -> None:
    """Skip (or fail, in CI) the current test when the shared Redis does not answer."""
    problem = _shared_redis_problem()
    if problem is not None:
        from tests.conftest import service_missing

        service_missing("Redis", problem)


def redis_engine(namespace: str) -> LockBackend:
    """A `RedisBackend` on the shared Redis, in a namespace of its own."""
    require_redis()
    from keyedlock_asgi.backends.redis import RedisBackend

    return RedisBackend.from_url(REDIS_URL, namespace=namespace, lease=10.0)
