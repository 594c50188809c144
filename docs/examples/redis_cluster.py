"""The same lock on a Redis Cluster: one startup node (or several), keys spread over the shards."""

from __future__ import annotations

import os

import redis.asyncio as aioredis

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.backends.redis import RedisBackend

CLUSTER_URL = os.environ.get("REDIS_CLUSTER_URL", "redis://127.0.0.1:7100/0")

# A startup node; the client learns the other masters and the slot map from it.
lock = KeyedLock(
    timeout=10.0,
    backend=RedisBackend.from_url(CLUSTER_URL, cluster=True, namespace="shop", lease=30.0),
)

# Or several startup nodes, in case one of them is down at start-up:
#     RedisBackend.from_url(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"], cluster=True)
# Or a client you built yourself (never closed by the backend):
#     RedisBackend(aioredis.RedisCluster.from_url(CLUSTER_URL), namespace="shop")


async def charge(user: str) -> int:
    """One charge at a time per user, across every worker, whichever shard holds the user."""
    async with lock.hold(f"user:{user}") as held:
        return held.token  # send it with the write (see "Fencing tokens")


def client(url: str = CLUSTER_URL) -> aioredis.RedisCluster:
    return aioredis.RedisCluster.from_url(url)
