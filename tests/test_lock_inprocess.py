"""In-process specifics of `KeyedLock`: memory, event loops, the one-liner, option checks."""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import KeyedLock, LockAborted, LockStats, mutex
from tests.support.waiting import wait_until

IDLE = LockStats(active_keys=0, holders=0, waiting=0)


@pytest.mark.anyio
async def test_idle_keys_keep_no_memory() -> None:
    """100,000 keys held and released leave under 16 KiB behind, whatever their number: a
    per-key leak of even one byte would leave 100 kB (a dict entry alone is tens of bytes).
    What stays is the interpreter's own, allocated once (Python 3.10 keeps a spare frame per
    function: about 2 KiB here, at 100,000 keys as at 300,000). It was a million keys, at 24 s
    a run under tracemalloc, for the same proof."""
    lock = KeyedLock()

    async def use(keys: int, prefix: str) -> None:
        for n in range(keys):
            async with lock.hold(f"{prefix}:{n}"):
                pass

    tracemalloc.start()
    try:
        await use(1000, "warm-up")  # the loop's table, caches and cached frames exist now
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        await use(100_000, "user")
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lock.stats() == IDLE
    assert after - before < 16 * 1024


@pytest.mark.anyio
async def test_contended_keys_are_forgotten_too() -> None:
    lock = KeyedLock()
    entered, leave = anyio.Event(), anyio.Event()

    async def holder(key: str) -> None:
        async with lock.hold(key):
            entered.set()
            await leave.wait()

    async def waiter(key: str) -> None:
        async with lock.hold(key):
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder, "k")
        await entered.wait()
        for _ in range(5):
            tg.start_soon(waiter, "k")
        await wait_until(lambda: lock.waiting("k") == 5, 'lock.waiting("k") == 5')
        leave.set()
    assert lock.stats() == IDLE
    (state,) = lock._states.values()
    assert state.keys == {}


def test_one_lock_serves_successive_event_loops() -> None:
    lock = KeyedLock()
    order: list[str] = []

    async def session(name: str) -> None:
        entered, leave = anyio.Event(), anyio.Event()

        async def holder() -> None:
            async with lock.hold("k"):
                order.append(f"{name}: holder")
                entered.set()
                await leave.wait()

        async def waiter() -> None:
            async with lock.hold("k"):
                order.append(f"{name}: waiter")

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await entered.wait()
            tg.start_soon(waiter)
            await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
            leave.set()
        assert lock.stats() == IDLE

    anyio.run(session, "asyncio 1", backend="asyncio")
    anyio.run(session, "trio", backend="trio")
    anyio.run(session, "asyncio 2", backend="asyncio")
    assert order == [
        f"{name}: {who}"
        for name in ("asyncio 1", "trio", "asyncio 2")
        for who in ("holder", "waiter")
    ]


def test_a_finished_event_loop_leaves_nothing_behind() -> None:
    """The lock keeps each loop's table weakly: a finished loop, and its table, are freed (the
    last one seen stays cached until the next). A table that refers to its loop (a bound
    `loop.create_future`) kept every loop a long-lived lock ever ran on."""
    lock = KeyedLock()

    async def contend() -> None:
        entered, leave = anyio.Event(), anyio.Event()

        async def holder() -> None:
            async with lock.hold("k"):
                entered.set()
                await leave.wait()

        async def waiter() -> None:
            async with lock.hold("k"):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await entered.wait()
            tg.start_soon(waiter)
            await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
            leave.set()

    for backend in ("asyncio", "trio", "asyncio", "asyncio", "trio"):
        anyio.run(contend, backend=backend)
    gc.collect()
    assert len(lock._states) == 1  # the trio run seen last, in the cache


def test_state_outside_an_event_loop_is_idle() -> None:
    lock = KeyedLock()
    assert lock.stats() == IDLE
    assert not lock.locked("k")
    assert lock.waiting("k") == 0


