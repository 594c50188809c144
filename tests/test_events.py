"""The lock's event stream: what observers are told, on every engine and both event loops."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from keyedlock_asgi import (
    KeyedLock,
    LockAborted,
    LockBusy,
    LockEvent,
    LockTimeout,
    QueueFull,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

MakeLock = Callable[..., KeyedLock]


def seen(events: list[LockEvent]) -> list[tuple[str, str | None, bool]]:
    return [(e.kind, e.outcome, e.queued) for e in events]


async def test_a_free_key_is_granted_and_released(make_lock: MakeLock) -> None:
    events: list[LockEvent] = []
    lock = make_lock(observers=[events.append])
    async with lock.hold("k") as held:
        pass
    async with lock.hold("k", shared=True):
        pass
    with pytest.raises(ValueError, match="boom"):
        async with lock.hold("k"):
            raise ValueError("boom")
    assert seen(events) == [
        ("granted", "acquired", False),
        ("released", "normal", False),
        ("granted", "acquired", False),
        ("released", "normal", False),
        ("granted", "acquired", False),
        ("released", "error", False),
    ]
    assert events[0].held is held
    assert [e.held.shared for e in events[2:4]] == [True, True]
    assert isinstance(events[-1].error, ValueError)
    assert all(e.held_for >= 0 for e in events)


async def test_a_queued_caller_is_reported_queued_then_granted(make_lock: MakeLock) -> None:
    events: list[LockEvent] = []
    lock = make_lock()
    lock.add_observer(events.append)
    inside, leave = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with lock.hold("k"):
            inside.set()
            await leave.wait()

    async def second() -> None:
        async with lock.hold("k"):
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await inside.wait()
        tg.start_soon(second)
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        leave.set()
    kinds = seen(events)
    assert kinds[0] == ("granted", "acquired", False)
    assert ("queued", None, False) in kinds
    granted_late = [e for e in events if e.kind == "granted" and e.queued]
    assert len(granted_late) == 1
    assert granted_late[0].waited > 0
    assert kinds.count(("released", "normal", True)) == 1


async def test_rejections_carry_their_cause(make_lock: MakeLock) -> None:
    events: list[LockEvent] = []
    lock = make_lock(observers=[events.append])
    inside, leave = anyio.Event(), anyio.Event()
    results: dict[str, BaseException] = {}

    async def fail_holding() -> None:
        async with lock.hold("k", on_error="stop"):
            inside.set()
            await leave.wait()
            raise RuntimeError("holder failed")

    async def holder() -> None:
        with pytest.raises(RuntimeError):
            await fail_holding()

    async def attempt(name: str, **options: object) -> None:
        try:
            async with lock.hold("k", **options):  # type: ignore[arg-type]
                pass
        except Exception as exc:
            results[name] = exc

    scope = anyio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await attempt("canceled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await inside.wait()
        await attempt("busy", timeout=0)
        await attempt("timeout", timeout=0.05)
        tg.start_soon(attempt, "aborted")
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        tg.start_soon(cancelled)
        await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
        scope.cancel()
        await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
        await attempt("full", max_waiting=1)
        leave.set()
    assert isinstance(results["busy"], LockBusy)
    assert isinstance(results["timeout"], LockTimeout)
    assert isinstance(results["full"], QueueFull)
    assert isinstance(results["aborted"], LockAborted)
    rejected = [(e.outcome, e.queued) for e in events if e.kind == "rejected"]
    assert ("busy", False) in rejected
    assert ("timeout", True) in rejected
    assert ("canceled", True) in rejected
    assert ("queue_full", False) in rejected
    assert ("aborted", True) in rejected  # the waiter behind the failing holder
    aborted = [e for e in events if e.outcome == "aborted"]
    assert isinstance(aborted[0].error, LockAborted)


async def test_an_observer_that_raises_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: LockEvent) -> None:
        raise RuntimeError("observer bug")

    events: list[LockEvent] = []
    lock = KeyedLock(observers=[broken, events.append])
    async with lock.hold("k"):
        pass
    assert [e.kind for e in events] == ["granted", "released"]
    assert "observer raised" in caplog.text
    lock.remove_observer(broken)
    lock.remove_observer(events.append)
    async with lock.hold("k"):
        pass
    assert len(events) == 2
    with pytest.raises(TypeError):
        lock.add_observer("not callable")  # type: ignore[arg-type]
