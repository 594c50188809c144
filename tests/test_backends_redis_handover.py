"""The in-process hand-over of a Redis lease (`HandOverBackend.acquire_after`), case by case.

When a hold ends and the in-process lock hands a key to the next caller of the same process,
the ending hold's lease travels to that caller (`Held._inherited`), whose one ACQUIRE releases
it and takes the key: no other process can slip in between. These tests pin down the cases the
plain one-writer-after-another tests do not reach: shared holds on either side of the hand-over,
several keys in one hold (each key's lease to that key's head), `max_concurrency=2`, and a
caller handed a lease that is cancelled (or runs out of time) before it could use it.

Each `KeyedLock` has a `RedisBackend` of its own and stands for one process. Every test records
who was inside when (`Timeline`) and checks it against the rules (readers share, writers are
alone, at most `max_concurrency` writers), reads who Redis has as holders and waiters after the
step that changes them, and logs every script each participant ran: which lease an ACQUIRE
carried (passed on) and which RELEASE ran (not passed on).

redis-py's asyncio client is asyncio-only and `RedisBackend` refuses trio (tested in
test_backends_redis.py), so these run on asyncio only, as the other Redis tests do.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from keyedlock_asgi import Held, KeyedLock
from keyedlock_asgi.backends import _redis_scripts
from keyedlock_asgi.backends.redis import RedisBackend, RedisLease
from tests.support.engine_redis import (  # noqa: F401 (the fixtures are used by name)
    REDIS_URL,
    make_redis_backend,
    redis_namespace,
    redis_raw,
)
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client is asyncio-only


async def leftovers(raw: Any, namespace: str) -> list[str]:
    """Keys of the namespace other than the counters hash: none once every key is idle."""
    return [
        name.decode()
        async for name in raw.scan_iter(match=f"{{{namespace}:*")
        if not name.endswith(b":m")
    ]


# -- who ran which script ---------------------------------------------------------------------

WHO: ContextVar[str] = ContextVar("WHO", default="?")
"""The participant whose task runs a script (set first thing in its task)."""


@dataclass(frozen=True)
class Call:
    script: str  # "acquire", "release" or "extend"
    who: str
    key: str  # the lock key (without the namespace)
    token: str  # the caller's Redis token (ARGV[1])
    passed: str  # ACQUIRE: the ended hold's token it carries and releases; else ""
    result: Any


def _script_name(script: Any) -> str:
    for name in ("ACQUIRE", "RELEASE", "EXTEND"):
        if script.script == getattr(_redis_scripts, name):
            return name.lower()
    raise AssertionError("unknown script")


class Scripts:
    """Every script the watched backends ran, by whom, on which key, once it answered."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls: list[Call] = []

    def watch(self, backend: RedisBackend) -> RedisBackend:
        run = backend._run

        async def logged(script: Any, keys: list[str], args: list[Any], conn: Any) -> Any:
            name = _script_name(script)
            result = await run(script, keys, args, conn)
            key = keys[0][1 : keys[0].rindex("}")].split(":", 1)[1]
            passed = str(args[9]) if name == "acquire" else ""
            self.calls.append(Call(name, WHO.get(), key, str(args[0]), passed, result))
            return result

        self.monkeypatch.setattr(backend, "_run", logged)
        return backend

    def name(self, token: str) -> str:
        """Who asked for `token` (its first ACQUIRE)."""
        for call in self.calls:
            if call.script == "acquire" and call.token == token:
                return call.who
        return f"unknown {token}"

    def acquires(self, key: str) -> set[tuple[str, str]]:
        """(who, the name of whose lease it carried, or "") per ACQUIRE on `key`."""
        return {
            (call.who, self.name(call.passed) if call.passed else "")
            for call in self.calls
            if call.script == "acquire" and call.key == key
        }

    def releases(self, who: str | None = None) -> list[tuple[str, str, str, Any]]:
        """(who ran it, key, whose token, reply) per RELEASE, in order."""
        return [
            (call.who, call.key, self.name(call.token), call.result)
            for call in self.calls
            if call.script == "release" and who in (None, call.who)
        ]


