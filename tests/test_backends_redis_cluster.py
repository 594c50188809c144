"""RedisBackend on a real 3-master Redis Cluster: real uvicorn workers, keys on every shard, and
a master killed and restarted under traffic.

The lock runs on the cluster; the app's entry/exit log and balances stay on the shared Redis
(tests/apps/redis_checkout.py), whose list order is the single order of events the overlap
checks read. The core semantic suite and the shared-hold tests run on the cluster too (engine
"redis-cluster" in tests/support/engines.py; test_backends_redis_shared.py).
"""

from __future__ import annotations

import importlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from keyedlock_asgi import BackendUnavailable, KeyedLock
from keyedlock_asgi.backends.redis import RedisBackend
from tests.support.engine_redis import REDIS_URL, redis_cluster, require_cluster, require_redis
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.server import uvicorn_server, uvicorn_servers
from tests.test_backends_redis_e2e import assert_no_same_key_overlap, read_log

pytestmark = pytest.mark.anyio
__all__ = ["redis_cluster"]
APP = "tests.apps.redis_checkout:app"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def namespace() -> str:
    require_redis()  # the log lives on the shared Redis
    return f"cl-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(namespace: str) -> AsyncIterator[Any]:
    """The shared Redis: the app's log and balances."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    names = [n async for n in client.scan_iter(match=f"*{namespace}*")]
    if names:
        await client.delete(*names)
    await client.aclose()


async def keys_by_node(cluster: RedisClusterProcesses, namespace: str) -> dict[int, list[str]]:
    """The lock's Redis keys of `namespace` found on each master (scanned node by node), each
    checked against CLUSTER KEYSLOT and the cluster's slot map."""
    found: dict[int, list[str]] = {}
    for port in cluster.ports:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            async for name in client.scan_iter(match=f"{{{namespace}:*", count=1000):
                slot = int(await client.execute_command("CLUSTER", "KEYSLOT", name))
                assert slot == key_slot(name)
                assert cluster.node_of_slot(slot) == port
                found.setdefault(port, []).append(name.decode())
        finally:
            await client.aclose()
    return found


def users_by_node(
    cluster: RedisClusterProcesses, namespace: str, count: int
) -> dict[int, list[str]]:
    """`count` user ids per master: the lock key `{<namespace>:<user>}` lives there."""
    placed: dict[int, list[str]] = {port: [] for port in cluster.ports}
    i = 0
    while any(len(users) < count for users in placed.values()):
        user = f"user-{i}"
        port = cluster.node_of_slot(key_slot(f"{{{namespace}:{user}}}".encode()))
        if len(placed[port]) < count:
            placed[port].append(user)
        i += 1
    return placed


async def test_client_forms_and_keys_on_every_shard(
    redis_cluster: RedisClusterProcesses, namespace: str
) -> None:
    """A `RedisCluster` client passed in, and `from_url` with a list of startup nodes, both
    work; the four Redis keys of one lock key live in one slot, different keys on all 3."""
    given = aioredis.RedisCluster.from_url(redis_cluster.url)
    nodes = [f"redis://127.0.0.1:{port}" for port in redis_cluster.ports]
    backends = [
        RedisBackend(given, namespace=namespace),
        RedisBackend.from_url(nodes, cluster=True, namespace=namespace),
    ]
    with pytest.raises(ValueError, match="startup nodes"):
        RedisBackend.from_url(nodes, namespace=namespace)
    placed = users_by_node(redis_cluster, namespace, 2)
    users = [user for per_node in placed.values() for user in per_node]
    try:
        for backend in backends:
            lock = KeyedLock(backend=backend)
            for user in users:
                async with lock.hold(user) as held:
                    assert held.token > 0
                    assert len({key_slot(k.encode()) for k in backend.redis_keys(user)}) == 1
        left = await keys_by_node(redis_cluster, namespace)
        assert sorted(left) == sorted(redis_cluster.ports)  # counters on all three shards
        assert all(name.endswith(":m") for names in left.values() for name in names)
    finally:
        for backend in backends:
            await backend.aclose()
        await given.aclose()


