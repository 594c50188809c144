"""Every file in examples/ runs here and does what it says.

Examples that need a piece still on another branch (the middleware, the per-route guard, a
backend) skip with the branch's name until that piece is on main; once it is, they run.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    """Import examples/<name>.py as a fresh module (examples/ is not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example as its README/docs say: `python examples/<name>.py`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


# -- core only -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_liner_aborts_the_queued_calls_and_runs_later_ones() -> None:
    one_liner = load("one_liner")
    outcome = await one_liner.main()
    assert outcome == {
        1: "failed (card declined)",
        2: "aborted (card declined)",
        3: "aborted (card declined)",
        4: "charged on attempt 4",
    }


@pytest.mark.anyio
async def test_cache_stampede_makes_one_database_call_for_100_misses() -> None:
    example = load("cache_stampede")
    db = example.Database()
    cache = example.ProductCache(db)
    results = await example.stampede(cache, "42", callers=100)
    assert db.calls == 1
    assert len(results) == 100
    assert all(result == {"id": "42", "name": "Product 42"} for result in results)
    # Another product is one more call; a warm product none.
    await example.stampede(cache, "7", callers=10)
    await example.stampede(cache, "42", callers=10)
    assert db.calls == 2
    assert cache.lock.stats().active_keys == 0


def test_cache_stampede_runs_as_a_script() -> None:
    result = run_script("cache_stampede")
    assert result.returncode == 0, result.stderr
    assert "-> 1 database call(s)" in result.stdout


# -- the middleware ------------------------------------------------------------------------


@pytest.fixture
def checkout() -> ModuleType:
    return load("checkout")


@pytest.mark.anyio
async def test_checkout_without_the_middleware_double_charges(checkout: ModuleType) -> None:
    outcome = await checkout.run(protected=False)
    assert outcome.orders > 1
    assert outcome.balance < 0
    assert outcome.waited == 0
    assert outcome.statuses.get(201) == outcome.orders  # each one charged
    assert sum(outcome.statuses.values()) == 50


@pytest.mark.anyio
async def test_checkout_with_the_middleware_charges_once(checkout: ModuleType) -> None:
    outcome = await checkout.run(protected=True)
    assert checkout.correct(outcome)
    assert (outcome.orders, outcome.balance) == (1, 0)
    assert outcome.statuses == {201: 1, 402: 49}
    # Requests that arrived while the first held the key queued behind it (at least the
    # second one: the first holds the key across the payment provider's await).
    assert 1 <= outcome.waited <= 49


def test_checkout_script_prints_the_table_and_exits_zero(checkout: ModuleType) -> None:
    result = run_script("checkout")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "final balance" in line)
    assert header.split() == ["orders", "final", "balance", "waited", "time"]
    protected = next(line for line in lines if line.startswith("with KeyedLockMiddleware"))
    orders, balance = protected.split()[2:4]
    assert (orders, balance) == ("1", "0")


def test_checkout_exits_nonzero_when_the_protected_run_is_wrong(checkout: ModuleType) -> None:
    wrong = checkout.Outcome("with KeyedLockMiddleware", 2, -100, 0, 0.1, {201: 2})
    assert not checkout.correct(wrong)
    right = checkout.Outcome("with KeyedLockMiddleware", 1, 0, 49, 0.1, {201: 1, 402: 49})
    assert checkout.correct(right)


def test_checkout_serve_runs_under_uvicorn(checkout: ModuleType) -> None:
    import anyio
    import httpx

    from tests.support.server import free_port, wait_until_listening

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "checkout.py"), "--serve", "--port", str(port)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_listening(port, proc)

        async def ten_checkouts() -> tuple[list[int], int]:
            statuses: list[int] = []
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url) as client:

                async def post() -> None:
                    response = await client.post("/checkout", headers={"X-User-Id": "alice"})
                    statuses.append(response.status_code)

                async with anyio.create_task_group() as tg:
                    for _ in range(10):
                        tg.start_soon(post)
                balance = (await client.get("/balance/alice")).json()["balance"]
            return sorted(statuses), balance

        statuses, balance = anyio.run(ten_checkouts)
        assert statuses == [201] + [402] * 9
        assert balance == 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "curl" in out