class View:
    """What Redis has for a lock key right now, by participant name."""

    def __init__(self, raw: Any, namespace: str, scripts: Scripts) -> None:
        self.raw = raw
        self.namespace = namespace
        self.scripts = scripts

    def _key(self, key: str, part: str) -> str:
        return f"{{{self.namespace}:{key}}}:{part}"

    async def holders(self, key: str) -> set[str]:
        members = await self.raw.zrange(self._key(key, "o"), 0, -1)
        return {self.scripts.name(member.decode()) for member in members}

    async def queue(self, key: str) -> list[str]:
        members = await self.raw.zrange(self._key(key, "q"), 0, -1)
        return [self.scripts.name(member.decode()) for member in members]

    async def is_queue(self, key: str, expected: list[str]) -> bool:
        return await self.queue(key) == expected

    async def are_holders(self, key: str, expected: set[str]) -> bool:
        return await self.holders(key) == expected


# -- participants that enter and leave on command ---------------------------------------------


class Crowd:
    """Holds that enter and leave on command; who was inside when goes to `timeline`.

    A name starting with R holds shared. `after_leaving[who]` runs right after `who`'s block
    is left, before anything else can run (to act between a hand-over and its use).
    """

    def __init__(self) -> None:
        self.timeline = Timeline()
        self.held: dict[str, Held] = {}
        self.entered: dict[str, anyio.Event] = {}
        self.leave: dict[str, anyio.Event] = {}
        self.done: dict[str, anyio.Event] = {}
        self.after_leaving: dict[str, Callable[[], object]] = {}

    def join(
        self,
        tg: anyio.abc.TaskGroup,
        lock: KeyedLock,
        who: str,
        *keys: str,
        scope: anyio.CancelScope | None = None,
    ) -> None:
        for events in (self.entered, self.leave, self.done):
            events[who] = anyio.Event()
        tg.start_soon(self._run, lock, who, keys, scope or anyio.CancelScope())

    async def _run(
        self, lock: KeyedLock, who: str, keys: tuple[str, ...], scope: anyio.CancelScope
    ) -> None:
        WHO.set(who)
        try:
            with scope:
                async with lock.hold(*keys, shared=who.startswith("R")) as held:
                    self.held[who] = held
                    for key in held.keys:
                        self.timeline.enter(key, who)
                    self.entered[who].set()
                    await self.leave[who].wait()
                    for key in held.keys:
                        self.timeline.leave(key, who)
                after = self.after_leaving.get(who)
                if after is not None:
                    after()
        finally:
            self.done[who].set()

    async def inside(self, *who: str) -> None:
        """Wait until each of `who` is inside (none of them has been let out yet)."""
        with anyio.fail_after(10):
            for name in who:
                await self.entered[name].wait()

    async def let_out(self, *who: str) -> None:
        for name in who:
            self.leave[name].set()
        with anyio.fail_after(10):
            for name in who:
                await self.done[name].wait()

    def redis_token(self, who: str, key: str) -> str:
        held = self.held[who]
        lease = held._leases[held.keys.index(key)]
        assert isinstance(lease, RedisLease)
        return lease._token_str


def check_rules(timeline: Timeline, limit: int = 1) -> None:
    """Per key: a writer (not R*) never beside a reader, nor beside `limit` writers; readers
    only beside readers."""
    inside: dict[str, set[str]] = {}
    for kind, key, who in timeline.events:
        name = str(who)
        here = inside.setdefault(key, set())
        if kind == "in":
            readers = {o for o in here if o.startswith("R")}
            if name.startswith("R"):
                assert readers == here, f"{name} entered {key} beside writers {here - readers}"
            else:
                assert not readers, f"{name} entered {key} beside readers {readers}"
                assert len(here) < limit, f"{name} entered {key} beside {here}"
            here.add(name)
        else:
            here.discard(name)


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> Scripts:
    return Scripts(monkeypatch)


@pytest.fixture
def view(raw: Any, namespace: str, scripts: Scripts) -> View:
    return View(raw, namespace, scripts)


def locks(
    make_backend: Callable[..., RedisBackend], scripts: Scripts, count: int, **options: Any
) -> list[KeyedLock]:
    """`count` locks, each with a backend of its own (a process each), scripts watched."""
    return [KeyedLock(backend=scripts.watch(make_backend()), **options) for _ in range(count)]


# -- shared holds -----------------------------------------------------------------------------