async def test_checkout_across_four_workers_on_the_cluster(
    redis_cluster: RedisClusterProcesses, namespace: str, raw: Any
) -> None:
    """The 4-worker checkout proof with the lock on the cluster: 120 requests on one hot key
    and 120 single-request keys spread over all three shards; no same-key overlap, balances
    exact, tokens increasing."""
    env = {"KL_NS": namespace, "KL_WORK_MS": "1", "KL_LOCK_URL": redis_cluster.url}
    env["KL_CLUSTER"] = "1"
    statuses: Counter[int] = Counter()
    with uvicorn_servers(APP, 4, env=env) as urls:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def checkout(url: str, user: str) -> None:
                response = await client.post(f"{url}/checkout", headers={"x-user-id": user})
                statuses[response.status_code] += 1

            async with anyio.create_task_group() as tg:
                for i in range(120):
                    tg.start_soon(checkout, urls[i % 4], "shared")
                    tg.start_soon(checkout, urls[(i + 1) % 4], f"solo-{i}")
    assert statuses == {200: 240}
    log = await read_log(raw, namespace)
    assert len(log) == 480
    assert assert_no_same_key_overlap(log) >= 2
    shared = [entry for entry in log if entry["user"] == "shared" and entry["ev"] == "enter"]
    assert len({entry["pid"] for entry in shared}) >= 2
    tokens = [entry["token"] for entry in shared]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 120
    assert int(await raw.get(f"{namespace}:balance:shared")) == -120
    placed = await keys_by_node(redis_cluster, namespace)
    assert sorted(placed) == sorted(redis_cluster.ports)  # every shard held lock keys
    assert sum(len(names) for names in placed.values()) == 121  # counters only: idle keys
    assert min(len(names) for names in placed.values()) >= 20


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcesses]:
    """A cluster of this test's own, whose masters it may kill."""
    require_cluster()
    cluster = RedisClusterProcesses(first_port=7130).start()
    yield cluster
    cluster.stop()