@pytest.mark.anyio
async def test_mutex_one_liner_sync_async_and_stop() -> None:
    def sync_add(a: int, b: int) -> int:
        return a + b

    async def async_mul(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a * b

    assert await mutex("user:1", sync_add, 2, 3) == 5
    assert await mutex("user:1", async_mul, 2, 3) == 6

    entered, fail = anyio.Event(), anyio.Event()
    outcomes: list[object] = []

    async def failing() -> None:
        entered.set()
        await fail.wait()
        raise ValueError("card declined")

    async def first() -> None:
        with pytest.raises(ValueError, match="card declined"):
            await mutex("user:2", failing, on_error="stop")

    async def queued() -> None:
        try:
            await mutex("user:2", sync_add, 1, 1)
        except LockAborted as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await entered.wait()
        tg.start_soon(queued)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        fail.set()
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], LockAborted)
    assert await mutex("user:2", sync_add, 1, 1) == 2  # later arrivals run normally


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"timeout": -1}, ValueError),
        ({"max_waiting": -1}, ValueError),
        ({"max_waiting": 1.5}, TypeError),
        ({"max_concurrency": 0}, ValueError),
        ({"max_concurrency": True}, TypeError),
        ({"on_error": "ignore"}, ValueError),
        ({"on_backend_error": "maybe"}, ValueError),
        ({"key_prefix": 1}, TypeError),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        KeyedLock(**options)  # type: ignore[arg-type]


