"""Shared holds on Redis, against the backend directly, on one server and on a 3-master cluster.

Each `RedisBackend` is its own "process" (own process id, connections, wake-up channel). Who
holds the key is read from Redis right after the step that changes it (the scripts grant a
whole run atomically, inside the RELEASE that frees the key), and every test also records a
timeline of who was inside when: readers overlap, writers never overlap anyone, arrival order
is kept across modes.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import KeyedLock, LockTimeout
from keyedlock_asgi.backends import _redis_scripts
from keyedlock_asgi.backends.redis import RedisBackend, RedisLease
from tests.support.engine_redis import RedisTarget, redis_cluster, redis_target
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio
__all__ = ["redis_cluster"]  # the session fixture, imported so that its teardown stops it

KEY = "doc"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> RedisTarget:
    if request.param == "redis-cluster":
        request.getfixturevalue("redis_cluster")
    return redis_target(str(request.param))


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(target: RedisTarget) -> AsyncIterator[Any]:
    client = target.raw()
    yield client
    await client.aclose()


@pytest.fixture
async def make_backend(
    target: RedisTarget, namespace: str
) -> AsyncIterator[Callable[..., RedisBackend]]:
    made: list[RedisBackend] = []

    def factory(**options: Any) -> RedisBackend:
        options.setdefault("namespace", namespace)
        backend = target.backend(**options)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()


async def leftovers(target: RedisTarget, namespace: str) -> list[str]:
    """The namespace's keys other than the counters hash: none once the key is idle."""
    return [k for k in await target.scan(f"{{{namespace}:*") if not k.endswith(":m")]


class Room:
    """Participants, each in its own process (backend), entering and leaving on command."""

    def __init__(self, make_backend: Callable[..., RedisBackend], raw: Any) -> None:
        self.make_backend = make_backend
        self.raw = raw
        self.timeline = Timeline()
        self.tokens: dict[str, int] = {}
        self.procs: dict[str, str] = {}  # process id -> participant
        self.conns: dict[str, Any] = {}  # participant -> its backend's connection
        self.scripts: dict[str, list[str]] = {}  # participant -> the scripts it ran, in order
        self.entered: dict[str, anyio.Event] = {}
        self.leave: dict[str, anyio.Event] = {}
        self.done: dict[str, anyio.Event] = {}
        self.errors: dict[str, BaseException] = {}
        self.keys: list[str] = []

    async def join(
        self, tg: anyio.abc.TaskGroup, who: str, *, timeout: float | None = None, **options: Any
    ) -> anyio.CancelScope:
        """Start `who` (shared when its name starts with R) and wait until Redis has it as a
        holder or a waiter: arrival order is the order of the calls."""
        backend = self.make_backend(**options)
        conn = await backend._connection()
        self.procs[conn.proc_id] = who
        self.conns[who] = conn
        self.scripts[who] = log = []
        run = backend._run

        async def logged(script: Any, keys: list[str], args: list[Any], conn: Any) -> Any:
            log.append(_script_name(script))
            return await run(script, keys, args, conn)

        backend._run = logged  # type: ignore[method-assign]
        self.keys = backend.redis_keys(KEY)
        for events in (self.entered, self.leave, self.done):
            events[who] = anyio.Event()
        scope = anyio.CancelScope()
        tg.start_soon(self._run, backend, who, timeout, scope)
        # (or already gone: a short timeout may end before this poll sees it queued)
        await wait_until(lambda: self._known(conn.proc_id, who), "self._known(conn.proc_id, who)")
        return scope

    async def _run(
        self, backend: RedisBackend, who: str, timeout: float | None, scope: anyio.CancelScope
    ) -> None:
        try:
            with scope:
                lease = await backend.acquire(
                    KEY, timeout=timeout, max_concurrency=1, shared=who.startswith("R")
                )
                self.timeline.enter(KEY, who)
                self.tokens[who] = lease.token
                self.entered[who].set()
                await self.leave[who].wait()
                self.timeline.leave(KEY, who)
                await lease.release()
        except LockTimeout as exc:
            self.errors[who] = exc
        finally:
            self.done[who].set()

    async def _known(self, proc: str, who: str) -> bool:
        if self.done[who].is_set():
            return True
        members = await self.raw.zrange(self.keys[0], 0, -1) + await self.raw.zrange(
            self.keys[1], 0, -1
        )
        return any(m.decode().startswith(proc + "|") for m in members)

    async def holders(self) -> set[str]:
        return {self._name(m) for m in await self.raw.zrange(self.keys[0], 0, -1)}

    async def queue(self) -> list[str]:
        return [self._name(m) for m in await self.raw.zrange(self.keys[1], 0, -1)]

    def _name(self, member: bytes) -> str:
        return self.procs.get(member.decode().split("|")[0], "?")

    async def let_out(self, *who: str) -> None:
        for name in who:
            self.leave[name].set()
        for name in who:
            await self.done[name].wait()

    async def inside(self, *who: str) -> None:
        with anyio.fail_after(10):
            for name in who:
                await self.entered[name].wait()