async def test_a_master_killed_and_restarted_under_traffic(
    own_cluster: RedisClusterProcesses, namespace: str, raw: Any
) -> None:
    """Kill the master of one user's key under traffic on keys of all three shards: that
    user gets 503 with Retry-After while its slots are down, the others keep being served,
    all recover after the restart; no two same-user requests were ever inside at once, and
    each user's tokens kept increasing across the outage (the restarted master lost its keys)."""
    placed = users_by_node(own_cluster, namespace, 1)
    victim_port = own_cluster.ports[1]  # not the startup node the clients were given
    (victim,) = placed[victim_port]
    others = [user for port, users in placed.items() if port != victim_port for user in users]
    env = {"KL_NS": namespace, "KL_LOCK_URL": own_cluster.url, "KL_CLUSTER": "1"}
    env |= {"KL_LEASE": "2", "KL_WORK_MS": "2"}
    phase = "before"
    counts: Counter[tuple[str, str, int]] = Counter()
    ok_by_user: Counter[str] = Counter()
    bad_retry_after: list[str | None] = []
    marks = {name: anyio.Event() for name in ("before", "down", "after")}

    def note(user: str, status: int) -> None:
        group = "victim" if user == victim else "other"
        counts[(phase, group, status)] += 1
        if counts[("before", "victim", 200)] >= 10 and counts[("before", "other", 200)] >= 10:
            marks["before"].set()
        if counts[("down", "victim", 503)] >= 5 and counts[("down", "other", 200)] >= 10:
            marks["down"].set()
        if counts[("after", "victim", 200)] >= 10 and counts[("after", "other", 200)] >= 10:
            marks["after"].set()

    with uvicorn_server(APP, workers=2, env=env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def traffic(user: str) -> None:
                for _ in range(3000):  # bounded: the phases below end it much sooner
                    if marks["after"].is_set():
                        return
                    response = await client.post("/checkout", headers={"x-user-id": user})
                    note(user, response.status_code)
                    if response.status_code == 200:
                        ok_by_user[user] += 1
                    else:
                        retry_after = response.headers.get("retry-after")
                        if not (retry_after and int(retry_after) >= 1):
                            bad_retry_after.append(retry_after)
                    await anyio.sleep(0.01)  # pacing of the client loop

            async with anyio.create_task_group() as tg:
                for user in [victim, victim, *others, *others]:
                    tg.start_soon(traffic, user)
                with anyio.fail_after(60):
                    await marks["before"].wait()
                    phase = "down"
                    own_cluster.kill(victim_port)
                    await marks["down"].wait()
                    own_cluster.restart(victim_port)
                    phase = "after"
                    await marks["after"].wait()
    assert {status for _, _, status in counts} <= {200, 503}
    assert counts[("down", "other", 503)] == 0  # only the dead shard's keys were refused
    assert bad_retry_after == []
    log = await read_log(raw, namespace)
    assert_no_same_key_overlap(log)
    for user in [victim, *others]:
        tokens = [e["token"] for e in log if e["user"] == user and e["ev"] == "enter"]
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == len(tokens)
        assert int(await raw.get(f"{namespace}:balance:{user}")) == -ok_by_user[user]


async def test_a_dead_shard_opens_only_its_own_breaker(
    own_cluster: RedisClusterProcesses, namespace: str
) -> None:
    """Calls for a key on a killed master fail, then fail fast (its breaker opens) while
    calls for keys on the live masters, interleaved with them, keep being granted; after the
    restart, the key is served again with a larger fence."""
    placed = users_by_node(own_cluster, namespace, 1)
    victim_port = own_cluster.ports[1]
    (victim,) = placed[victim_port]
    others = [user for port, users in placed.items() if port != victim_port for user in users]
    backend = RedisBackend.from_url(own_cluster.url, cluster=True, namespace=namespace)
    try:
        lease = await backend.acquire(victim, timeout=1, max_concurrency=1)
        first = lease.token
        await lease.release()
        own_cluster.kill(victim_port)
        errors: list[str] = []
        for _ in range(6):
            with pytest.raises(BackendUnavailable) as caught:
                await backend.acquire(victim, timeout=1, max_concurrency=1)
            assert caught.value.retry_after is not None
            errors.append(str(caught.value))
            for user in others:
                lease = await backend.acquire(user, timeout=1, max_concurrency=1)
                await lease.release()
        assert "circuit open" in errors[-1]
        own_cluster.restart(victim_port)
        with anyio.fail_after(30):
            while True:
                try:
                    lease = await backend.acquire(victim, timeout=1, max_concurrency=1)
                    break
                except BackendUnavailable as exc:
                    await anyio.sleep(exc.retry_after or 0.1)
        assert lease.token > first
        await lease.release()
    finally:
        await backend.aclose()


async def test_docs_cluster_example(
    redis_cluster: RedisClusterProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/examples/redis_cluster.py: charges for users on all three shards, and the
    client-you-built form."""
    monkeypatch.setenv("REDIS_CLUSTER_URL", redis_cluster.url)
    example = importlib.reload(importlib.import_module("docs.examples.redis_cluster"))
    users: dict[int, str] = {}
    i = 0
    while len(users) < 3:
        slot = key_slot(f"{{shop:user:u{i}}}".encode())
        users.setdefault(redis_cluster.node_of_slot(slot), f"u{i}")
        i += 1
    try:
        tokens = [await example.charge(user) for user in users.values()]
        again = await example.charge(users[redis_cluster.ports[0]])
    finally:
        await example.lock.aclose()
    assert all(token > 0 for token in tokens)
    assert again > tokens[list(users).index(redis_cluster.ports[0])]
    placed = await keys_by_node(redis_cluster, "shop")
    for port, user in users.items():
        assert f"{{shop:user:{user}}}:m" in placed[port]
    given = example.client(redis_cluster.url)
    backend = RedisBackend(given, namespace="shop")
    try:
        lease = await backend.acquire("user:u0", timeout=1, max_concurrency=1)
        assert lease.token > 0
        await lease.release()
    finally:
        await backend.aclose()
        await given.aclose()
