"""The semantics of `KeyedLock`, proved by recorded order on every engine and both event loops.

Each test takes `make_lock` (tests/conftest.py): it runs once per engine (in-process, and each
distributed backend registered in tests/support/engines.py) and per anyio backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import (
    Held,
    KeyedLock,
    KeyedLockError,
    LockAborted,
    LockBusy,
    LockReentryError,
    LockStats,
    LockTimeout,
    QueueFull,
)
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

MakeLock = Callable[..., KeyedLock]
IDLE = LockStats(active_keys=0, holders=0, waiting=0)


async def hold_until(lock: KeyedLock, key: str, entered: anyio.Event, leave: anyio.Event) -> None:
    async with lock.hold(key):
        entered.set()
        await leave.wait()


async def test_one_holder_per_key_in_arrival_order(make_lock: MakeLock) -> None:
    lock = make_lock()
    timeline = Timeline()
    entered, leave = anyio.Event(), anyio.Event()

    async def worker(n: int) -> None:
        async with lock.hold("k"):
            timeline.enter("k", n)
            await anyio.lowlevel.checkpoint()
            timeline.leave("k", n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "k", entered, leave)
        await entered.wait()
        for n in range(8):
            tg.start_soon(worker, n)
            await wait_until(lambda n=n: lock.waiting("k") == n + 1, 'lock.waiting("k") == n + 1')
        leave.set()
    assert timeline.entries("k") == list(range(8))
    assert timeline.most["k"] == 1
    assert lock.stats() == IDLE


async def test_different_keys_never_wait_on_each_other(make_lock: MakeLock) -> None:
    lock = make_lock()
    a_in, a_leave, b_done = anyio.Event(), anyio.Event(), anyio.Event()

    async def on_b() -> None:
        async with lock.hold("b"):
            b_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "a", a_in, a_leave)
        await a_in.wait()
        tg.start_soon(on_b)
        await b_done.wait()  # "b" got in while "a" was still held
        assert lock.locked("a")
        a_leave.set()
    assert lock.stats() == IDLE


async def test_max_concurrency_holders_at_once(make_lock: MakeLock) -> None:
    lock = make_lock(max_concurrency=3)
    timeline = Timeline()
    release = anyio.Event()

    async def worker(n: int) -> None:
        async with lock.hold("k"):
            timeline.enter("k", n)
            await release.wait()
            timeline.leave("k", n)

    async with anyio.create_task_group() as tg:
        for n in range(7):
            tg.start_soon(worker, n)
        await wait_until(
            lambda: lock.waiting("k") == 4 and timeline.inside.get("k") == 3,
            "3 inside, 4 queued",
        )
        assert lock.stats().holders == 3
        release.set()
    assert timeline.most["k"] == 3
    assert lock.stats() == IDLE


async def test_release_and_ask_again_queues_behind_waiters(make_lock: MakeLock) -> None:
    lock = make_lock()
    order: list[str] = []
    entered, leave = anyio.Event(), anyio.Event()

    async def first() -> None:
        async with lock.hold("k"):
            order.append("A")
            entered.set()
            await leave.wait()
        async with lock.hold("k"):  # immediately again: behind B and C
            order.append("A again")

    async def other(name: str) -> None:
        async with lock.hold("k"):
            order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await entered.wait()
        tg.start_soon(other, "B")
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        tg.start_soon(other, "C")
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        leave.set()
    assert order == ["A", "B", "C", "A again"]
    assert lock.stats() == IDLE


async def test_release_from_another_task(make_lock: MakeLock) -> None:
    lock = make_lock()
    held = lock.hold("k")
    await held.__aenter__()
    timeline = Timeline()

    async def waiter() -> None:
        async with lock.hold("k"):
            timeline.enter("k", "waiter")
            timeline.leave("k", "waiter")

    async def releaser() -> None:
        await held.__aexit__(None, None, None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        tg.start_soon(releaser)
    assert timeline.entries() == ["waiter"]
    assert lock.stats() == IDLE


async def test_cancelled_waiter_leaves_the_queue_and_never_holds(make_lock: MakeLock) -> None:
    lock = make_lock()
    timeline = Timeline()
    entered, leave = anyio.Event(), anyio.Event()
    gone = anyio.Event()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                async with lock.hold("k"):
                    timeline.enter("k", name)
                    timeline.leave("k", name)
        finally:
            if name == "cancelled":
                gone.set()

    doomed = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "k", entered, leave)
        await entered.wait()
        tg.start_soon(waiter, "cancelled", doomed)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        tg.start_soon(waiter, "next", anyio.CancelScope())
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        doomed.cancel()
        await gone.wait()
        assert lock.waiting("k") == 1  # it left as it ended; the key is still held
        assert lock.locked("k")
        leave.set()
    assert timeline.entries() == ["next"]
    assert lock.stats() == IDLE


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["no-deadline", "deadline"])
@pytest.mark.parametrize(
    "release_first", [False, True], ids=["cancel-then-release", "release-then-cancel"]
)
async def test_waiter_cancelled_at_hand_off_passes_the_key_on(
    make_lock: MakeLock, release_first: bool, timeout: float | None
) -> None:
    """The anyio 4.13 stranded-lock race (anyio PR #1145): cancel and release in one step.

    With and without a deadline: the two take different waiting paths."""
    lock = make_lock()
    timeline = Timeline()
    holder = lock.hold("k")
    await holder.__aenter__()
    doomed = anyio.CancelScope()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with lock.hold("k", timeout=timeout):
                timeline.enter("k", name)
                try:
                    await anyio.lowlevel.checkpoint()
                finally:
                    timeline.leave("k", name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "W1", doomed)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        tg.start_soon(waiter, "W2", anyio.CancelScope())
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        # No checkpoint between these two steps: the waiter cannot run in between.
        if release_first:
            await holder.__aexit__(None, None, None)
            doomed.cancel()
        else:
            doomed.cancel()
            await holder.__aexit__(None, None, None)
        tg.start_soon(waiter, "newcomer", anyio.CancelScope())
    assert "W1" not in timeline.entries()
    assert timeline.entries() == ["W2", "newcomer"]
    assert lock.stats() == IDLE


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["no-deadline", "deadline"])
async def test_a_successor_cancelled_as_it_is_handed_the_key_leaves_it_free(
    make_lock: MakeLock, timeout: float | None
) -> None:
    """The holder leaves and the caller next in line, handed the key that very moment, is
    cancelled before it could run: nothing stays held, in the process nor in the engine (an
    engine lease passed on to that caller is given back), so the key is free at once."""
    lock = make_lock()
    timeline = Timeline()
    holder = lock.hold("k")
    await holder.__aenter__()
    timeline.enter("k", "holder")
    doomed = anyio.CancelScope()

    async def successor() -> None:
        with doomed:
            async with lock.hold("k", timeout=timeout):
                timeline.enter("k", "successor")

    async with anyio.create_task_group() as tg:
        tg.start_soon(successor)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        timeline.leave("k", "holder")
        await holder.__aexit__(None, None, None)
        doomed.cancel()  # no checkpoint since the hand-off: the successor has not run
    assert doomed.cancelled_caught
    async with lock.hold("k", timeout=0) as held:
        timeline.enter("k", "next")
        assert held.token > holder.token
        timeline.leave("k", "next")
    assert timeline.entries() == ["holder", "next"]
    assert lock.stats() == IDLE


async def test_cancelled_holder_releases(make_lock: MakeLock) -> None:
    lock = make_lock()
    timeline = Timeline()
    entered = anyio.Event()
    scope = anyio.CancelScope()

    async def holder() -> None:
        with scope:
            async with lock.hold("k"):
                timeline.enter("k", "holder")
                entered.set()
                await anyio.sleep_forever()

    async def waiter() -> None:
        async with lock.hold("k"):
            timeline.enter("k", "waiter")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await entered.wait()
        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        scope.cancel()
    assert timeline.entries() == ["holder", "waiter"]
    assert lock.stats() == IDLE


async def test_release_is_not_interrupted_by_cancellation(make_lock: MakeLock) -> None:
    lock = make_lock()
    with anyio.CancelScope() as scope:
        async with lock.hold("k"):
            scope.cancel()  # the block's exit runs with a cancellation pending
    assert scope.cancel_called
    assert not lock.locked("k")
    async with lock.hold("k", timeout=0):  # free again: nobody stranded it
        pass
    assert lock.stats() == IDLE


async def test_timeout_raises_and_the_waiter_is_gone_at_once(make_lock: MakeLock) -> None:
    lock = make_lock()
    entered, leave = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "k", entered, leave)
        await entered.wait()
        with pytest.raises(LockTimeout) as caught:
            async with lock.hold("k", timeout=0.01):
                pytest.fail("a timed-out waiter must not enter")
        assert caught.value.retry_after == 0.01
        assert lock.waiting("k") == 0
        assert lock.locked("k")
        leave.set()
    async with lock.hold("k", timeout=0.01):
        pass
    assert lock.stats() == IDLE


async def test_timeout_zero_is_busy_at_once(make_lock: MakeLock) -> None:
    lock = make_lock(timeout=0)
    async with lock.hold("k") as held:  # free: granted
        assert held.keys == ("k",)

        async def try_again() -> None:
            with pytest.raises(LockBusy):
                async with lock.hold("k"):
                    pytest.fail("busy key entered")

        async with anyio.create_task_group() as tg:
            tg.start_soon(try_again)
        assert lock.waiting("k") == 0
    assert lock.stats() == IDLE


async def test_max_waiting_rejects_at_once(make_lock: MakeLock) -> None:
    lock = make_lock(max_waiting=2)
    entered, leave = anyio.Event(), anyio.Event()
    served: list[int] = []

    async def worker(n: int) -> None:
        async with lock.hold("k"):
            served.append(n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "k", entered, leave)
        await entered.wait()
        tg.start_soon(worker, 1)
        tg.start_soon(worker, 2)
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        with pytest.raises(QueueFull):
            async with lock.hold("k"):
                pytest.fail("over max_waiting")
        with pytest.raises(QueueFull):
            async with lock.hold("k", max_waiting=0):
                pytest.fail("max_waiting=0 never queues")
        assert lock.waiting("k") == 2
        leave.set()
    assert sorted(served) == [1, 2]
    assert lock.stats() == IDLE


async def test_on_error_stop_aborts_the_queued_waiters_only(make_lock: MakeLock) -> None:
    lock = make_lock(on_error="stop")
    outcomes: dict[str, object] = {}
    entered, fail = anyio.Event(), anyio.Event()
    boom = ValueError("payment provider down")

    async def failing_holder() -> None:
        try:
            async with lock.hold("k"):
                entered.set()
                await fail.wait()
                raise boom
        except ValueError as exc:
            outcomes["holder"] = exc

    async def waiter(name: str) -> None:
        try:
            async with lock.hold("k"):
                outcomes[name] = "ran"
        except LockAborted as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(failing_holder)
        await entered.wait()
        tg.start_soon(waiter, "queued-1")
        tg.start_soon(waiter, "queued-2")
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        fail.set()
    assert outcomes["holder"] is boom
    for name in ("queued-1", "queued-2"):
        aborted = outcomes[name]
        assert isinstance(aborted, LockAborted)
        assert aborted.__cause__ is boom
    async with lock.hold("k"):  # a later arrival runs normally
        outcomes["later"] = "ran"
    assert outcomes["later"] == "ran"
    assert lock.stats() == IDLE


async def test_on_error_continue_lets_the_queue_go_on(make_lock: MakeLock) -> None:
    lock = make_lock()
    ran: list[str] = []
    entered, fail = anyio.Event(), anyio.Event()

    async def failing_holder() -> None:
        try:
            async with lock.hold("k"):
                entered.set()
                await fail.wait()
                raise ValueError("boom")
        except ValueError:
            ran.append("holder failed")

    async def waiter() -> None:
        async with lock.hold("k"):
            ran.append("waiter")

    async with anyio.create_task_group() as tg:
        tg.start_soon(failing_holder)
        await entered.wait()
        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        fail.set()
    assert ran == ["holder failed", "waiter"]


async def test_cancellation_is_not_an_error_for_on_error_stop(make_lock: MakeLock) -> None:
    lock = make_lock(on_error="stop")
    ran: list[str] = []
    entered = anyio.Event()
    scope = anyio.CancelScope()

    async def holder() -> None:
        with scope:
            async with lock.hold("k"):
                entered.set()
                await anyio.sleep_forever()

    async def waiter() -> None:
        async with lock.hold("k"):
            ran.append("waiter")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await entered.wait()
        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        scope.cancel()
    assert ran == ["waiter"]


async def test_several_keys_in_any_order_never_deadlock(make_lock: MakeLock) -> None:
    lock = make_lock()
    timeline = Timeline()

    async def transfer(n: int, a: str, b: str) -> None:
        async with lock.hold(a, b) as held:
            assert held.keys == tuple(sorted({a, b}))
            timeline.enter("a", n)
            timeline.enter("b", n)
            await anyio.lowlevel.checkpoint()
            timeline.leave("a", n)
            timeline.leave("b", n)

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(transfer, n, *(("a", "b") if n % 2 else ("b", "a")))
    assert len(timeline.entries("a")) == 20
    assert timeline.most == {"a": 1, "b": 1}
    assert lock.stats() == IDLE


async def test_several_keys_all_or_nothing(make_lock: MakeLock) -> None:
    lock = make_lock()
    entered, leave = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "b", entered, leave)
        await entered.wait()
        with pytest.raises(LockTimeout):
            async with lock.hold("b", "a", timeout=0.02):
                pytest.fail("entered without b")
        assert not lock.locked("a")  # "a" was taken first and given back
        with pytest.raises(LockBusy):
            async with lock.hold("a", "b", timeout=0):
                pytest.fail("entered without b")
        assert not lock.locked("a")
        leave.set()
    async with lock.hold("b", "a", "a") as held:
        assert held.keys == ("a", "b")
        assert set(held.tokens) == {"a", "b"}
        assert held.token == max(held.tokens.values())
    assert lock.stats() == IDLE


@pytest.mark.parametrize("max_concurrency", [1, 3])
async def test_reentry_raises_before_busy_or_full(
    make_lock: MakeLock, max_concurrency: int
) -> None:
    lock = make_lock(max_concurrency=max_concurrency, timeout=0, max_waiting=0)
    async with lock.hold("k"):
        with pytest.raises(LockReentryError) as caught:
            async with lock.hold("k"):
                pytest.fail("re-entered")
        assert isinstance(caught.value, RuntimeError)
        with pytest.raises(LockReentryError):
            async with lock.hold("other", "k"):
                pytest.fail("re-entered")
        assert not lock.locked("other")
        async with lock.hold("other"):  # other keys are fine
            pass
    assert lock.stats() == IDLE


async def test_fencing_tokens_strictly_increase_per_key(make_lock: MakeLock) -> None:
    lock = make_lock()
    tokens: list[int] = []

    async def worker() -> None:
        async with lock.hold("k") as held:
            tokens.append(held.token)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(worker)
    assert len(tokens) == 10
    assert tokens == sorted(set(tokens))
    assert tokens[0] >= 1


async def test_run_accepts_sync_and_async_callables(make_lock: MakeLock) -> None:
    lock = make_lock()

    async def double(x: int) -> int:
        return 2 * x

    class Awaiting:
        def __call__(self, x: int) -> Any:
            return double(x)  # a sync callable that returns an awaitable

    assert await lock.run("k", lambda x, y=0: x + y, 1, y=2) == 3
    assert await lock.run("k", double, 4) == 8
    assert await lock.run("k", functools.partial(double, 5)) == 10
    assert await lock.run("k", Awaiting(), 6) == 12

    def fails() -> None:
        raise KeyError("from inside")

    with pytest.raises(KeyError, match="from inside"):
        await lock.run("k", fails)
    assert lock.stats() == IDLE


async def test_waited_is_measured(make_lock: MakeLock) -> None:
    lock = make_lock()
    entered, leave = anyio.Event(), anyio.Event()
    waited: list[float] = []

    async def waiter() -> None:
        async with lock.hold("k") as held:
            waited.append(held.waited)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "k", entered, leave)
        await entered.wait()
        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        leave.set()
    assert waited[0] > 0


async def test_locked_waiting_and_stats_describe_the_state(make_lock: MakeLock) -> None:
    lock = make_lock(key_prefix="app:")
    entered, leave = anyio.Event(), anyio.Event()
    assert not lock.locked("k")
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "k", entered, leave)
        await entered.wait()

        async def waiter() -> None:
            async with lock.hold("k") as held:
                assert held.keys == ("k",)  # without the prefix

        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        assert lock.locked("k")
        assert lock.stats() == LockStats(active_keys=1, holders=1, waiting=1)
        leave.set()
    assert lock.stats() == IDLE


def test_errors_share_a_base() -> None:
    for error in (LockTimeout, LockBusy, QueueFull, LockAborted, LockReentryError):
        assert issubclass(error, KeyedLockError)
    assert issubclass(LockReentryError, RuntimeError)


def test_held_repr_and_misuse() -> None:
    lock = KeyedLock()
    held = lock.hold("k")
    assert isinstance(held, Held)
    assert "not held" in repr(held)

    async def exit_without_enter() -> None:
        with pytest.raises(RuntimeError, match="not held"):
            await held.__aexit__(None, None, None)

    anyio.run(exit_without_enter)


async def test_keys_lists_what_is_held_or_waited_on(make_lock: MakeLock) -> None:
    lock = make_lock(key_prefix="app:")
    inside, leave = anyio.Event(), anyio.Event()
    assert lock.keys() == []
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_until, lock, "a", inside, leave)
        await inside.wait()

        async def waiter() -> None:
            async with lock.hold("a"):
                pass

        tg.start_soon(waiter)
        await wait_until(lambda: lock.waiting("a") == 1, "a waiter queued")
        async with lock.hold("b", shared=True):
            assert sorted(lock.keys()) == ["a", "b"]  # without the prefix
        leave.set()
    assert lock.keys() == []


def test_name_is_shown_in_repr() -> None:
    assert KeyedLock().name == "default"
    lock = KeyedLock(name="checkout")
    assert lock.name == "checkout"
    assert "'checkout'" in repr(lock)
    with pytest.raises(TypeError):
        KeyedLock(name="")
