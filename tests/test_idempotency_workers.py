"""IdempotencyMiddleware across 4 real uvicorn processes (tests/apps/idem_pay.py), with the lock
and the store on one engine: Redis (RedisBackend + RedisStore), then PostgreSQL
(PostgresBackend + PostgresStore). Requests are spread round robin over the processes.

Runs are counted in the engine by the endpoint itself, so "ran exactly once" is read from the
database, never inferred from the responses or from timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.support.engine_postgres import PG_DSN, require_postgres
from tests.support.engine_redis import REDIS_URL, require_redis
from tests.support.server import uvicorn_server, uvicorn_servers

pytestmark = pytest.mark.anyio
APP = "tests.apps.idem_pay:app"
LEASE = 1.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py and asyncpg are asyncio-only


class Deployment:
    """One engine's namespace for this test, and how to read the runs the endpoint counted."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.ns = f"idem_{uuid.uuid4().hex[:12]}"
        self.url = REDIS_URL if engine == "redis" else PG_DSN

    def env(self, **more: str) -> dict[str, str]:
        return {
            "IDEM_ENGINE": self.engine,
            "IDEM_NS": self.ns,
            "IDEM_URL": self.url,
            "IDEM_LEASE": str(LEASE),
            **more,
        }

    async def runs(self) -> Counter[str]:
        if self.engine == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(self.url)
            try:
                items = await client.lrange(f"{self.ns}:runs", 0, -1)
            finally:
                await client.aclose()
            return Counter(item.decode().partition("|")[0] for item in items)
        rows = await _pg(f"SELECT key FROM {self.ns}_runs")
        return Counter(row["key"] for row in rows)