def _script_name(script: Any) -> str:
    for name in ("ACQUIRE", "RELEASE", "EXTEND"):
        if script.script == getattr(_redis_scripts, name):
            return name.lower()
    raise AssertionError("unknown script")


def check_exclusion(timeline: Timeline) -> None:
    """Writers (W*) never inside with anyone; readers (R*) only with readers."""
    inside: set[str] = set()
    for kind, _, who in timeline.events:
        name = str(who)
        if kind == "in":
            assert not (name.startswith("W") and inside), f"{name} entered beside {inside}"
            assert not any(o.startswith("W") for o in inside), f"{name} entered beside {inside}"
            inside.add(name)
        else:
            inside.discard(name)


async def test_runs_of_readers_share_and_arrival_order_holds_across_modes(
    make_backend: Callable[..., RedisBackend], raw: Any, target: RedisTarget, namespace: str
) -> None:
    """W0 holds; R1 R2 W3 R4 R5 W6 queue in that order. Grants: {R1 R2} together, W3 alone,
    {R4 R5}, W6, and R7, which arrived while W3 waited behind readers that held, queues behind
    the writers instead of joining the readers."""
    room = Room(make_backend, raw)
    async with anyio.create_task_group() as tg:
        await room.join(tg, "W0")
        await room.inside("W0")
        # R1 and R2 never ask again by themselves (heartbeat 30 s): only a hand-off wakes them.
        await room.join(tg, "R1", heartbeat=30.0)
        await room.join(tg, "R2", heartbeat=30.0)
        for who in ("W3", "R4", "R5", "W6"):
            await room.join(tg, who)
        assert await room.queue() == ["R1", "R2", "W3", "R4", "R5", "W6"]

        await room.let_out("W0")
        assert await room.holders() == {"R1", "R2"}  # the run, handed on in one step
        await room.inside("R1", "R2")  # both inside at once: neither has left
        await room.join(tg, "R7")  # arrives while readers hold and W3 waits
        assert await room.holders() == {"R1", "R2"}
        assert await room.queue() == ["W3", "R4", "R5", "W6", "R7"]

        await room.let_out("R1")
        assert await room.holders() == {"R2"}  # W3 waits for every reader
        await room.let_out("R2")
        assert await room.holders() == {"W3"}
        await room.inside("W3")
        await room.let_out("W3")
        assert await room.holders() == {"R4", "R5"}
        await room.inside("R4", "R5")
        await room.let_out("R4", "R5")
        assert await room.holders() == {"W6"}
        await room.let_out("W6")
        assert await room.holders() == {"R7"}
        await room.let_out("R7")

    check_exclusion(room.timeline)
    # Each reader of the run was handed the key directly: one ACQUIRE (queued), one RELEASE.
    assert room.scripts["R1"] == room.scripts["R2"] == ["acquire", "release"]
    assert room.timeline.overlapped("R1", "R2")
    assert room.timeline.overlapped("R4", "R5")
    stages = [["W0"], ["R1", "R2"], ["W3"], ["R4", "R5"], ["W6"], ["R7"]]
    for before, after in itertools.pairwise(stages):
        assert max(room.tokens[w] for w in before) < min(room.tokens[w] for w in after)
    assert len(set(room.tokens.values())) == len(room.tokens)  # a fence for every grant
    assert await leftovers(target, namespace) == []


