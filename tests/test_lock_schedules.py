"""Thousands of random schedules of acquire / cancel / timeout / raise / release, in both
modes (shared and exclusive) and under `max_hold`.

Every step checks the invariants: an exclusive holder is never inside a key with anyone else;
never more than `max_concurrency` exclusive holders inside a key; with a mutex, exclusive callers
that had to queue enter in the order they queued; nobody is left waiting (the run ends); and once
all is over the lock keeps no state.

`KEYEDLOCK_SCHEDULES` sets how many schedules each event loop plays (default 2,500: 5,000 per
run across asyncio and trio, about 30 s). CI plays the same ones every run (derandomized); a
local run draws new ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyedlock_asgi import (
    HoldExpired,
    KeyedLock,
    LockAborted,
    LockBusy,
    LockStats,
    LockTimeout,
    QueueFull,
)

KEYS = ("a", "b", "c")
SCHEDULES = int(os.environ.get("KEYEDLOCK_SCHEDULES", "2500"))


class Boom(Exception):
    """The holder's block failed."""


@dataclass(frozen=True)
class Actor:
    keys: tuple[str, ...]
    start_after: int  # checkpoints before asking
    timeout: float | None  # None: wait; 0: fail fast; > 0: a tiny deadline
    max_waiting: int | None
    cancel_after: int | None  # checkpoints after asking, then cancelled from outside
    hold_for: int  # checkpoints inside
    raises: bool
    on_error: str
    shared: bool
    max_hold: float | None  # a tiny bound: the hold is revoked mid-block


actors = st.builds(
    Actor,
    keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=2).map(tuple),
    start_after=st.integers(0, 4),
    timeout=st.sampled_from([None, None, None, 0, 0.0005, 0.002]),
    max_waiting=st.sampled_from([None, None, 1, 3]),
    cancel_after=st.one_of(st.none(), st.integers(0, 6)),
    hold_for=st.integers(0, 4),
    raises=st.booleans(),
    on_error=st.sampled_from(["continue", "stop"]),
    shared=st.booleans(),
    max_hold=st.sampled_from([None, None, None, 0.0005]),
)


async def checkpoints(n: int) -> None:
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


async def play(plan: list[Actor], max_concurrency: int) -> None:
    lock = KeyedLock(max_concurrency=max_concurrency)
    inside = dict.fromkeys(KEYS, 0)
    writers = dict.fromkeys(KEYS, 0)
    queued_at: dict[int, int] = {}  # actor -> ticket, for single-key actors that had to queue
    entered: dict[str, list[int]] = {key: [] for key in KEYS}
    tickets = iter(range(10**9))

    async def run(n: int, actor: Actor, scope: anyio.CancelScope) -> None:
        await checkpoints(actor.start_after)
        with scope:
            if len(set(actor.keys)) == 1 and lock.locked(actor.keys[0]) and not actor.shared:
                queued_at[n] = next(tickets)  # no checkpoint until the lock queues it
            try:
                async with lock.hold(
                    *actor.keys,
                    timeout=actor.timeout,
                    max_waiting=actor.max_waiting,
                    on_error=actor.on_error,  # type: ignore[arg-type]
                    shared=actor.shared,
                    max_hold=actor.max_hold,
                ):
                    for key in set(actor.keys):
                        inside[key] += 1
                        if not actor.shared:
                            writers[key] += 1
                            assert writers[key] <= max_concurrency, f"too many inside {key!r}"
                        assert not writers[key] or writers[key] == inside[key], (
                            f"a writer beside a reader in {key!r}"
                        )
                        assert lock.locked(key)
                        entered[key].append(n)
                    try:
                        await checkpoints(actor.hold_for)
                        if actor.raises:
                            raise Boom
                    finally:
                        for key in set(actor.keys):
                            inside[key] -= 1
                            if not actor.shared:
                                writers[key] -= 1
            except (Boom, HoldExpired, LockAborted, LockBusy, LockTimeout, QueueFull):
                pass

    async def cancel_later(scope: anyio.CancelScope, after: int, start_after: int) -> None:
        await checkpoints(start_after + after)
        scope.cancel()

    with anyio.fail_after(60):  # a deadlock guard, not a timing assertion
        async with anyio.create_task_group() as tg:
            for n, actor in enumerate(plan):
                scope = anyio.CancelScope()
                tg.start_soon(run, n, actor, scope)
                if actor.cancel_after is not None:
                    tg.start_soon(cancel_later, scope, actor.cancel_after, actor.start_after)

    assert lock.stats() == LockStats(0, 0, 0), "state left behind"
    assert not any(inside.values())
    if max_concurrency == 1:
        for key, order in entered.items():
            waited = [n for n in order if n in queued_at and plan[n].keys[0] == key]
            assert waited == sorted(waited, key=queued_at.__getitem__), f"not FIFO on {key!r}"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=SCHEDULES,
    derandomize=os.environ.get("CI") == "true",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(plan=st.lists(actors, min_size=2, max_size=12), max_concurrency=st.sampled_from([1, 1, 2]))
def test_random_schedules_keep_the_invariants(
    backend: str, plan: list[Actor], max_concurrency: int
) -> None:
    anyio.run(play, plan, max_concurrency, backend=backend)
