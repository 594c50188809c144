"""RedisBackend end to end: real uvicorn worker processes, real Redis, real faults.

The app (tests/apps/redis_checkout.py) logs `enter`/`exit` around a read-modify-write of the
user's balance into a Redis list; the list's order is Redis's single order of events, so
"no overlap" is read from it, never inferred from timing. The server side is asyncio-only (the
Redis backend); the client side here runs on asyncio for the same reason (it reads Redis).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.support.engine_redis import REDIS_URL, ping, require_redis
from tests.support.server import free_port, uvicorn_server, uvicorn_servers
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.multiprocess]
APP = "tests.apps.redis_checkout:app"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def namespace() -> str:
    require_redis()
    return f"e2e-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(namespace: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    names = (
        []
        if os.environ.get("KL_KEEP")
        else [n async for n in client.scan_iter(match=f"*{namespace}*")]
    )
    if names:
        await client.delete(*names)
    await client.aclose()


async def read_log(raw: Any, namespace: str) -> list[dict[str, Any]]:
    entries = []
    for item in await raw.lrange(f"{namespace}:log", 0, -1):
        stamp, _, text = item.decode().partition("|")
        entries.append({**json.loads(text), "t": float(stamp)})
    return entries


def assert_no_same_key_overlap(log: list[dict[str, Any]]) -> int:
    """Walk the log in Redis order; return the peak number of distinct users inside at once."""
    inside: dict[str, str] = {}
    peak = 0
    for entry in log:
        user = entry["user"]
        if entry["ev"] == "enter":
            assert user not in inside, f"two requests for {user} inside at once: {entry}"
            inside[user] = entry["rid"]
            peak = max(peak, len(inside))
        else:
            assert inside.pop(user) == entry["rid"]
    assert not inside, f"entered and never left: {inside}"
    return peak


async def test_checkout_across_four_worker_processes(namespace: str, raw: Any) -> None:
    env = {"KL_NS": namespace, "KL_WORK_MS": "1"}
    statuses: Counter[int] = Counter()
    with uvicorn_servers(APP, 4, env=env) as urls:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def checkout(url: str, user: str) -> None:
                response = await client.post(f"{url}/checkout", headers={"x-user-id": user})
                statuses[response.status_code] += 1

            async with anyio.create_task_group() as tg:
                for i in range(200):  # round robin over the 4 processes
                    tg.start_soon(checkout, urls[i % 4], "shared")
                    tg.start_soon(checkout, urls[(i + 1) % 4], f"solo-{i}")
    assert statuses == {200: 400}
    log = await read_log(raw, namespace)
    assert len(log) == 800
    peak = assert_no_same_key_overlap(log)
    assert peak >= 2  # distinct users did run at the same time
    shared = [entry for entry in log if entry["user"] == "shared" and entry["ev"] == "enter"]
    assert len({entry["pid"] for entry in shared}) >= 2  # the key really crossed processes
    tokens = [entry["token"] for entry in shared]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 200
    assert int(await raw.get(f"{namespace}:balance:shared")) == -200
    for i in range(200):
        assert int(await raw.get(f"{namespace}:balance:solo-{i}")) == -1


async def test_killed_holder_frees_the_key_within_its_lease(namespace: str, raw: Any) -> None:
    """SIGKILL the worker holding a key: a worker in another process gets it once the lease
    ends. The lease is 1 s; the gap between the kill and the next entry, both on the Redis
    clock, must stay under lease + 1 s (the waiter wakes at the lease end by its fallback
    timer; the extra second is slack for a loaded 2-core machine)."""
    lease = 1.0
    env = {"KL_NS": namespace, "KL_LEASE": str(lease), "KL_WORK_MS": "1"}
    queue_key = f"{{{namespace}:victim}}:q"
    with contextlib.ExitStack() as stack:
        holder_url = stack.enter_context(uvicorn_server(APP, env=env))
        waiter_url = stack.enter_context(uvicorn_server(APP, env=env))
        async with httpx.AsyncClient(timeout=60) as client, anyio.create_task_group() as tg:

            async def hold() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its server gets killed
                    await client.post(f"{holder_url}/hold", headers={"x-user-id": "victim"})

            result: dict[str, Any] = {}

            async def wait_then_checkout() -> None:
                response = await client.post(
                    f"{waiter_url}/checkout", headers={"x-user-id": "victim"}
                )
                result["status"] = response.status_code

            tg.start_soon(hold)
            pid = await wait_until(
                lambda: raw.get(f"{namespace}:holder:victim"),
                "the victim holds the key",
                limit=30.0,
            )
            tg.start_soon(wait_then_checkout)
            await wait_until(
                lambda: raw.zcard(queue_key), "the other process queued", limit=30.0
            )  # the other process waits in Redis
            seconds, micros = await raw.time()
            killed_at = seconds + micros / 1e6
            os.kill(int(pid), signal.SIGKILL)
    assert result["status"] == 200
    log = await read_log(raw, namespace)
    assert [entry["ev"] for entry in log] == ["enter", "enter", "exit"]
    victim, successor = log[0], log[1]
    assert victim["pid"] == int(pid)
    assert successor["pid"] != victim["pid"]
    assert successor["token"] > victim["token"]
    gap = successor["t"] - killed_at
    assert 0 < gap <= lease + 1.0, f"the key came free {gap:.3f} s after the kill"


class OwnRedis:
    """A private redis-server on a free port that a test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        with anyio.fail_after(15):
            while ping("127.0.0.1", self.port, 0.2) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    try:
        server = OwnRedis()
        server.start()
    except FileNotFoundError:
        from tests.conftest import service_missing

        service_missing("redis-server", "the executable is not on PATH")
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


