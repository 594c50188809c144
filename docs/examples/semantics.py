"""The lock's semantics, one small function each (docs/semantics.md).

Each function returns what it observed, so tests/test_docs_examples.py can assert it.
None of them relies on timing: waiters are known to be queued by asking the lock.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import anyio.lowlevel

from keyedlock_asgi import (
    HoldExpired,
    KeyedLock,
    KeyedLockError,
    LockReentryError,
)


async def until_queued(lock: KeyedLock, key: str, count: int) -> None:
    """Let other tasks run until `count` callers wait on `key`."""
    while lock.waiting(key) < count:
        await anyio.lowlevel.checkpoint()


# --8<-- [start:fifo]
async def fifo() -> list[int]:
    lock = KeyedLock()
    served: list[int] = []

    async def customer(n: int) -> None:
        async with lock.hold("counter"):
            served.append(n)

    async with anyio.create_task_group() as tg, lock.hold("counter"):  # busy while five line up
        for n in range(5):
            tg.start_soon(customer, n)
            await until_queued(lock, "counter", n + 1)
    return served  # [0, 1, 2, 3, 4]: arrival order


# --8<-- [end:fifo]


# --8<-- [start:try_hold]
async def try_hold(lock: KeyedLock, key: str, **options: Any) -> str:
    try:
        async with lock.hold(key, **options):
            return "granted"
    except KeyedLockError as error:  # LockBusy, LockTimeout, QueueFull, ...
        return type(error).__name__


# --8<-- [end:try_hold]


async def limits() -> dict[str, str | int]:
    """`timeout=0`, `timeout>0` and `max_waiting`, while another task holds the key."""
    lock = KeyedLock()
    seen: dict[str, str | int] = {}
    holding, done = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with lock.hold("report"):
            holding.set()
            await done.wait()

    async def record(name: str, **options: Any) -> None:
        seen[name] = await try_hold(lock, "report", **options)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await holding.wait()
        # --8<-- [start:limits]
        await record("fail fast", timeout=0)  # LockBusy at once
        await record("bounded wait", timeout=0.05)  # LockTimeout after 50 ms
        seen["left behind by the timeout"] = lock.waiting("report")  # 0: it left the queue
        tg.start_soon(partial(record, "first in line", max_waiting=1))
        await until_queued(lock, "report", 1)
        await record("queue full", max_waiting=1)  # QueueFull: one already waits
        # --8<-- [end:limits]
        done.set()
    return seen


# --8<-- [start:max_concurrency]
async def at_most_two() -> tuple[int, int]:
    lock = KeyedLock(max_concurrency=2)  # a keyed semaphore: two holders per key
    inside = peak = 0
    gate = anyio.Event()

    async def export(n: int) -> None:
        nonlocal inside, peak
        async with lock.hold("exports:acme"):
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(export, n)
        await until_queued(lock, "exports:acme", 1)  # the third waits
        gate.set()
    return peak, lock.stats().active_keys  # (2, 0)


# --8<-- [end:max_concurrency]


# --8<-- [start:cancellation]
async def cancelled_waiter() -> tuple[int, bool]:
    lock = KeyedLock()
    async with lock.hold("k"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(try_hold, lock, "k")
            await until_queued(lock, "k", 1)
            tg.cancel_scope.cancel()  # e.g. the client went away
        left = lock.waiting("k")  # 0: the cancelled waiter left the queue at once
    return left, lock.locked("k")  # (0, False): nothing kept once released


# --8<-- [end:cancellation]


# --8<-- [start:multikey]
accounts = {"A": 100, "B": 100}


async def transfer(lock: KeyedLock, src: str, dst: str, amount: int) -> tuple[str, ...]:
    # Both accounts, taken in one canonical (sorted) order: A->B and B->A cannot deadlock.
    async with lock.hold(f"account:{src}", f"account:{dst}") as held:
        balance_src, balance_dst = accounts[src], accounts[dst]
        await anyio.sleep(0.001)
        accounts[src], accounts[dst] = balance_src - amount, balance_dst + amount
        return held.keys  # ("account:A", "account:B") whatever the order asked


# --8<-- [end:multikey]


async def transfers() -> tuple[dict[str, int], set[tuple[str, ...]]]:
    lock = KeyedLock()
    accounts.update(A=100, B=100)
    keys: set[tuple[str, ...]] = set()

    async def move(src: str, dst: str) -> None:
        keys.add(await transfer(lock, src, dst, 10))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(move, "A", "B")
            tg.start_soon(move, "B", "A")
    return dict(accounts), keys


# --8<-- [start:reentry]
async def reentry() -> str:
    lock = KeyedLock()
    async with lock.hold("user:1"):
        try:
            async with lock.hold("user:1"):  # would wait for itself forever
                return "entered twice"
        except LockReentryError:
            return "LockReentryError"


# --8<-- [end:reentry]


# --8<-- [start:no_checkpoint]
async def uncontended_does_not_yield() -> int:
    lock = KeyedLock()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        for n in range(1000):
            async with lock.hold(f"item:{n}"):  # free key: no trip through the event loop
                pass
        ran_meanwhile = ticks - before  # 0: the other task never got a turn
        tg.cancel_scope.cancel()
    return ran_meanwhile


# --8<-- [end:no_checkpoint]


# --8<-- [start:fencing]
class Ledger:
    """The protected resource checks fencing tokens: a stale writer is refused."""

    def __init__(self) -> None:
        self.last_token: dict[str, int] = {}
        self.entries: list[str] = []

    def write(self, key: str, token: int, entry: str) -> bool:
        if token <= self.last_token.get(key, 0):
            return False  # an older holder's write, arriving late
        self.last_token[key] = token
        self.entries.append(entry)
        return True


async def late_writer() -> tuple[bool, bool, list[str]]:
    lock, ledger = KeyedLock(), Ledger()
    async with lock.hold("order:7") as first:
        stale_token = first.token  # a write deferred past the hold (a bug, or a paused worker)
    async with lock.hold("order:7") as second:
        fresh = ledger.write("order:7", second.token, "refund")
    late = ledger.write("order:7", stale_token, "capture")
    return fresh, late, ledger.entries  # (True, False, ["refund"])


# --8<-- [end:fencing]


# --8<-- [start:per_loop]
shared = KeyedLock()  # module level: no event loop needed to create it


async def job() -> bool:
    async with shared.hold("nightly"):
        return shared.locked("nightly")


def two_loops() -> list[bool]:
    # Each event loop (asyncio or trio run) gets its own key table.
    return [anyio.run(job), anyio.run(job, backend="trio")]


# --8<-- [end:per_loop]


# --8<-- [start:shared]
async def readers_and_writers() -> list[str]:
    lock = KeyedLock()
    log: list[str] = []
    writer_waits = anyio.Event()

    async def read(name: str) -> None:
        async with lock.hold("doc:1", shared=True) as held:  # readers share the key
            assert held.shared
            log.append(f"{name} in")
            await writer_waits.wait()  # every reader stays in until the writer queued
            log.append(f"{name} out")

    async def write() -> None:
        async with lock.hold("doc:1"):  # exclusive: alone, after the readers
            log.append("writer in")

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, "reader 1")
        tg.start_soon(read, "reader 2")
        while len(log) < 2:  # both readers inside at once
            await anyio.lowlevel.checkpoint()
        tg.start_soon(write)
        await until_queued(lock, "doc:1", 1)
        writer_waits.set()
    return log


# --8<-- [end:shared]


# --8<-- [start:introspection]
async def introspection() -> dict[str, Any]:
    lock = KeyedLock(name="checkout", key_prefix="shop:")
    async with lock.hold("order:7"), lock.hold("user:1", shared=True):
        seen = {"keys": sorted(lock.keys()), "stats": lock.stats()}
    seen["idle"] = lock.keys()
    seen["repr starts"] = repr(lock).split()[1]
    return seen


# --8<-- [end:introspection]


# --8<-- [start:max_hold]
async def bounded_hold() -> list[str]:
    lock = KeyedLock(max_hold=0.1)  # no hold lasts longer than 100 ms
    log: list[str] = []

    async def stuck() -> None:
        try:
            async with lock.hold("job:1"):
                log.append("stuck in")
                await anyio.sleep_forever()  # never returns on its own
        except HoldExpired:
            log.append("stuck revoked")

    async def next_in_line() -> None:
        async with lock.hold("job:1"):
            log.append("next in")

    async with anyio.create_task_group() as tg:
        tg.start_soon(stuck)
        while not lock.locked("job:1"):
            await anyio.lowlevel.checkpoint()
        tg.start_soon(next_in_line)
    return log


# --8<-- [end:max_hold]