async def test_a_writer_hands_a_shared_run_on_and_its_lease_goes_to_the_head(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
) -> None:
    """W1 leaves with R2 R3 W4 queued in its process: the run {R2 R3} is granted at once and
    only R2, the head, carries W1's lease (W1 never runs RELEASE). R2 leaves while R3 still
    holds: W4 is first in line but not granted, so R2's lease is released, not passed. R3
    leaves to W4: the reader's lease goes to the writer."""
    (p,) = locks(make_backend, scripts, 1)
    crowd = Crowd()
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "W1", "k")
        await crowd.inside("W1")
        crowd.join(tg, p, "R2", "k")
        await wait_until(lambda: p.waiting("k") == 1, "R2 queued")
        crowd.join(tg, p, "R3", "k")
        await wait_until(lambda: p.waiting("k") == 2, "R3 queued")
        crowd.join(tg, p, "W4", "k")
        await wait_until(lambda: p.waiting("k") == 3, "W4 queued")

        await crowd.let_out("W1")
        await crowd.inside("R2", "R3")  # together: neither has been let out
        assert await view.holders("k") == {"R2", "R3"}
        assert not crowd.entered["W4"].is_set()
        assert await view.queue("k") == []  # W4 waits in its process only

        await crowd.let_out("R2")
        assert await view.holders("k") == {"R3"}  # R2's lease did not stay behind
        assert not crowd.entered["W4"].is_set()

        await crowd.let_out("R3")
        await crowd.inside("W4")
        assert await view.holders("k") == {"W4"}
        await crowd.let_out("W4")

    check_rules(crowd.timeline)
    assert crowd.timeline.overlapped("R2", "R3")
    assert crowd.timeline.entries("k")[0] == "W1"
    assert crowd.timeline.entries("k")[-1] == "W4"
    assert scripts.acquires("k") == {("W1", ""), ("R2", "W1"), ("R3", ""), ("W4", "R3")}
    assert scripts.releases() == [("R2", "k", "R2", 1), ("W4", "k", "W4", 1)]
    fence = {who: held.token for who, held in crowd.held.items()}
    assert fence["W1"] < min(fence["R2"], fence["R3"])
    assert max(fence["R2"], fence["R3"]) < fence["W4"]
    assert await leftovers(raw, namespace) == []


async def test_shared_and_exclusive_hand_overs_keep_the_order_across_processes(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
) -> None:
    """R1 (process P) and Rq (process Q) share the key. R1 leaves to W2 of P: W2's ACQUIRE
    releases R1's lease but must queue in Redis, since Rq still reads; Q's reader Rq2, which
    arrives then, queues behind W2 and does not join Rq. W2 gets the key only once Rq left,
    and leaves to R5 of P, whose ACQUIRE hands the key to Rq2 too: the two readers of two
    processes are inside together, and no writer is ever beside a reader."""
    p, q = locks(make_backend, scripts, 2)
    crowd = Crowd()
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "R1", "k")
        crowd.join(tg, q, "Rq", "k")
        await crowd.inside("R1", "Rq")
        crowd.join(tg, p, "W2", "k")
        await wait_until(lambda: p.waiting("k") == 1, "W2 queued in P")

        await crowd.let_out("R1")
        await wait_until(lambda: view.is_queue("k", ["W2"]), "W2 queued in Redis")
        assert await view.holders("k") == {"Rq"}  # R1's lease went with W2's ACQUIRE
        assert not crowd.entered["W2"].is_set()
        crowd.join(tg, p, "R5", "k")
        await wait_until(lambda: p.waiting("k") == 1, "R5 queued in P")
        crowd.join(tg, q, "Rq2", "k")
        await wait_until(lambda: view.is_queue("k", ["W2", "Rq2"]), "Rq2 queued in Redis")
        assert not crowd.entered["Rq2"].is_set()

        await crowd.let_out("Rq")
        await crowd.inside("W2")
        assert await view.holders("k") == {"W2"}
        assert await view.queue("k") == ["Rq2"]

        await crowd.let_out("W2")
        await crowd.inside("R5", "Rq2")
        assert await view.holders("k") == {"R5", "Rq2"}
        await crowd.let_out("R5", "Rq2")

    check_rules(crowd.timeline)
    assert crowd.timeline.overlapped("R1", "Rq")
    assert crowd.timeline.overlapped("R5", "Rq2")
    entries = crowd.timeline.entries("k")
    assert sorted(entries[:2]) == ["R1", "Rq"]
    assert entries[2] == "W2"
    assert sorted(entries[3:]) == ["R5", "Rq2"]
    carried = {(who, passed) for who, passed in scripts.acquires("k") if passed}
    assert carried == {("W2", "R1"), ("R5", "W2")}
    assert sorted(who for who, *_ in scripts.releases()) == ["R5", "Rq", "Rq2"]  # not R1, W2
    fence = {who: held.token for who, held in crowd.held.items()}
    assert max(fence["R1"], fence["Rq"]) < fence["W2"] < min(fence["R5"], fence["Rq2"])
    assert await leftovers(raw, namespace) == []


