"""The Redis engine for the shared semantic tests, and helpers for the Redis-specific ones."""

from __future__ import annotations

import atexit
import functools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis import __version__ as redis_version

from keyedlock_asgi.backends import LockBackend
from keyedlock_asgi.backends.redis import RedisBackend
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_cluster import missing as cluster_missing

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


# The tests' connect timeout: the library's 0.5 s is for a live server, and a loaded CI machine
# can take longer than that to open a loopback connection while it runs the rest of a test.
CONNECT_TIMEOUT = 5.0


def redis_engine(namespace: str) -> LockBackend:
    """A `RedisBackend` on the shared Redis, in a namespace of its own."""
    require_redis()
    return RedisBackend.from_url(
        REDIS_URL, namespace=namespace, lease=10.0, connect_timeout=CONNECT_TIMEOUT
    )


# -- fixtures of the single-server Redis tests (import them into a test module) ---------------


@pytest.fixture(name="namespace")
def redis_namespace() -> str:
    """A namespace of the test's own on the shared Redis (which must answer)."""
    require_redis()
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(name="raw")
async def redis_raw(namespace: str) -> AsyncIterator[Any]:
    """A plain client to look at what the backends left in Redis; deletes the namespace after."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{{{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(name="make_backend")
async def make_redis_backend(namespace: str) -> AsyncIterator[Callable[..., RedisBackend]]:
    """Build `RedisBackend`s on the shared Redis in the test's namespace; close them after.
    Each stands for one process (its own process id, connections and wake-up channel)."""
    made: list[RedisBackend] = []

    def factory(**options: Any) -> RedisBackend:
        options.setdefault("namespace", namespace)
        options.setdefault("lease", 10.0)  # a leaked lease would stay far longer than a test
        options.setdefault("connect_timeout", CONNECT_TIMEOUT)
        backend = RedisBackend.from_url(REDIS_URL, **options)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()


# -- Redis Cluster: a real 3-master cluster on loopback, started once per test run ----------

_cluster: RedisClusterProcesses | None = None


def require_cluster() -> None:
    """Skip (or fail, in CI, when redis-server is missing) a test that needs a cluster."""
    if not hasattr(aioredis.client.PubSub, "ssubscribe"):  # a version matrix run, not an outage
        pytest.skip(f"redis-py {redis_version} has no asyncio SSUBSCRIBE (cluster needs >= 8.0)")
    problem = cluster_missing()
    if problem is not None:
        from tests.conftest import service_missing

        service_missing("Redis Cluster", problem)


def shared_cluster() -> RedisClusterProcesses:
    """The test run's cluster, started on first use (bounded) and stopped when the run ends
    (by the `redis_cluster` fixture's teardown, or at exit). Skips (fails in CI) without
    redis-server."""
    global _cluster
    require_cluster()
    if _cluster is None:
        _cluster = RedisClusterProcesses(first_port=7100).start()
        atexit.register(stop_shared_cluster)
    return _cluster


def stop_shared_cluster() -> None:
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """The shared 3-master cluster (import this fixture into a test module to use it)."""
    yield shared_cluster()
    stop_shared_cluster()


def redis_cluster_engine(namespace: str) -> LockBackend:
    """A `RedisBackend` on the test run's Redis Cluster, in a namespace of its own."""
    return RedisBackend.from_url(
        shared_cluster().url,
        cluster=True,
        namespace=namespace,
        lease=10.0,
        connect_timeout=CONNECT_TIMEOUT,
    )


@dataclass
class RedisTarget:
    """One Redis deployment under test: the shared server, or the test run's cluster."""

    name: str
    url: str
    cluster: bool
    ports: list[int]

    def backend(self, **options: Any) -> RedisBackend:
        options.setdefault("connect_timeout", CONNECT_TIMEOUT)
        return RedisBackend.from_url(self.url, cluster=self.cluster, **options)

    def raw(self) -> Any:
        """A plain client (a cluster client on the cluster) to look at what is in Redis."""
        if self.cluster:
            return aioredis.RedisCluster.from_url(self.url)
        return aioredis.Redis.from_url(self.url)

    async def scan(self, match: str) -> list[str]:
        """Every Redis key matching `match`, over every master."""
        if not self.cluster:
            urls = [self.url]
        else:
            urls = [f"redis://127.0.0.1:{port}/0" for port in self.ports]
        found: list[str] = []
        for url in urls:
            client = aioredis.Redis.from_url(url)
            try:
                found += [name.decode() async for name in client.scan_iter(match=match)]
            finally:
                await client.aclose()
        return found


def redis_target(name: str) -> RedisTarget:
    """ "redis" (the shared server) or "redis-cluster" (started on first use)."""
    if name == "redis":
        require_redis()
        parts = urlsplit(REDIS_URL)
        return RedisTarget(name, REDIS_URL, False, [parts.port or 6379])
    cluster = shared_cluster()
    return RedisTarget(name, cluster.url, True, list(cluster.ports))
