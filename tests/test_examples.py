"""Every file in examples/ runs here and does what it says.

Examples that need a piece still on another branch (the middleware, the per-route guard, a
backend) skip with the branch's name until that piece is on main; once it is, they run.
"""

from __future__ import annotations

import importlib.util
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


# -- the middleware (branch `middleware`) ---------------------------------------------------


def needs(*names: str, branch: str) -> None:
    """Skip until `names` are exported by keyedlock_asgi, i.e. until `branch` is on main."""
    import keyedlock_asgi

    missing = [name for name in names if not hasattr(keyedlock_asgi, name)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} from the `{branch}` branch")


@pytest.fixture
def checkout() -> ModuleType:
    needs("KeyedLockMiddleware", "keys", branch="middleware")
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