# -- several keys in one hold -----------------------------------------------------------------


async def test_each_key_of_a_hold_passes_its_lease_to_that_keys_head(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
) -> None:
    """H1 holds x, y and z. In its process M waits for (x, y), queued on x, and Y for y;
    another process's Z waits for z in Redis. When H1 leaves, x's lease goes to M and y's to
    Y (two different callers), and z's, with nobody of the process waiting, is released, so
    Z gets it. M, holding x, then waits for y until Y leaves it y's lease."""
    p, q = locks(make_backend, scripts, 2)
    crowd = Crowd()
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "H1", "x", "y", "z")
        await crowd.inside("H1")
        crowd.join(tg, p, "M", "y", "x")
        await wait_until(lambda: p.waiting("x") == 1, "M queued on x")
        crowd.join(tg, p, "Y", "y")
        await wait_until(lambda: p.waiting("y") == 1, "Y queued on y")
        crowd.join(tg, q, "Z", "z")
        await wait_until(lambda: view.is_queue("z", ["Z"]), "Z queued in Redis")

        await crowd.let_out("H1")
        await crowd.inside("Y", "Z")
        await wait_until(lambda: view.are_holders("x", {"M"}), "M holds x in Redis")
        await wait_until(lambda: p.waiting("y") == 1, "M queued on y behind Y")
        assert await view.holders("y") == {"Y"}
        assert await view.holders("z") == {"Z"}
        assert not crowd.entered["M"].is_set()

        await crowd.let_out("Y")
        await crowd.inside("M")
        assert await view.holders("x") == await view.holders("y") == {"M"}
        await crowd.let_out("M", "Z")

    timeline = crowd.timeline
    check_rules(timeline)
    assert timeline.most == {"x": 1, "y": 1, "z": 1}
    assert timeline.entries("x") == ["H1", "M"]
    assert timeline.entries("y") == ["H1", "Y", "M"]
    assert timeline.entries("z") == ["H1", "Z"]
    assert scripts.acquires("x") == {("H1", ""), ("M", "H1")}
    assert scripts.acquires("y") == {("H1", ""), ("Y", "H1"), ("M", "Y")}
    assert ("Z", "") in scripts.acquires("z")  # queued behind H1 (maybe asked again)
    assert scripts.releases("H1") == [("H1", "z", "H1", 1)]  # only the lease not passed on
    assert scripts.releases("Y") == []
    assert sorted(scripts.releases("M")) == [("M", "x", "M", 1), ("M", "y", "M", 1)]
    held = crowd.held
    assert held["H1"].tokens["x"] < held["M"].tokens["x"]
    assert held["H1"].tokens["y"] < held["Y"].tokens["y"] < held["M"].tokens["y"]
    assert held["H1"].tokens["z"] < held["Z"].tokens["z"]
    assert await leftovers(raw, namespace) == []


# -- max_concurrency=2 ------------------------------------------------------------------------


