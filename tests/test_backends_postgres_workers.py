"""PostgresBackend across 4 real uvicorn workers (tests/apps/pg_checkout.py): lost updates,
overlap, and faults of the holder (connection terminated, worker killed, worker frozen).

Every critical section logs `enter`/`exit` rows to a table; its bigserial id is the one order
all workers agree on, so "no overlap" is read off the log, not off timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from keyedlock_asgi.backends.postgres import key_id
from tests.support.engine_postgres import PG_DSN, require_postgres
from tests.support.server import uvicorn_servers
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]

LEASE = 1.0
START_BALANCE = 1_000_000


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


class Shop:
    def __init__(self, urls: list[str], table: str, namespace: str) -> None:
        self.urls = urls  # one per worker process
        self.table = table
        self.namespace = namespace


async def _sql(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def shop() -> Iterator[Shop]:
    """4 worker processes sharing one PostgreSQL lock namespace and a balance table made for
    this test (per test: the fault tests stop or kill a worker)."""
    require_postgres()
    run = uuid.uuid4().hex[:12]
    table, namespace = f"kl_pg_{run}", f"test-workers-{run}"
    asyncio.run(
        _sql(
            f"CREATE TABLE {table} (id int PRIMARY KEY, balance bigint NOT NULL)",
            f"INSERT INTO {table} VALUES (1, {START_BALANCE})",
            f"CREATE TABLE {table}_log (id bigserial PRIMARY KEY, request text NOT NULL, "
            "event text NOT NULL, worker int, token bigint, "
            "at timestamptz DEFAULT clock_timestamp())",
        )
    )
    env = {"PG_DSN": PG_DSN, "PG_NAMESPACE": namespace, "PG_TABLE": table, "PG_LEASE": str(LEASE)}
    try:
        with uvicorn_servers("tests.apps.pg_checkout:app", 4, env=env) as urls:
            yield Shop(urls, table, namespace)
    finally:
        asyncio.run(_sql(f"DROP TABLE IF EXISTS {table}", f"DROP TABLE IF EXISTS {table}_log"))


@pytest.fixture
async def pg() -> Any:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    yield conn
    await conn.close()


async def events(pg: Any, shop: Shop, user: str) -> list[Any]:
    return list(
        await pg.fetch(
            f"SELECT id, request, event, worker, token, at FROM {shop.table}_log "
            "WHERE request LIKE $1 ORDER BY id",
            f"{user}%",
        )
    )


async def post(client: httpx.AsyncClient, url: str, user: str, request: str) -> int:
    try:
        response = await client.post(
            url, headers={"X-User-Id": user, "X-Request-Id": f"{user}:{request}"}
        )
    except httpx.TransportError:
        return 0  # the worker serving it was killed
    return response.status_code


def assert_no_overlap(rows: list[Any], skip: str | None = None) -> None:
    """Outside the faulted holder, critical sections strictly alternate enter/exit."""
    inside: str | None = None
    for row in rows:
        if row["request"] == skip or row["event"] not in ("enter", "exit"):
            continue
        if row["event"] == "enter":
            assert inside is None, f"{row['request']} entered while {inside} was inside"
            inside = row["request"]
        else:
            assert inside == row["request"]
            inside = None


async def test_200_concurrent_checkouts_across_4_workers(shop: Shop, pg: Any) -> None:
    user = f"alice-{uuid.uuid4().hex[:6]}"
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        statuses = await asyncio.gather(
            *(post(client, f"{shop.urls[i % 4]}/checkout", user, str(i)) for i in range(200))
        )
    assert statuses == [200] * 200
    balance = await pg.fetchval(f"SELECT balance FROM {shop.table} WHERE id = 1")
    assert balance == START_BALANCE - 200
    rows = await events(pg, shop, user)
    assert len(rows) == 400
    assert_no_overlap(rows)
    tokens = [row["token"] for row in rows if row["event"] == "enter"]
    assert tokens == sorted(set(tokens))  # fencing tokens increase with every grant
    assert len({row["worker"] for row in rows}) > 1  # served by several processes


async def _holder_and_waiters(
    shop: Shop, pg: Any, client: httpx.AsyncClient, tg: Any, user: str
) -> tuple[Any, int]:
    """Start a holder in the first worker, then one checkout for `user` in every worker (the
    holder's own queues in memory, the others in PostgreSQL); return the holder's enter row
    once another worker waits in PostgreSQL, and the server pid of the holder's lock
    connection."""
    tg.start_soon(post, client, f"{shop.urls[0]}/hold", user, "holder")

    async def holder_entered() -> Any:
        rows = [r for r in await events(pg, shop, user) if r["event"] == "enter"]
        return rows[0] if rows else None

    entered = await wait_until(holder_entered, "holder entered", limit=30.0)
    lock_id = key_id(shop.namespace, user)

    async def lock_state() -> Any:
        rows = await pg.fetch(
            "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = $1",
            lock_id,
        )
        holders = [r["pid"] for r in rows if r["granted"]]
        return holders[0] if holders and any(not r["granted"] for r in rows) else None

    for i, url in enumerate(shop.urls):
        tg.start_soon(post, client, f"{url}/checkout", user, f"w{i}")
    return entered, await wait_until(lock_state, "another worker waits in PostgreSQL", limit=30.0)


async def _note(pg: Any, shop: Shop, user: str, event: str) -> None:
    await pg.execute(
        f"INSERT INTO {shop.table}_log (request, event) VALUES ($1, $2)", f"{user}:test", event
    )


async def _finish_holder(pg: Any, shop: Shop, user: str) -> None:
    await pg.execute(
        f"INSERT INTO {shop.table}_log (request, event) VALUES ($1, 'go')", f"{user}:holder"
    )


async def _lost_reported(pg: Any, shop: Shop, user: str, token: int) -> bool:
    return bool(
        await pg.fetchval(
            f"SELECT count(*) FROM {shop.table}_log WHERE request = $1 AND event = 'lost' "
            "AND token = $2",
            f"lost:{user}",
            token,
        )
    )


async def test_terminated_holder_connection_lets_the_next_waiter_in(shop: Shop, pg: Any) -> None:
    user = f"bob-{uuid.uuid4().hex[:6]}"
    async with (
        httpx.AsyncClient(timeout=60) as client,
        anyio.create_task_group() as tg,
    ):
        entered, holder_pid = await _holder_and_waiters(shop, pg, client, tg, user)
        await _note(pg, shop, user, "terminated")
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", holder_pid)
        await wait_until(
            lambda: _lost_reported(pg, shop, user, entered["token"]),
            "the holder is told it lost the key",
            limit=30.0,
        )

        async def another_entered() -> bool:
            rows = await events(pg, shop, user)
            return any(r["event"] == "enter" and r["id"] > entered["id"] for r in rows)

        await wait_until(another_entered, "another entered", limit=30.0)
        # Checkouts queued behind the holder in its own worker wait for it to finish.
        await _finish_holder(pg, shop, user)
    rows = await events(pg, shop, user)
    order = [(r["request"].split(":")[1], r["event"]) for r in rows]
    assert order[0] == ("holder", "enter")
    terminated = order.index(("test", "terminated"))
    first_other = next(i for i, (who, ev) in enumerate(order) if ev == "enter" and who != "holder")
    assert terminated < first_other  # nobody entered while the holder's session lived
    assert_no_overlap(rows, skip=f"{user}:holder")


async def test_frozen_worker_loses_the_key_after_the_lease(shop: Shop, pg: Any) -> None:
    user = f"carol-{uuid.uuid4().hex[:6]}"
    async with (
        httpx.AsyncClient(timeout=60) as client,
        anyio.create_task_group() as tg,
    ):
        entered, _ = await _holder_and_waiters(shop, pg, client, tg, user)
        os.kill(entered["worker"], signal.SIGSTOP)  # frozen: no heartbeat, no release
        try:

            async def another_entered() -> Any:
                rows = await events(pg, shop, user)
                later = [r for r in rows if r["event"] == "enter" and r["id"] > entered["id"]]
                return later[0] if later else None

            other = await wait_until(another_entered, "another entered", limit=30.0)
        finally:
            os.kill(entered["worker"], signal.SIGCONT)
        await wait_until(
            lambda: _lost_reported(pg, shop, user, entered["token"]),
            "the holder is told it lost the key",
            limit=30.0,
        )
        await _finish_holder(pg, shop, user)
    # The lease runs from the lock connection's last statement (the grant), which comes a
    # moment before the holder's "enter" row: allow that moment, never a real early grant.
    assert (other["at"] - entered["at"]).total_seconds() >= LEASE - 0.1
    assert other["token"] > entered["token"]
    assert_no_overlap(await events(pg, shop, user), skip=f"{user}:holder")


async def test_killed_worker_lets_the_next_waiter_in(shop: Shop, pg: Any) -> None:
    user = f"dave-{uuid.uuid4().hex[:6]}"
    async with (
        httpx.AsyncClient(timeout=60) as client,
        anyio.create_task_group() as tg,
    ):
        entered, _ = await _holder_and_waiters(shop, pg, client, tg, user)
        await _note(pg, shop, user, "killed")
        os.kill(entered["worker"], signal.SIGKILL)

        async def another_entered() -> bool:
            rows = await events(pg, shop, user)
            return any(r["event"] == "enter" and r["id"] > entered["id"] for r in rows)

        await wait_until(another_entered, "another entered", limit=30.0)
        # Checkouts queued in the killed worker fail with it (status 0); the rest finish.
    rows = await events(pg, shop, user)
    order = [(r["request"].split(":")[1], r["event"]) for r in rows]
    assert ("holder", "exit") not in order
    killed = order.index(("test", "killed"))
    first_other = next(i for i, (who, ev) in enumerate(order) if ev == "enter" and who != "holder")
    assert killed < first_other
    assert_no_overlap(rows, skip=f"{user}:holder")