async def test_a_shared_waiter_cancelled_or_timing_out_inside_a_run(
    make_backend: Callable[..., RedisBackend], raw: Any, target: RedisTarget, namespace: str
) -> None:
    """R2 is cancelled and R3 times out while queued between R1 and R4: the run that follows
    W0 is {R1 R4}, W5 still waits for both, and nothing of R2 or R3 stays in Redis."""
    room = Room(make_backend, raw)
    async with anyio.create_task_group() as tg:
        await room.join(tg, "W0")
        await room.inside("W0")
        await room.join(tg, "R1")
        r2 = await room.join(tg, "R2")
        await room.join(tg, "R3", timeout=0.3)
        await room.join(tg, "R4")
        await room.join(tg, "W5")
        r2.cancel()
        with anyio.fail_after(10):
            await room.done["R2"].wait()
            await room.done["R3"].wait()  # its timeout: W0 still holds
        assert isinstance(room.errors["R3"], LockTimeout)
        assert await room.queue() == ["R1", "R4", "W5"]

        await room.let_out("W0")
        assert await room.holders() == {"R1", "R4"}
        await room.inside("R1", "R4")
        await room.let_out("R1")
        assert await room.holders() == {"R4"}
        await room.let_out("R4")
        await room.inside("W5")
        await room.let_out("W5")

    check_exclusion(room.timeline)
    assert room.timeline.entries(KEY)[:3] in (["W0", "R1", "R4"], ["W0", "R4", "R1"])
    assert "R2" not in room.tokens
    assert "R3" not in room.tokens
    assert await leftovers(target, namespace) == []


