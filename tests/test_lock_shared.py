"""Shared (reader) holds, proved by recorded timelines on every engine and both event loops.

Rules under test (API.md, "Shared holds"): readers of a key run together; an exclusive hold
never overlaps any other hold of the key; waiters are granted in arrival order across modes, a
run of shared waiters at the head together; a reader arriving while a writer waits queues
behind it; every other rule (re-entry, timeout, cancellation, no idle state) holds for both.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import KeyedLock, LockReentryError, LockStats, LockTimeout
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

MakeLock = Callable[..., KeyedLock]
IDLE = LockStats(active_keys=0, holders=0, waiting=0)


class Crowd:
    """Tasks that each take the key in a given mode and stay inside until told to leave."""

    def __init__(self, lock: KeyedLock, key: str = "doc") -> None:
        self.lock = lock
        self.key = key
        self.timeline = Timeline()
        self.leave: dict[str, anyio.Event] = {}
        self.inside: set[str] = set()
        self.writers: set[str] = set()

    async def member(self, name: str, shared: bool, **options: object) -> None:
        self.leave[name] = leave = anyio.Event()
        if not shared:
            self.writers.add(name)
        async with self.lock.hold(self.key, shared=shared, **options) as held:  # type: ignore[arg-type]
            assert held.shared is shared
            self.timeline.enter(self.key, name)
            self.inside.add(name)
            await leave.wait()
            self.inside.discard(name)
            self.timeline.leave(self.key, name)

    async def arrive(self, tg: anyio.abc.TaskGroup, name: str, shared: bool) -> None:
        """Start a member and return once it is inside or queued (arrival order is fixed)."""
        waiting = self.lock.waiting(self.key)
        tg.start_soon(self.member, name, shared)
        await wait_until(
            lambda: name in self.inside or self.lock.waiting(self.key) == waiting + 1,
            "name in self.inside or self.lock.waiting(self.key) == waiting + 1",
        )

    def assert_writers_alone(self) -> None:
        """No exclusive holder was ever inside together with anyone else."""
        for writer in self.writers:
            for other in self.timeline.entries(self.key):
                if other != writer:
                    assert not self.timeline.overlapped(writer, other), (writer, other)


async def test_readers_overlap_and_writers_are_alone(make_lock: MakeLock) -> None:
    lock = make_lock()
    crowd = Crowd(lock)
    async with anyio.create_task_group() as tg:
        for name in ("r1", "r2", "r3"):
            await crowd.arrive(tg, name, shared=True)
        await wait_until(
            lambda: crowd.inside == {"r1", "r2", "r3"}, "r1, r2, r3 inside"
        )  # all three at once
        assert lock.locked("doc")
        assert lock.stats() == LockStats(active_keys=1, holders=3, waiting=0)
        await crowd.arrive(tg, "w", shared=False)
        assert lock.waiting("doc") == 1  # the writer waits for every reader
        for name in ("r1", "r2", "r3"):
            crowd.leave[name].set()
        await wait_until(lambda: crowd.inside == {"w"}, 'crowd.inside == {"w"}')
        crowd.leave["w"].set()
    crowd.assert_writers_alone()
    assert crowd.timeline.entries()[-1] == "w"
    assert lock.stats() == IDLE


async def test_a_reader_behind_a_waiting_writer_waits_its_turn(make_lock: MakeLock) -> None:
    lock = make_lock()
    crowd = Crowd(lock)
    async with anyio.create_task_group() as tg:
        await crowd.arrive(tg, "r1", shared=True)
        await wait_until(lambda: "r1" in crowd.inside, '"r1" in crowd.inside')
        await crowd.arrive(tg, "w", shared=False)  # queues behind the reader
        await crowd.arrive(tg, "r2", shared=True)  # would fit beside r1, but w came first
        assert crowd.inside == {"r1"}
        assert lock.waiting("doc") == 2
        crowd.leave["r1"].set()
        await wait_until(lambda: crowd.inside == {"w"}, 'crowd.inside == {"w"}')
        crowd.leave["w"].set()
        await wait_until(lambda: crowd.inside == {"r2"}, 'crowd.inside == {"r2"}')
        crowd.leave["r2"].set()
    assert crowd.timeline.entries() == ["r1", "w", "r2"]  # arrival order across modes
    crowd.assert_writers_alone()
    assert lock.stats() == IDLE


async def test_a_run_of_readers_at_the_head_is_granted_together(make_lock: MakeLock) -> None:
    lock = make_lock()
    crowd = Crowd(lock)
    async with anyio.create_task_group() as tg:
        await crowd.arrive(tg, "w1", shared=False)
        await wait_until(lambda: "w1" in crowd.inside, '"w1" in crowd.inside')
        for name, shared in [("r1", True), ("r2", True), ("r3", True), ("w2", False)]:
            await crowd.arrive(tg, name, shared)
        await crowd.arrive(tg, "r4", shared=True)
        crowd.leave["w1"].set()
        await wait_until(
            lambda: crowd.inside == {"r1", "r2", "r3"}, "r1, r2, r3 inside"
        )  # the run, together
        assert lock.waiting("doc") == 2  # w2, then r4 behind it
        for name in ("r1", "r2", "r3"):
            crowd.leave[name].set()
        await wait_until(lambda: crowd.inside == {"w2"}, 'crowd.inside == {"w2"}')
        crowd.leave["w2"].set()
        await wait_until(lambda: crowd.inside == {"r4"}, 'crowd.inside == {"r4"}')
        crowd.leave["r4"].set()
    entries = crowd.timeline.entries()  # a run wakes together (trio picks the order in it)
    assert entries[0] == "w1"
    assert set(entries[1:4]) == {"r1", "r2", "r3"}
    assert entries[4:] == ["w2", "r4"]
    crowd.assert_writers_alone()
    assert lock.stats() == IDLE


async def test_a_reader_cancelled_in_the_middle_of_a_run(make_lock: MakeLock) -> None:
    lock = make_lock()
    crowd = Crowd(lock)
    async with anyio.create_task_group() as tg:
        await crowd.arrive(tg, "w", shared=False)
        await wait_until(lambda: "w" in crowd.inside, '"w" in crowd.inside')
        await crowd.arrive(tg, "r1", shared=True)
        scope = anyio.CancelScope()
        waiting = lock.waiting("doc")
        cancelled = anyio.Event()

        async def doomed() -> None:
            with scope:
                await crowd.member("r2", shared=True)
            cancelled.set()

        tg.start_soon(doomed)
        await wait_until(lambda: lock.waiting("doc") == waiting + 1, "doomed queued")
        await crowd.arrive(tg, "r3", shared=True)
        scope.cancel()
        await cancelled.wait()
        assert lock.waiting("doc") == 2  # r2 left the queue at once
        crowd.leave["w"].set()
        await wait_until(lambda: crowd.inside == {"r1", "r3"}, 'crowd.inside == {"r1", "r3"}')
        crowd.leave["r1"].set()
        crowd.leave["r3"].set()
    entries = crowd.timeline.entries()
    assert entries[0] == "w"
    assert sorted(entries[1:]) == ["r1", "r3"]  # r2 never entered
    assert lock.stats() == IDLE


async def test_a_writer_timing_out_lets_the_readers_behind_it_in(make_lock: MakeLock) -> None:
    lock = make_lock()
    crowd = Crowd(lock)
    timed_out = anyio.Event()

    async def impatient_writer() -> None:
        with pytest.raises(LockTimeout):
            await crowd.member("w", shared=False, timeout=0.2)
        timed_out.set()

    async with anyio.create_task_group() as tg:
        await crowd.arrive(tg, "r1", shared=True)
        await wait_until(lambda: "r1" in crowd.inside, '"r1" in crowd.inside')
        tg.start_soon(impatient_writer)
        await wait_until(lambda: lock.waiting("doc") == 1, 'lock.waiting("doc") == 1')
        await crowd.arrive(tg, "r2", shared=True)  # behind the writer
        assert crowd.inside == {"r1"}
        await timed_out.wait()
        # The writer left the queue: r2 now fits beside r1, which is still inside.
        await wait_until(lambda: crowd.inside == {"r1", "r2"}, 'crowd.inside == {"r1", "r2"}')
        crowd.leave["r1"].set()
        crowd.leave["r2"].set()
    assert crowd.timeline.entries() == ["r1", "r2"]
    assert lock.stats() == IDLE


async def test_re_entry_in_any_mode_raises(make_lock: MakeLock) -> None:
    lock = make_lock()
    for first, second in [(True, True), (True, False), (False, True)]:
        async with lock.hold("k", shared=first):
            with pytest.raises(LockReentryError):
                async with lock.hold("k", shared=second):
                    pass
    assert lock.stats() == IDLE


async def test_several_keys_all_shared(make_lock: MakeLock) -> None:
    lock = make_lock()
    inside = anyio.Event()
    async with lock.hold("a", "b", shared=True) as first:
        assert first.shared
        assert first.keys == ("a", "b")

        async def second_reader() -> None:
            async with lock.hold("b", "a", shared=True):
                inside.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(second_reader)
            await inside.wait()  # granted while the first reader still holds both keys
    assert lock.stats() == IDLE


async def test_exclusive_holders_up_to_max_concurrency_never_with_readers(
    make_lock: MakeLock,
) -> None:
    lock = make_lock(max_concurrency=2)
    crowd = Crowd(lock)
    async with anyio.create_task_group() as tg:
        await crowd.arrive(tg, "w1", shared=False)
        await crowd.arrive(tg, "w2", shared=False)
        await wait_until(
            lambda: crowd.inside == {"w1", "w2"}, "w1, w2 inside"
        )  # two writers together
        await crowd.arrive(tg, "r1", shared=True)
        await crowd.arrive(tg, "w3", shared=False)  # behind the reader: no barging
        assert lock.waiting("doc") == 2
        crowd.leave["w1"].set()
        await wait_until(lambda: crowd.inside == {"w2"}, 'crowd.inside == {"w2"}')
        assert lock.waiting("doc") == 2  # r1 needs every writer gone; w3 stays behind it
        crowd.leave["w2"].set()
        await wait_until(lambda: crowd.inside == {"r1"}, 'crowd.inside == {"r1"}')
        crowd.leave["r1"].set()
        await wait_until(lambda: crowd.inside == {"w3"}, 'crowd.inside == {"w3"}')
        crowd.leave["w3"].set()
    assert crowd.timeline.entries() == ["w1", "w2", "r1", "w3"]
    for writer in ("w1", "w2", "w3"):
        assert not crowd.timeline.overlapped(writer, "r1")
    assert lock.stats() == IDLE


async def test_bad_shared_value_is_refused() -> None:
    lock = KeyedLock()
    with pytest.raises(TypeError):
        lock.hold("k", shared="yes")  # type: ignore[arg-type]


async def test_tokens_increase_across_modes(make_lock: MakeLock) -> None:
    lock = make_lock()
    tokens = []
    for shared in (True, False, True, False):
        async with lock.hold("k", shared=shared) as held:
            tokens.append(held.token)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)
    await anyio.lowlevel.checkpoint()