async def post_all(app: object, requests: list[tuple[str, dict[str, str]]]) -> list[int]:
    """Send the POSTs concurrently through the app in-process; their statuses, in order."""
    import anyio
    import httpx

    statuses = [0] * len(requests)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def post(i: int, path: str, headers: dict[str, str]) -> None:
            statuses[i] = (await client.post(path, headers=headers, json={})).status_code

        async with anyio.create_task_group() as tg:
            for i, (path, headers) in enumerate(requests):
                tg.start_soon(post, i, path, headers)
    return statuses


@pytest.mark.anyio
async def test_webhooks_retry_in_flight_gets_409_then_the_stored_response() -> None:
    import anyio
    import httpx

    webhooks = load("webhooks")
    started, finish, seen = anyio.Event(), anyio.Event(), []

    async def slow(event: dict[str, object]) -> None:
        seen.append(event)
        if len(seen) == 1:
            started.set()
            await finish.wait()

    app, handled = webhooks.webhook_app(slow)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first: list[httpx.Response] = []

        async def deliver_first() -> None:
            first.append(await client.post("/webhooks", headers={"Webhook-Id": "evt_1"}, json={}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver_first)
            await started.wait()  # evt_1 is being processed, its key held
            with anyio.fail_after(10):
                duplicate = await client.post("/webhooks", headers={"Webhook-Id": "evt_1"}, json={})
            assert duplicate.status_code == 409
            assert int(duplicate.headers["retry-after"]) >= 1
            assert "evt_1" not in duplicate.text  # the key is never echoed
            finish.set()
        assert first[0].json() == {"status": "processed", "handled": 1}
        again = await client.post("/webhooks", headers={"Webhook-Id": "evt_1"}, json={})
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first[0].content  # the stored response, byte for byte
        other = await client.post("/webhooks", headers={"Webhook-Id": "evt_2"}, json={})
        assert other.json() == {"status": "processed", "handled": 2}
        missing = await client.post("/webhooks", json={})
        assert missing.status_code == 400
    assert len(seen) == 2  # evt_1 once, evt_2 once
    assert len(handled) == 2


def test_webhooks_runs_as_a_script() -> None:
    result = run_script("webhooks")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    statuses = [re.search(r"\s(\d{3})\s", line) for line in lines[:3]]
    assert [match.group(1) for match in statuses if match] == ["409", "200", "200"]
    assert "retry-after=1" in lines[0]
    assert "replayed=true" in lines[2]
    assert lines[-1] == "handled 1 time(s)"


@pytest.mark.anyio
async def test_inventory_one_reservation_per_product_at_a_time() -> None:
    import anyio

    inventory_example = load("inventory")
    inventory = inventory_example.Inventory({1: 5, 2: 5})
    product_1_inside, release_1 = anyio.Event(), anyio.Event()

    async def warehouse(product_id: int) -> None:
        if product_id == 1 and not release_1.is_set():
            product_1_inside.set()
            await release_1.wait()

    app = inventory_example.inventory_app(inventory, warehouse)
    async with anyio.create_task_group() as tg:
        # Product 1's first reservation stops inside; product 2 still gets served meanwhile.
        tg.start_soon(post_all, app, [("/products/1/reserve", {})])
        await product_1_inside.wait()
        assert await post_all(app, [("/products/2/reserve", {})]) == [201]
        release_1.set()
    # 20 concurrent reservations, "/products/001" and "/products/1" being the same product.
    paths = [("/products/001/reserve" if n % 2 else "/products/1/reserve", {}) for n in range(20)]
    statuses = await post_all(app, paths)
    assert sorted(statuses) == [201] * 4 + [409] * 16  # 5 in stock, one taken above
    assert inventory.stock == {1: 0, 2: 4}
    assert inventory.peak == {1: 1, 2: 1}


@pytest.mark.anyio
async def test_inventory_demo_main() -> None:
    inventory = await load("inventory").main()
    assert inventory.stock == {1: 0, 2: 0}
    assert inventory.peak == {1: 1, 2: 1}


# -- per route -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fastapi_app_serializes_per_user_and_per_order() -> None:
    example = load("fastapi_app")
    result = await example.main()
    assert result["orders"] == ["alice", "bob"]  # ten checkouts each, one paid each
    assert result["balances"] == {"alice": 0, "bob": 0}
    assert result["refunds"] == {7: 1}  # ten concurrent refunds of order 7, one ran
    assert example.lock.stats().active_keys == 0


@pytest.mark.anyio
async def test_fastapi_app_keys_are_validated_and_documented() -> None:
    import httpx

    example = load("fastapi_app")
    transport = httpx.ASGITransport(app=example.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/checkout")).status_code == 422  # no X-User-Id header
        assert (await client.post("/orders/abc/refund")).status_code == 422
        schema = (await client.get("/openapi.json")).json()
    checkout_params = schema["paths"]["/checkout"]["post"]["parameters"]
    assert [p["name"] for p in checkout_params] == ["x-user-id"]
    refund_params = schema["paths"]["/orders/{order_id}/refund"]["post"]["parameters"]
    assert [p["name"] for p in refund_params] == ["order_id"]


# -- several workers -----------------------------------------------------------------------


@pytest.fixture
def redis_example() -> ModuleType:
    import redis

    from tests.conftest import service_missing

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=2).ping()
    except redis.RedisError as error:
        service_missing("Redis", str(error))
    return load("multi_worker_redis")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio is asyncio-only
@pytest.mark.anyio
async def test_multi_worker_redis_two_workers_in_process(redis_example: ModuleType) -> None:
    import uuid

    from redis.asyncio import Redis

    namespace = f"example-{uuid.uuid4().hex[:12]}"
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    await redis.set(f"{namespace}:balance:alice", 100)
    workers = [redis_example.build(namespace=namespace) for _ in range(2)]  # two locks, two apps
    try:
        import anyio

        requests = [("/checkout", {"X-User-Id": "alice"})] * 5
        statuses: list[int] = []

        async def worker(app: object) -> None:
            statuses.extend(await post_all(app, requests))

        async with anyio.create_task_group() as tg:
            for app, _ in workers:
                tg.start_soon(worker, app)
        assert sorted(statuses) == [201] + [402] * 9
        assert int(await redis.get(f"{namespace}:balance:alice")) == 0
        assert int(await redis.get(f"{namespace}:orders:alice")) == 1
    finally:
        for _, lock in workers:
            await lock.aclose()
        keys = [key async for key in redis.scan_iter(f"{namespace}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


@pytest.mark.multiprocess
def test_multi_worker_redis_under_uvicorn_with_four_workers(redis_example: ModuleType) -> None:
    import uuid

    import anyio
    import httpx
    import redis

    from tests.support.server import uvicorn_server

    namespace = f"example-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    client.set(f"{namespace}:balance:alice", 300)  # three orders' worth
    env = {"SHOP_NAMESPACE": namespace, "REDIS_URL": "redis://127.0.0.1:6379/0"}
    try:
        with uvicorn_server("examples.multi_worker_redis:app", workers=4, env=env) as url:

            async def checkouts() -> list[int]:
                statuses: list[int] = []
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:

                    async def post() -> None:
                        response = await http.post("/checkout", headers={"X-User-Id": "alice"})
                        statuses.append(response.status_code)

                    async with anyio.create_task_group() as tg:
                        for _ in range(40):
                            tg.start_soon(post)
                return sorted(statuses)

            assert anyio.run(checkouts) == [201] * 3 + [402] * 37
        assert int(client.get(f"{namespace}:balance:alice")) == 0
        assert int(client.get(f"{namespace}:orders:alice")) == 3
    finally:
        keys = list(client.scan_iter(f"{namespace}*"))
        if keys:
            client.delete(*keys)
        client.close()
