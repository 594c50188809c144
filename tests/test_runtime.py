"""`_runtime`: every probe of the running event loop has a fallback, and the lock keeps its
promises on the fallback too (each test here forces one)."""

from __future__ import annotations

import asyncio
import inspect
import weakref

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import KeyedLock, LockStats, _runtime
from tests.support.waiting import wait_until


def test_the_probe_falls_back_when_anyio_keeps_no_task_records() -> None:
    assert _runtime._probe_for(None) is _runtime.public_may_be_cancelled


def test_the_probe_answers_maybe_when_anyio_records_look_different() -> None:
    class Task:
        pass

    task = Task()
    odd = object()  # a task state without `cancel_scope`
    probe = _runtime._probe_for({weakref.ref(task): odd})
    assert probe(task) is True
    assert probe(Task()) is False  # no record at all: no anyio scope around it


@pytest.mark.parametrize("probe", ["fast", "fallback"])
@pytest.mark.parametrize("release_first", [False, True])
def test_a_cancel_at_hand_off_passes_the_key_on_with_either_probe(
    monkeypatch: pytest.MonkeyPatch, probe: str, release_first: bool
) -> None:
    """The race the probe exists for: an anyio scope cancelled in the step that hands the
    waiter the key. The waiter must not run its block; the next waiter gets the key."""
    if probe == "fallback":
        monkeypatch.setattr(_runtime, "may_be_cancelled", _runtime.public_may_be_cancelled)
    lock = KeyedLock()
    entered: list[str] = []

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with lock.hold("k"):
                entered.append(name)
                await anyio.lowlevel.checkpoint()

    async def main() -> None:
        holder = lock.hold("k")
        await holder.__aenter__()
        doomed = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, "W1", doomed)
            await wait_until(lambda: lock.waiting("k") == 1, 'lock.waiting("k") == 1')
            tg.start_soon(waiter, "W2", anyio.CancelScope())
            await wait_until(lambda: lock.waiting("k") == 2, 'lock.waiting("k") == 2')
            if release_first:  # no checkpoint between the two: W1 cannot run in between
                await holder.__aexit__(None, None, None)
                doomed.cancel()
            else:
                doomed.cancel()
                await holder.__aexit__(None, None, None)
        assert entered == ["W2"]
        assert lock.stats() == LockStats(0, 0, 0)

    asyncio.run(main())


def test_mark_coroutine_function_on_each_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def plain(scope: object) -> object:
        return asyncio.sleep(0)

    marked = _runtime.mark_coroutine_function(plain)
    assert inspect.iscoroutinefunction(marked) or asyncio.iscoroutinefunction(marked)

    def other(scope: object) -> object:
        return asyncio.sleep(0)

    monkeypatch.delattr(inspect, "markcoroutinefunction", raising=False)
    if not hasattr(asyncio.coroutines, "_is_coroutine"):
        pytest.skip("this Python has neither marker; the primary path above covers it")
    fallback = _runtime.mark_coroutine_function(other)
    assert fallback._is_coroutine is asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_trio_and_asyncio_runs_are_told_apart(anyio_backend: str) -> None:
    found = _runtime.current_trio_run()
    assert (found is not None) == (anyio_backend == "trio")
