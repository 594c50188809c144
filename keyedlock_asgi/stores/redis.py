"""`RedisStore`: completed responses in Redis, expired by Redis itself (`SET ... PX`).

redis-py's asyncio client is asyncio-only. With a `RedisBackend` lock, one run per key holds
across every worker and host sharing the Redis.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from ._base import StoredResponse, decode, encode

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("RedisStore needs redis-py: pip install 'keyedlock_asgi[redis]'") from exc

__all__ = ["RedisStore"]


class RedisStore:
    """Entries at `<namespace>:<key>`, each with its own Redis expiry."""

    def __init__(
        self,
        client: aioredis.Redis | Callable[[], aioredis.Redis],
        *,
        namespace: str = "keyedlock:idem",
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty str")
        self.namespace = namespace
        if isinstance(client, aioredis.Redis):
            given = client
            self._factory: Callable[[], aioredis.Redis] = lambda: given
            self._owns_client = False
        else:
            self._factory = client
            self._owns_client = True
        # redis-py's connections belong to one event loop: one client per loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_url(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "keyedlock:idem",
        max_connections: int = 50,
        socket_timeout: float = 2.0,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on the Redis at `url`; extra keywords go to redis-py's connection pool."""

        def make_client() -> aioredis.Redis:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                **redis_options,
            )
            return aioredis.Redis(connection_pool=pool)

        return cls(make_client, namespace=namespace)

    def __repr__(self) -> str:
        return f"<RedisStore namespace={self.namespace!r}>"

    def redis_key(self, key: str) -> str:
        """The Redis key an idempotency key's entry lives at."""
        return f"{self.namespace}:{key}"

    def _client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._factory()
        return client

    async def get(self, key: str) -> StoredResponse | None:
        blob = await self._client().get(self.redis_key(key))
        if isinstance(blob, str):
            raise TypeError("RedisStore needs a client made with decode_responses=False")
        return None if blob is None else decode(blob)

    async def put(self, key: str, response: StoredResponse, ttl: float) -> None:
        px = max(1, round(ttl * 1000))
        await self._client().set(self.redis_key(key), encode(response), px=px, nx=True)

    async def aclose(self) -> None:
        """Close this event loop's client (if the store made it)."""
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None and self._owns_client:
            await client.aclose()