async def test_a_hand_over_with_two_slots_never_lets_a_third_in(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
) -> None:
    """max_concurrency=2. E1 and E2 of process P hold; F1 of Q waits in Redis; E3 waits in
    P. E1 leaves to E3: E3's ACQUIRE frees E1's slot, which goes to F1 (first in Redis), so E3
    waits in Redis. E2 then leaves to E4 of P: its slot goes to E3, E4 waits. Redis never
    has more than two holders, and nobody is inside beside two others."""
    p, q = locks(make_backend, scripts, 2, max_concurrency=2)
    crowd = Crowd()
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "E1", "k")
        crowd.join(tg, p, "E2", "k")
        await crowd.inside("E1", "E2")
        crowd.join(tg, q, "F1", "k")
        await wait_until(lambda: view.is_queue("k", ["F1"]), "F1 queued in Redis")
        crowd.join(tg, p, "E3", "k")
        await wait_until(lambda: p.waiting("k") == 1, "E3 queued in P")

        await crowd.let_out("E1")
        await crowd.inside("F1")
        await wait_until(lambda: view.is_queue("k", ["E3"]), "E3 queued in Redis")
        assert await view.holders("k") == {"E2", "F1"}
        assert not crowd.entered["E3"].is_set()
        crowd.join(tg, p, "E4", "k")
        await wait_until(lambda: p.waiting("k") == 1, "E4 queued in P")

        await crowd.let_out("E2")
        await crowd.inside("E3")
        await wait_until(lambda: view.is_queue("k", ["E4"]), "E4 queued in Redis")
        assert await view.holders("k") == {"F1", "E3"}
        assert not crowd.entered["E4"].is_set()

        await crowd.let_out("F1")
        await crowd.inside("E4")
        assert await view.holders("k") == {"E3", "E4"}
        await crowd.let_out("E3", "E4")

    check_rules(crowd.timeline, limit=2)
    assert crowd.timeline.most["k"] == 2
    entries = crowd.timeline.entries("k")
    assert sorted(entries[:2]) == ["E1", "E2"]
    assert entries[2:] == ["F1", "E3", "E4"]
    carried = {(who, passed) for who, passed in scripts.acquires("k") if passed}
    assert carried == {("E3", "E1"), ("E4", "E2")}
    assert sorted(who for who, *_ in scripts.releases()) == ["E3", "E4", "F1"]  # not E1, E2
    fence = {who: held.token for who, held in crowd.held.items()}
    assert max(fence["E1"], fence["E2"]) < fence["F1"] < fence["E3"] < fence["E4"]
    assert await leftovers(raw, namespace) == []


async def test_two_slots_hold_under_mixed_hand_overs_in_two_processes(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    raw: Any,
    namespace: str,
) -> None:
    """max_concurrency=2, two processes x 3 tasks x 8 holds each, a seeded mix of readers and
    writers. Inside every block, Redis has the holder's own lease and agrees with the rules
    (a writer: at most two holders, all writers; a reader: readers only), and the timeline
    never breaks them either."""
    rng = random.Random(20261203)
    procs = locks(make_backend, scripts, 2, max_concurrency=2)
    timeline = Timeline()
    fences: list[int] = []
    own = f"{{{namespace}:k}}:o"

    async def worker(lock: KeyedLock, name: str, modes: list[bool]) -> None:
        for i, shared in enumerate(modes):
            who = f"{'R' if shared else 'W'}{name}.{i}"
            WHO.set(who)
            async with lock.hold("k", shared=shared) as held:
                timeline.enter("k", who)
                fences.append(held.token)
                lease = held._leases[0]
                assert isinstance(lease, RedisLease)
                members = {m.decode() for m in await raw.zrange(own, 0, -1)}
                assert lease._token_str in members
                if shared:
                    assert all(m.endswith("|s") for m in members), members
                else:
                    assert len(members) <= 2, members
                    assert not any(m.endswith("|s") for m in members), members
                timeline.leave("k", who)

    # A bound: a lease left behind (renewed, never released) would block every worker.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for p, lock in enumerate(procs):
                for t in range(3):
                    modes = [rng.random() < 0.3 for _ in range(8)]
                    tg.start_soon(worker, lock, f"{p}{t}", modes)

    check_rules(timeline, limit=2)
    assert len(fences) == 2 * 3 * 8 == len(set(fences))
    assert any(call.passed for call in scripts.calls)  # the hand-over path was taken
    assert await leftovers(raw, namespace) == []


# -- a caller handed a lease, then cancelled before it used it --------------------------------


def stop(scope: anyio.CancelScope, how: str) -> None:
    """End `scope` now: cancelled, or its deadline reached (a caller's time budget ran out)."""
    if how == "cancel":
        scope.cancel()
    else:
        scope.deadline = anyio.current_time()


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_caller_cancelled_after_the_hand_over_releases_the_lease_it_was_handed(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
    how: str,
) -> None:
    """H leaves to W of its process, and W is cancelled (or its deadline passes) before it
    runs: W never sends the ACQUIRE that would release H's lease, so it must release it
    itself. Redis is free at once (not when the 10 s lease ends), and another process takes
    the key without waiting, with a larger token."""
    p, q = locks(make_backend, scripts, 2)
    crowd = Crowd()
    doomed = anyio.CancelScope()
    crowd.after_leaving["H"] = lambda: stop(doomed, how)
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "H", "k")
        await crowd.inside("H")
        crowd.join(tg, p, "W", "k", scope=doomed)
        await wait_until(lambda: p.waiting("k") == 1, "W queued in P")
        await crowd.let_out("H")
        with anyio.fail_after(10):
            await crowd.done["W"].wait()
        assert await view.holders("k") == set()
        assert await view.queue("k") == []
    assert doomed.cancelled_caught
    assert not crowd.entered["W"].is_set()
    assert crowd.timeline.entries() == ["H"]
    assert [call.script for call in scripts.calls if call.who == "W"] == ["release"]
    assert scripts.releases() == [("W", "k", "H", 1)]  # H's lease, released by W
    assert p.stats().active_keys == 0
    async with q.hold("k", timeout=0) as other:
        assert other.token > crowd.held["H"].token
    assert await leftovers(raw, namespace) == []


