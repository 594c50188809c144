"""`max_hold` and `drain()`: nothing holds a key forever, and a shutdown can wait for the holds
in flight. Recorded order on every engine and both event loops; no wall-clock assertions."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import HoldExpired, KeyedLock, LockClosed, LockEvent, LockStats
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

MakeLock = Callable[..., KeyedLock]
IDLE = LockStats(active_keys=0, holders=0, waiting=0)


async def test_a_hanging_holder_is_revoked_and_the_key_passes_on(make_lock: MakeLock) -> None:
    events: list[LockEvent] = []
    lock = make_lock(max_hold=0.2, observers=[events.append])
    timeline = Timeline()
    unwound = anyio.Event()
    outcome: list[BaseException] = []

    async def hanging() -> None:
        try:
            async with lock.hold("k"):
                timeline.enter("k", "hanging")
                try:
                    await anyio.sleep_forever()  # an app that never returns
                finally:
                    timeline.leave("k", "hanging")  # the block unwinds before the key moves
                    unwound.set()
        except HoldExpired as exc:
            outcome.append(exc)

    async def next_one() -> None:
        async with lock.hold("k", max_hold=None):
            assert unwound.is_set()  # never before the revoked block has unwound
            timeline.enter("k", "next")
            timeline.leave("k", "next")

    async with anyio.create_task_group() as tg:
        tg.start_soon(hanging)
        await wait_until(lambda: lock.locked("k"), "lock.locked('k')")
        tg.start_soon(next_one)
    assert timeline.entries("k") == ["hanging", "next"]
    assert timeline.most["k"] == 1
    assert len(outcome) == 1
    assert isinstance(outcome[0], HoldExpired)
    released = [e.outcome for e in events if e.kind == "released"]
    assert released == ["expired", "normal"]
    assert lock.stats() == IDLE


async def test_a_hold_that_ends_in_time_is_untouched(make_lock: MakeLock) -> None:
    lock = make_lock()
    async with lock.hold("k", max_hold=30) as held:
        assert held.options.max_hold == 30
        await anyio.lowlevel.checkpoint()
    with pytest.raises(ValueError, match="boom"):  # the block's own error, not HoldExpired
        async with lock.hold("k", max_hold=30):
            raise ValueError("boom")
    assert lock.stats() == IDLE


async def test_an_outer_cancellation_is_not_an_expiry(make_lock: MakeLock) -> None:
    lock = make_lock(max_hold=30)
    with anyio.CancelScope() as outer:
        async with lock.hold("k"):
            outer.cancel()
            await anyio.lowlevel.checkpoint()
    assert outer.cancelled_caught
    assert lock.stats() == IDLE


def test_bad_max_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="max_hold"):
        KeyedLock(max_hold=0)
    with pytest.raises(TypeError):
        KeyedLock().hold("k", max_hold="1")  # type: ignore[arg-type]


async def test_drain_refuses_new_holds_and_waits_for_the_queued(make_lock: MakeLock) -> None:
    lock = make_lock()
    inside, leave = anyio.Event(), anyio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with lock.hold("k"):
            inside.set()
            await leave.wait()
            order.append("holder out")

    async def queued() -> None:
        async with lock.hold("k"):
            order.append("queued ran")

    drained = anyio.Event()

    async def drain() -> None:
        await lock.drain()
        order.append("drained")
        drained.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await inside.wait()
        tg.start_soon(queued)
        await wait_until(lambda: lock.waiting("k") == 1, "lock.waiting('k') == 1")
        tg.start_soon(drain)
        await wait_until(lambda: lock.closed, "lock.closed")
        with pytest.raises(LockClosed):
            async with lock.hold("other"):
                pass
        assert not drained.is_set()
        leave.set()
        await drained.wait()
    assert order == ["holder out", "queued ran", "drained"]  # the queued one kept its place
    assert lock.stats() == IDLE


async def test_drain_times_out_and_stays_closed(make_lock: MakeLock) -> None:
    lock = make_lock()
    async with lock.hold("k"):
        with pytest.raises(TimeoutError):
            await lock.drain(timeout=0.05)
    assert lock.closed
    await lock.drain()  # idle now: returns at once


async def test_bounded_holds_left_out_of_order_still_give_their_keys_back(
    make_lock: MakeLock,
) -> None:
    """Two `max_hold` holds in one task, left first-in-first-out: anyio refuses to close the
    first one's revoking scope (it is not the innermost), and that error reaches the caller,
    but only after the key was given back: a later caller gets both keys. The scope anyio
    left open never fires: the task is not cancelled once `max_hold` has passed."""
    lock = make_lock(max_hold=0.2)
    first, second = lock.hold("a"), lock.hold("b")
    await first.__aenter__()
    await second.__aenter__()
    with pytest.raises(RuntimeError, match="cancel scope"):
        await first.__aexit__(None, None, None)
    assert not lock.locked("a")
    await second.__aexit__(None, None, None)

    async def later() -> None:
        with anyio.fail_after(10):  # a stranded key fails here instead of hanging
            async with lock.hold("a", "b"):
                pass

    async with anyio.create_task_group() as tg:  # another task: not re-entry
        tg.start_soon(later)
    assert lock.stats() == IDLE
    await anyio.sleep(0.4)  # past the refused scope's deadline: a cancellation would land here


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio: leaving breaks the run itself
async def test_a_bounded_hold_left_from_another_task_still_gives_its_key_back(
    make_lock: MakeLock,
) -> None:
    """`max_hold`'s scope belongs to the task that entered: leaving the hold from another
    task raises anyio's error, after the key was given back."""
    lock = make_lock(max_hold=60)
    held = lock.hold("k")
    await held.__aenter__()
    raised: list[BaseException] = []

    async def leave() -> None:
        try:
            await held.__aexit__(None, None, None)
        except RuntimeError as exc:
            raised.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(leave)
    assert len(raised) == 1
    assert not lock.locked("k")
    with anyio.fail_after(10):
        async with lock.hold("k"):
            pass
    assert lock.stats() == IDLE