def test_bad_hold_arguments_are_refused_at_once() -> None:
    lock = KeyedLock()
    with pytest.raises(TypeError):
        lock.hold(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lock.hold("a", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        lock.hold("a", timeout=-0.5)
    with pytest.raises(ValueError, match="on_error"):
        lock.hold("a", on_error="explode")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hold\\(\\) got unexpected keyword arguments: time_out"):
        lock.hold("a", time_out=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="shared must be a bool"):
        lock.hold("a", shared=1)  # type: ignore[arg-type]
    assert lock.hold("a", shared=True).options == lock.defaults._replace(shared=True)
    assert lock.hold("a", shared=False).options == lock.defaults


def test_options_are_readable() -> None:
    lock = KeyedLock(
        timeout=2.0, max_waiting=10, max_concurrency=2, on_error="stop", key_prefix="p:"
    )
    assert (lock.timeout, lock.max_waiting, lock.max_concurrency) == (2.0, 10, 2)
    assert (lock.on_error, lock.key_prefix, lock.backend) == ("stop", "p:", None)
    assert "in-process" in repr(lock)


@pytest.mark.parametrize(
    "release_first", [False, True], ids=["cancel-then-release", "release-then-cancel"]
)
def test_plain_asyncio_cancel_at_hand_off_passes_the_key_on(release_first: bool) -> None:
    """`Task.cancel()` from asyncio code (no anyio scope) in the same step as the hand-off: the
    cancelled waiter never runs its block and the next waiter gets the key."""
    import asyncio

    lock = KeyedLock()
    entered: list[str] = []

    async def waiter(name: str) -> None:
        async with lock.hold("k"):
            entered.append(name)

    async def main() -> None:
        holder = lock.hold("k")
        await holder.__aenter__()
        doomed = asyncio.create_task(waiter("W1"))
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        second = asyncio.create_task(waiter("W2"))
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        # No await between these two steps: W1 cannot run in between.
        if release_first:
            await holder.__aexit__(None, None, None)
            doomed.cancel()
        else:
            doomed.cancel()
            await holder.__aexit__(None, None, None)
        await wait_until(
            lambda: doomed.done() and second.done(), "both waiters done"
        )  # a stranded key never ends
        assert doomed.cancelled()
        assert entered == ["W2"]
        assert lock.stats() == IDLE

    asyncio.run(main())


def _loop_runners() -> list[Any]:
    import asyncio

    runners: list[Any] = [pytest.param(asyncio.run, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the dev extra, not on Windows
        return runners
    return [*runners, pytest.param(uvloop.run, id="uvloop")]


@pytest.mark.parametrize("run", _loop_runners())
def test_loops_in_two_threads_keep_their_own_keys(run: Callable[[Any], Any]) -> None:
    """The lock trusts its cached asyncio loop only where that loop runs: a thread running
    another loop, while the cached one is in the middle of a task step, gets its own table.
    uvloop (no readable `_thread_id`) always asks asyncio for the running loop."""
    import threading

    lock = KeyedLock()
    a_holds = threading.Event()
    b_done = threading.Event()
    seen_in_b: list[object] = []

    async def in_thread_a() -> None:
        async with lock.hold("k"):
            a_holds.set()
            # Spin inside this task step (no await): loop A has a running task meanwhile.
            while not b_done.wait(0.001):
                pass
            assert lock.stats() == LockStats(active_keys=1, holders=1, waiting=0)

    async def in_thread_b() -> None:
        try:
            async with lock.hold("k", timeout=0):  # loop B's own table: "k" is free there
                seen_in_b.append(lock.stats())
        except BaseException as error:  # reported by the assertion below
            seen_in_b.append(error)
        finally:
            b_done.set()

    thread_a = threading.Thread(target=run, args=(in_thread_a(),))
    thread_a.start()
    assert a_holds.wait(10)
    thread_b = threading.Thread(target=run, args=(in_thread_b(),))
    thread_b.start()
    thread_b.join()
    thread_a.join()
    assert seen_in_b == [LockStats(active_keys=1, holders=1, waiting=0)]


@pytest.mark.parametrize("run", _loop_runners())
def test_fifo_hand_off_and_cancellation_on_each_asyncio_loop(run: Callable[[Any], Any]) -> None:
    """The asyncio fast paths on asyncio's own loop and on uvloop: FIFO hand-off, a cancelled
    waiter skipped, the table empty afterwards."""
    import asyncio

    lock = KeyedLock()
    entered: list[str] = []

    async def waiter(name: str) -> None:
        async with lock.hold("k"):
            entered.append(name)
            await asyncio.sleep(0)

    async def main() -> None:
        holder = lock.hold("k")
        await holder.__aenter__()
        tasks = {}
        for index, name in enumerate(["W1", "W2", "W3", "W4"]):
            tasks[name] = asyncio.create_task(waiter(name))
            await wait_until(
                lambda count=index + 1: lock.waiting("k") == count, "the next waiter queued"
            )
        tasks["W2"].cancel()
        await holder.__aexit__(None, None, None)
        await wait_until(
            lambda: all(task.done() for task in tasks.values()),
            "every waiter done",
        )
        assert tasks["W2"].cancelled()
        assert entered == ["W1", "W3", "W4"]
        assert lock.stats() == IDLE

    run(main())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_inside_a_task_keeps_its_own_keys() -> None:
    """A child forked while a task of the parent's loop holds a key inherits asyncio's record
    of that task; its own loop must still get its own table (and no stale holder)."""
    import asyncio

    lock = KeyedLock()

    async def in_child() -> int:
        order: list[int] = []

        async def worker(n: int) -> None:
            async with lock.hold("k", timeout=5):  # the parent's holder does not exist here
                order.append(n)
                await asyncio.sleep(0)

        await asyncio.gather(worker(1), worker(2))
        return 0 if order == [1, 2] and lock.stats() == IDLE else 1

    async def in_parent() -> int:
        async with lock.hold("k"):
            pid = os.fork()
            if pid == 0:  # the child: a fresh loop; report through the exit code only
                code = 1
                try:
                    code = asyncio.new_event_loop().run_until_complete(in_child())
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)  # noqa: ASYNC222 - blocking on purpose: nothing else runs
        return os.waitstatus_to_exitcode(status)

    assert asyncio.run(in_parent()) == 0


def test_a_loop_run_inside_a_task_of_another_keeps_its_own_keys() -> None:
    """A second loop run to completion from inside a task of the first (as nest_asyncio and
    some sync-over-async helpers do): its tasks get its own table, not the outer loop's."""
    import asyncio
    from asyncio import events

    lock = KeyedLock()

    async def inner() -> list[int]:
        order: list[int] = []

        async def worker(n: int) -> None:
            async with lock.hold("k"):
                order.append(n)
                await asyncio.sleep(0)

        await asyncio.gather(worker(1), worker(2))
        return order

    async def outer() -> list[int]:
        async with lock.hold("k"):  # the outer loop holds "k" while the inner one runs
            inner_loop = asyncio.new_event_loop()
            running = events._get_running_loop()
            events._set_running_loop(None)
            try:
                return inner_loop.run_until_complete(inner())
            finally:
                events._set_running_loop(running)
                inner_loop.close()

    assert asyncio.run(outer()) == [1, 2]