async def test_a_several_key_caller_cancelled_after_a_hand_over_releases_every_lease(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
) -> None:
    """M has taken x and waits for y; Y1 leaves y to it, and M is cancelled before it runs:
    it releases both its own lease on x and Y1's lease on y that it was handed. Y2, queued
    on y behind M, then gets y, and another process takes x at once."""
    p, q = locks(make_backend, scripts, 2)
    crowd = Crowd()
    doomed = anyio.CancelScope()
    crowd.after_leaving["Y1"] = doomed.cancel
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "Y1", "y")
        await crowd.inside("Y1")
        crowd.join(tg, p, "M", "x", "y", scope=doomed)
        await wait_until(lambda: p.waiting("y") == 1, "M queued on y")
        assert await view.holders("x") == {"M"}
        crowd.join(tg, p, "Y2", "y")
        await wait_until(lambda: p.waiting("y") == 2, "Y2 queued on y")

        await crowd.let_out("Y1")
        with anyio.fail_after(10):
            await crowd.done["M"].wait()
        assert await view.holders("x") == set()
        await crowd.inside("Y2")
        assert await view.holders("y") == {"Y2"}
        crowd.join(tg, q, "X", "x")
        await crowd.inside("X")  # no wait behind a stuck lease
        await crowd.let_out("Y2", "X")

    assert doomed.cancelled_caught
    assert not crowd.entered["M"].is_set()
    check_rules(crowd.timeline)
    assert crowd.timeline.entries("y") == ["Y1", "Y2"]
    assert not [c for c in scripts.calls if c.who == "M" and c.key == "y" and c.script != "release"]
    assert sorted(scripts.releases("M")) == [("M", "x", "M", 1), ("M", "y", "Y1", 1)]
    assert scripts.releases("Y1") == []  # passed on to M
    assert crowd.held["X"].token > 0
    assert await leftovers(raw, namespace) == []


async def test_the_head_of_a_shared_run_cancelled_after_the_hand_over(
    make_backend: Callable[..., RedisBackend],
    scripts: Scripts,
    view: View,
    raw: Any,
    namespace: str,
) -> None:
    """W1 leaves to the run {R2 R3}; R2, its head, was handed W1's lease and is cancelled
    before it runs. It releases W1's lease; R3 holds alone, and W4 waits for it."""
    (p,) = locks(make_backend, scripts, 1)
    crowd = Crowd()
    doomed = anyio.CancelScope()
    crowd.after_leaving["W1"] = doomed.cancel
    async with anyio.create_task_group() as tg:
        crowd.join(tg, p, "W1", "k")
        await crowd.inside("W1")
        crowd.join(tg, p, "R2", "k", scope=doomed)
        crowd.join(tg, p, "R3", "k")
        crowd.join(tg, p, "W4", "k")
        await wait_until(lambda: p.waiting("k") == 3, "R2 R3 W4 queued")

        await crowd.let_out("W1")
        with anyio.fail_after(10):
            await crowd.done["R2"].wait()
        await crowd.inside("R3")
        assert await view.holders("k") == {"R3"}
        assert not crowd.entered["W4"].is_set()
        await crowd.let_out("R3")
        await crowd.inside("W4")
        await crowd.let_out("W4")

    assert doomed.cancelled_caught
    check_rules(crowd.timeline)
    assert crowd.timeline.entries("k") == ["W1", "R3", "W4"]
    assert scripts.releases("R2") == [("R2", "k", "W1", 1)]
    assert ("W4", "R3") in scripts.acquires("k")
    assert await leftovers(raw, namespace) == []