async def _pg(*statements: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        rows: list[Any] = []
        for statement in statements:
            rows = await conn.fetch(statement)
        return rows
    finally:
        await conn.close()


async def _redis_cleanup(ns: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        names = [name async for name in client.scan_iter(match=f"*{ns}*")]
        if names:
            await client.delete(*names)
    finally:
        await client.aclose()


@pytest.fixture(params=["redis", "postgres"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    engine = str(request.param)
    (require_redis if engine == "redis" else require_postgres)()
    found = Deployment(engine)
    if engine == "postgres":
        asyncio.run(
            _pg(f"CREATE TABLE {found.ns}_runs (id bigserial PRIMARY KEY, key text, pid int)")
        )
    try:
        yield found
    finally:
        if engine == "redis":
            asyncio.run(_redis_cleanup(found.ns))
        else:
            asyncio.run(
                _pg(
                    f"DROP TABLE IF EXISTS {found.ns}_runs", f"DROP TABLE IF EXISTS {found.ns}_idem"
                )
            )


@contextlib.asynccontextmanager
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        yield client


def is_replay(response: httpx.Response) -> bool:
    return response.headers.get("idempotent-replayed") == "true"


async def test_one_key_from_200_posts_over_4_workers_runs_once(deployment: Deployment) -> None:
    answers: list[tuple[int, httpx.Response]] = []
    with uvicorn_servers(APP, 4, env=deployment.env()) as urls:
        async with http_client() as client:

            async def pay(i: int) -> None:
                response = await client.post(
                    f"{urls[i % 4]}/pay",
                    headers={"Idempotency-Key": "order-1"},
                    json={"amount": 10},
                )
                answers.append((i % 4, response))

            async with anyio.create_task_group() as tg:  # 100 at once: one runs, others 409
                for i in range(100):
                    tg.start_soon(pay, i)
            async with anyio.create_task_group() as tg:  # 100 after it completed: replays
                for i in range(100, 200):
                    tg.start_soon(pay, i)
    assert await deployment.runs() == {"order-1": 1}
    assert len(answers) == 200
    originals = [r for _, r in answers if r.status_code == 201 and not is_replay(r)]
    assert len(originals) == 1
    original = originals[0]
    replays = [(worker, r) for worker, r in answers if is_replay(r)]
    busy = [r for _, r in answers if r.status_code == 409]
    assert len(replays) + len(busy) == 199
    for response in busy:
        assert int(response.headers["retry-after"]) >= 1
    for _, response in replays:
        assert response.status_code == 201
        assert response.content == original.content
        assert response.headers["x-payment-id"] == original.headers["x-payment-id"]
    assert len(replays) >= 100  # every one of the second wave at least
    assert len({worker for worker, _ in replays}) == 4  # replayed by every process


async def test_200_distinct_keys_run_200_times(deployment: Deployment) -> None:
    """All 200 at once on Redis. PostgresBackend holds one connection per key and, under
    `timeout=0`, refuses a key beyond its `pool_size` (10) at once (409): the clients there send
    at most 16 at a time (4 per worker): a released key gives its connection back only after
    the response went out, so the next request can arrive first (see the closing note)."""
    statuses: Counter[tuple[int, bool]] = Counter()
    per_worker = 50 if deployment.engine == "redis" else 4
    limiters = [anyio.CapacityLimiter(per_worker) for _ in range(4)]
    with uvicorn_servers(APP, 4, env=deployment.env()) as urls:
        async with http_client() as client:

            async def pay(i: int) -> None:
                async with limiters[i % 4]:
                    response = await client.post(
                        f"{urls[i % 4]}/pay",
                        headers={"Idempotency-Key": f"o-{i}"},
                        json={"amount": i},
                    )
                statuses[(response.status_code, is_replay(response))] += 1

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(pay, i)
    assert statuses == {(201, False): 200}
    runs = await deployment.runs()
    assert len(runs) == 200
    assert set(runs.values()) == {1}


async def test_worker_killed_mid_run_leaves_the_key_free_and_the_retry_runs_once(
    deployment: Deployment,
) -> None:
    """The first request's worker is SIGKILLed inside the endpoint (its run counted, nothing
    stored): once its lease ends, a retry on another worker runs once, then is replayed."""
    with contextlib.ExitStack() as stack:
        doomed = stack.enter_context(uvicorn_server(APP, env=deployment.env(IDEM_HANG="1")))
        healthy = stack.enter_context(uvicorn_server(APP, env=deployment.env()))
        request = {"headers": {"Idempotency-Key": "order-k"}, "json": {"amount": 5}}
        async with http_client() as client, anyio.create_task_group() as tg:

            async def first() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its server gets killed
                    await client.post(f"{doomed}/pay", **request)

            tg.start_soon(first)
            with anyio.fail_after(30):
                while not await deployment.runs():  # noqa: ASYNC110 - the state is in the engine
                    await anyio.sleep(0.01)
            pid = await _pid_of_first_run(deployment)
            os.kill(pid, signal.SIGKILL)
            retries: Counter[int] = Counter()
            with anyio.fail_after(60):
                while True:  # a client retrying: 409 until the dead worker's lease ends
                    retry = await client.post(f"{healthy}/pay", **request)
                    retries[retry.status_code] += 1
                    if retry.status_code != 409:
                        break
                    assert int(retry.headers["retry-after"]) >= 1
                    await anyio.sleep(0.05)
            assert retry.status_code == 201
            assert not is_replay(retry)
            again = await client.post(f"{healthy}/pay", **request)
    assert set(retries) <= {409, 201}
    assert is_replay(again)
    assert again.content == retry.content
    assert await deployment.runs() == {"order-k": 2}  # the killed run and the retry, no more


async def _pid_of_first_run(deployment: Deployment) -> int:
    if deployment.engine == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(deployment.url)
        try:
            item = await client.lindex(f"{deployment.ns}:runs", 0)
        finally:
            await client.aclose()
        return int(item.decode().partition("|")[2])
    rows = await _pg(f"SELECT pid FROM {deployment.ns}_runs ORDER BY id LIMIT 1")
    return int(rows[0]["pid"])
