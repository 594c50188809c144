"""`lock.coalesce`: single flight per key, on asyncio and trio (conftest runs both).

Order is proved with events and a recorded timeline, never with sleeps.
"""

from __future__ import annotations

import anyio
import pytest

from keyedlock_asgi import KeyedLock
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def test_100_concurrent_callers_make_one_call() -> None:
    lock = KeyedLock()
    calls: list[int] = []
    release = anyio.Event()
    results: list[str] = []

    async def load(n: int) -> str:
        calls.append(n)
        await release.wait()
        return f"value-{n}"

    async def caller(n: int) -> None:
        results.append(await lock.coalesce("user:42", load, n))

    async with anyio.create_task_group() as tg:
        for n in range(100):
            tg.start_soon(caller, n)
        await wait_until(lambda: len(calls) == 1, "len(calls) == 1")
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert len(calls) == 1
    assert results == [f"value-{calls[0]}"] * 100
    # Nothing is cached: the next call runs fn again.
    assert await lock.coalesce("user:42", lambda: "fresh") == "fresh"


async def test_other_keys_run_their_own_call() -> None:
    lock = KeyedLock()
    inside: list[str] = []
    release = anyio.Event()

    async def load(key: str) -> str:
        inside.append(key)
        await release.wait()
        return key

    async with anyio.create_task_group() as tg:
        for key in ("a", "b", "a", "b"):
            tg.start_soon(lock.coalesce, key, load, key)
        await wait_until(lambda: len(inside) == 2, "len(inside) == 2")
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert sorted(inside) == ["a", "b"]


async def test_sync_function_and_kwargs() -> None:
    lock = KeyedLock(key_prefix="p:")
    assert await lock.coalesce("k", lambda x, *, y: x + y, 1, y=2) == 3


async def test_cancelled_first_caller_hands_the_call_to_the_first_waiter() -> None:
    lock = KeyedLock()
    timeline: list[str] = []
    first_inside = anyio.Event()
    second_inside = anyio.Event()
    release = anyio.Event()

    async def load(who: str) -> str:
        timeline.append(f"run {who}")
        if who == "first":
            first_inside.set()
            await anyio.sleep_forever()
        second_inside.set()
        await release.wait()
        return f"by {who}"

    results: dict[str, str] = {}

    async def caller(who: str) -> None:
        results[who] = await lock.coalesce("k", load, who)

    async with anyio.create_task_group() as tg:
        first_scope = anyio.CancelScope()

        async def first() -> None:
            with first_scope:
                await caller("first")
            timeline.append("first cancelled")

        tg.start_soon(first)
        await first_inside.wait()
        tg.start_soon(caller, "second")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(caller, "third")
        await anyio.wait_all_tasks_blocked()
        first_scope.cancel()
        await second_inside.wait()
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert timeline[0] == "run first"
    assert sorted(timeline[1:]) == ["first cancelled", "run second"]  # never "run third"
    assert "first" not in results  # the cancelled caller got its cancellation, nothing else
    assert results == {"second": "by second", "third": "by second"}


async def test_exception_reaches_every_waiter() -> None:
    lock = KeyedLock()
    calls = 0
    release = anyio.Event()
    errors: list[BaseException] = []

    async def load() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        raise LookupError("no such user")

    async def caller() -> None:
        try:
            await lock.coalesce("k", load)
        except LookupError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
        await wait_until(lambda: calls == 1, "calls == 1")
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert calls == 1
    assert len(errors) == 10
    assert all(str(error) == "no such user" for error in errors)
    # Nothing cached after a failure either.
    assert await lock.coalesce("k", lambda: "ok") == "ok"


async def test_waiter_cancelled_leaves_the_call_running() -> None:
    lock = KeyedLock()
    release = anyio.Event()
    got: list[str] = []

    async def load() -> str:
        await release.wait()
        return "v"

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(got, lock.coalesce("k", load)))
        await anyio.wait_all_tasks_blocked()
        with anyio.move_on_after(0):
            await lock.coalesce("k", load)  # a waiter that gives up at once
        release.set()
    assert got == ["v"]


async def _append(into: list[str], awaitable: object) -> None:
    into.append(await awaitable)  # type: ignore[misc]


async def test_runner_and_its_successor_cancelled_third_caller_runs() -> None:
    lock = KeyedLock()
    ran: list[str] = []
    inside = {name: anyio.Event() for name in ("a", "b", "c")}
    scopes = {name: anyio.CancelScope() for name in ("a", "b")}
    results: dict[str, str] = {}

    async def load(who: str) -> str:
        ran.append(who)
        inside[who].set()
        if who in scopes:
            await anyio.sleep_forever()
        return f"by {who}"

    async def caller(who: str) -> None:
        with scopes.get(who, anyio.CancelScope()):
            results[who] = await lock.coalesce("k", load, who)

    async with anyio.create_task_group() as tg:
        for who in ("a", "b", "c", "d"):
            tg.start_soon(caller, who)
            await anyio.wait_all_tasks_blocked()  # arrival order a, b, c, d
        scopes["a"].cancel()
        await inside["b"].wait()
        scopes["b"].cancel()
    assert ran == ["a", "b", "c"]
    assert results == {"c": "by c", "d": "by c"}


async def test_the_docs_single_flight_example() -> None:
    from docs.examples import single_flight

    single_flight.queries.clear()
    assert await single_flight.ten_pages() == (10, 1)