async def test_redis_restart_under_traffic(namespace: str, raw: Any, own_redis: OwnRedis) -> None:
    """Kill the lock's Redis under traffic, then restart it: 503s with Retry-After while it is
    down, normal service after, never two same-user requests inside at once, nothing left."""
    await own_redis.ready()
    env = {"KL_NS": namespace, "KL_LOCK_URL": own_redis.url, "KL_LEASE": "2", "KL_WORK_MS": "2"}
    ok_before = anyio.Event()
    seen_down = anyio.Event()
    ok_after = anyio.Event()
    phase = "before"
    counts: Counter[tuple[str, int]] = Counter()
    ok_by_user: Counter[str] = Counter()
    bad_retry_after: list[str | None] = []
    with uvicorn_server(APP, workers=2, env=env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def traffic(user: str) -> None:
                for _ in range(2000):  # bounded: the phases below end it much sooner
                    if ok_after.is_set():
                        return
                    response = await client.post("/checkout", headers={"x-user-id": user})
                    counts[(phase, response.status_code)] += 1
                    if response.status_code == 200:
                        ok_by_user[user] += 1
                    else:
                        retry_after = response.headers.get("retry-after")
                        if not (retry_after and int(retry_after) >= 1):
                            bad_retry_after.append(retry_after)
                    if counts[("before", 200)] >= 20:
                        ok_before.set()
                    if counts[("down", 503)] >= 10:
                        seen_down.set()
                    if counts[("after", 200)] >= 20:
                        ok_after.set()
                    await anyio.sleep(0.01)  # pacing of the client loop

            async with anyio.create_task_group() as tg:
                for user in ("u0", "u0", "u1", "u1"):
                    tg.start_soon(traffic, user)
                await ok_before.wait()
                phase = "down"
                own_redis.kill()
                await seen_down.wait()
                own_redis.start()
                await own_redis.ready()
                phase = "after"
                await ok_after.wait()
    assert set(status for _, status in counts) <= {200, 503}
    assert counts[("down", 503)] >= 10
    assert counts[("after", 200)] >= 20
    assert bad_retry_after == []
    log = await read_log(raw, namespace)
    assert_no_same_key_overlap(log)
    for user in ("u0", "u1"):
        assert int(await raw.get(f"{namespace}:balance:{user}")) == -ok_by_user[user]
    import redis.asyncio as aioredis

    lock_redis = aioredis.Redis.from_url(own_redis.url)
    async for name in lock_redis.scan_iter(match="*"):
        assert name.endswith(b":m"), f"{name!r} left behind"
        assert await lock_redis.pttl(name) > 0
    await lock_redis.aclose()