async def test_a_shared_waiter_cancelled_as_its_run_is_handed_on(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    target: RedisTarget,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R2 is cancelled just as the run {R1 R2 R3} is handed to it: it passes its grant back,
    R1 and R3 keep theirs, and W4 gets the key once they leave."""
    room = Room(make_backend, raw)
    async with anyio.create_task_group() as tg:
        await room.join(tg, "W0")
        await room.inside("W0")
        await room.join(tg, "R1")
        r2 = await room.join(tg, "R2")
        await room.join(tg, "R3")
        await room.join(tg, "W4")
        conn_r2 = room.conns["R2"]
        wake = conn_r2.wake
        handed: list[str] = []

        def cancel_then_wake(message: str) -> None:
            handed.append(message)
            r2.cancel()
            wake(message)

        monkeypatch.setattr(conn_r2, "wake", cancel_then_wake)
        if conn_r2.shards is not None:  # the cluster's listeners deliver through this
            monkeypatch.setattr(conn_r2.shards, "_deliver", cancel_then_wake)
        await room.let_out("W0")
        await room.inside("R1", "R3")
        with anyio.fail_after(10):
            await room.done["R2"].wait()
        assert await room.holders() == {"R1", "R3"}  # R2's grant went back
        assert await room.queue() == ["W4"]
        await room.let_out("R1", "R3")
        await room.inside("W4")
        await room.let_out("W4")

    check_exclusion(room.timeline)
    assert handed
    assert handed[0].split()[0].startswith(conn_r2.proc_id)
    assert "R2" not in room.tokens
    assert room.tokens["W0"] < min(room.tokens["R1"], room.tokens["R3"])
    assert max(room.tokens["R1"], room.tokens["R3"]) < room.tokens["W4"]
    assert await leftovers(target, namespace) == []


async def test_a_dead_shared_holders_lease_ends_and_the_writer_goes_next(
    make_backend: Callable[..., RedisBackend], raw: Any, target: RedisTarget, namespace: str
) -> None:
    """A reader's process dies while it holds (no renewal, no release): another reader still
    joins it, a writer waits until the dead lease ends on the server's clock, with a larger
    fence, and a reader arriving after the writer goes after it."""
    dead_backend = make_backend(lease=0.5)
    dead = await dead_backend.acquire(KEY, timeout=None, max_concurrency=1, shared=True)
    _die(dead)
    keys = dead_backend.redis_keys(KEY)
    dead_lease_ends = float(await raw.zscore(keys[0], dead._token_str))
    room = Room(make_backend, raw)
    async with anyio.create_task_group() as tg:
        await room.join(tg, "R1")
        await room.inside("R1")  # readers share even with the dead one
        await room.join(tg, "W2")
        await room.join(tg, "R3")
        await room.let_out("R1")
        await room.inside("W2")
        seconds, micros = await raw.time()
        granted_at = seconds * 1000 + micros // 1000
        assert await room.queue() == ["R3"]
        await room.let_out("W2")
        await room.inside("R3")
        await room.let_out("R3")
    dead_fence = dead.token
    assert room.tokens["W2"] > dead_fence
    assert granted_at >= dead_lease_ends  # never before the dead lease ended
    check_exclusion(room.timeline)
    assert await raw.zcard(keys[0]) == 0
    assert await leftovers(target, namespace) == []


def _die(lease: RedisLease) -> None:
    """The holder's process is gone: no more renewals, and it never releases."""
    lease._stop_renewal()
    lease.released = True
    lease._conn.leases.discard(lease)


async def test_readers_and_writers_mixed_across_processes_never_break_exclusion(
    make_backend: Callable[..., RedisBackend], raw: Any, target: RedisTarget, namespace: str
) -> None:
    """4 processes x 3 tasks, each taking the key 12 times in a random mode (seeded): the
    recorded timeline never has a writer beside anyone, and every grant has its own fence."""
    rng = random.Random(15)
    backends = [make_backend() for _ in range(4)]
    timeline = Timeline()
    fences: list[int] = []

    async def worker(backend: RedisBackend, who: str, modes: list[bool]) -> None:
        for i, shared in enumerate(modes):
            name = f"{'R' if shared else 'W'}{who}.{i}"
            lease = await backend.acquire(KEY, timeout=None, max_concurrency=1, shared=shared)
            timeline.enter(KEY, name)
            fences.append(lease.token)
            await anyio.lowlevel.checkpoint()
            timeline.leave(KEY, name)
            await lease.release()

    async with anyio.create_task_group() as tg:
        for p, backend in enumerate(backends):
            for t in range(3):
                tg.start_soon(worker, backend, f"{p}{t}", [rng.random() < 0.6 for _ in range(12)])
    check_exclusion(timeline)
    assert len(fences) == 4 * 3 * 12 == len(set(fences))
    assert await leftovers(target, namespace) == []


async def test_keyedlock_shared_holds_across_processes(
    make_backend: Callable[..., RedisBackend], raw: Any, target: RedisTarget, namespace: str
) -> None:
    """Through `KeyedLock.hold(..., shared=True)`: two readers in two processes and a second
    reader in the first process are inside together; a writer in a third process, queued
    while they hold, enters only after all of them left; a reader arriving after the writer
    waits for it."""
    a, b, c = (KeyedLock(backend=make_backend()) for _ in range(3))
    timeline = Timeline()
    inside = {name: anyio.Event() for name in ("Ra1", "Ra2", "Rb", "W", "Rlate")}
    leave = anyio.Event()
    keys = make_backend().redis_keys(KEY)

    async def reader(lock: KeyedLock, name: str) -> None:
        async with lock.hold(KEY, shared=True) as held:
            assert held.shared
            timeline.enter(KEY, name)
            inside[name].set()
            if name != "Rlate":
                await leave.wait()
            timeline.leave(KEY, name)

    async def writer() -> None:
        async with c.hold(KEY) as held:
            assert not held.shared
            timeline.enter(KEY, "W")
            inside["W"].set()
            timeline.leave(KEY, "W")

    try:
        async with anyio.create_task_group() as tg:
            for lock, name in ((a, "Ra1"), (b, "Rb"), (a, "Ra2")):
                tg.start_soon(reader, lock, name)
            with anyio.fail_after(10):
                for name in ("Ra1", "Rb", "Ra2"):
                    await inside[name].wait()  # all three inside: none has left
            tg.start_soon(writer)
            await wait_until(lambda: _queued(raw, keys, 1), "_queued(raw, keys, 1)")
            tg.start_soon(reader, b, "Rlate")
            await wait_until(lambda: _queued(raw, keys, 2), "_queued(raw, keys, 2)")
            assert not inside["W"].is_set()
            leave.set()
    finally:
        for lock in (a, b, c):
            await lock.aclose()
    check_exclusion(timeline)
    entries = timeline.entries(KEY)
    assert sorted(entries[:3]) == ["Ra1", "Ra2", "Rb"]
    assert entries[3:] == ["W", "Rlate"]
    assert await leftovers(target, namespace) == []


async def _queued(raw: Any, keys: list[str], count: int) -> bool:
    return bool(await raw.zcard(keys[1]) == count)
