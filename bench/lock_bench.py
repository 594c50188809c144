"""KeyedLock against its peers, in one process: a dict of asyncio.Lock, a dict of anyio.Lock
and asyncio-keyed-lock (PyPI).

Not a test: prints ops/s and ratios to the best peer of each workload measured in the same run
(implementations interleaved, median of --repeat rounds), plus bytes per held key.

    python bench/lock_bench.py [--cycles 200000] [--tasks 100] [--held 10000] [--repeat 5]

Workloads:
  (a) acquire/release cycles, each on a distinct key, from one task (the uncontended path)
  (b) the same number of cycles on ONE key shared by --tasks tasks; the body awaits
      `sleep(0)` so every release is a real hand-off
  (c) bytes allocated per held key (tracemalloc) with --held keys held at once

Targets, as ratios to the best peer: (a) >= 1.0x, (b) >= 1.0x; (c) <= 400 bytes.

Rates use this process's CPU time (`time.process_time`), not wall time: the loop is one thread
doing only this work, and CPU time stays honest when other processes load the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from keyedlock_asgi import KeyedLock


class KeyedImpl(Protocol):
    def hold(self, key: str) -> Any: ...


class _RefcountHold:
    """A class-based context manager over a refcounted dict of primitive locks."""

    __slots__ = ("_key", "_lock", "_table")

    def __init__(self, table: _RefcountTable, key: str) -> None:
        self._table = table
        self._key = key

    async def __aenter__(self) -> None:
        entries = self._table.entries
        entry = entries.get(self._key)
        if entry is None:
            entry = entries[self._key] = [self._table.factory(), 0]
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._drop(entry)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._table.entries[self._key]
        entry[0].release()
        self._drop(entry)

    def _drop(self, entry: list[Any]) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self._table.entries[self._key]


class _RefcountTable:
    """The usual hand-written keyed lock: a primitive per key, deleted when unused."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.entries: dict[str, list[Any]] = {}

    def hold(self, key: str) -> _RefcountHold:
        return _RefcountHold(self, key)


class _AsyncioKeyedLock:
    """asyncio-keyed-lock's `AsyncioKeyedLock`, called as `lock(key)`, behind `hold(key)`."""

    def __init__(self) -> None:
        from asyncio_keyed_lock import AsyncioKeyedLock

        self.hold = AsyncioKeyedLock()


IMPLEMENTATIONS: dict[str, Callable[[], KeyedImpl]] = {
    "asyncio.Lock dict": lambda: _RefcountTable(asyncio.Lock),
    "anyio.Lock(fast) dict": lambda: _RefcountTable(lambda: anyio.Lock(fast_acquire=True)),
    "asyncio-keyed-lock": _AsyncioKeyedLock,
    "KeyedLock": KeyedLock,
}
PEERS = [name for name in IMPLEMENTATIONS if name != "KeyedLock"]


async def uncontended(impl: KeyedImpl, cycles: int) -> float:
    keys = [f"user:{i}" for i in range(cycles)]
    start = time.process_time()
    for key in keys:
        async with impl.hold(key):
            pass
    return cycles / (time.process_time() - start)


async def contended(impl: KeyedImpl, cycles: int, tasks: int) -> float:
    inside = 0
    most = 0

    async def worker(rounds: int) -> None:
        nonlocal inside, most
        for _ in range(rounds):
            async with impl.hold("hot"):
                inside += 1
                most = max(most, inside)
                await anyio.lowlevel.checkpoint()
                inside -= 1

    start = time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker, cycles // tasks)
    elapsed = time.process_time() - start
    assert most == 1, f"mutual exclusion broken: {most} inside at once"
    return (cycles // tasks) * tasks / elapsed


async def bytes_per_held_key(make: Callable[[], KeyedImpl], held: int) -> float:
    keys = [f"user:{i}" for i in range(held)]  # allocated before measuring: not counted
    impl = make()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    async with AsyncExitStack() as stack:
        for key in keys:
            await stack.enter_async_context(impl.hold(key))
        after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / held


def ratio(value: float, base: float) -> str:
    return f"{value / base:5.2f}x"


async def main(args: argparse.Namespace) -> int:
    results_a: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    results_b: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(args.repeat):
        for name, make in IMPLEMENTATIONS.items():
            gc.collect()
            results_a[name].append(await uncontended(make(), args.cycles))
            gc.collect()
            results_b[name].append(await contended(make(), args.cycles, args.tasks))
    memory = {
        name: await bytes_per_held_key(make, args.held) for name, make in IMPLEMENTATIONS.items()
    }

    med_a = {name: statistics.median(v) for name, v in results_a.items()}
    med_b = {name: statistics.median(v) for name, v in results_b.items()}
    best_a = max(PEERS, key=med_a.__getitem__)
    best_b = max(PEERS, key=med_b.__getitem__)
    print(
        f"python {sys.version.split()[0]}, {args.cycles} cycles, {args.tasks} tasks, "
        f"{args.held} held keys, median of {args.repeat}; ratios to the best peer"
    )
    header = (
        f"{'implementation':<24}{'(a) distinct ops/s':>20}{'ratio':>8}"
        f"{'(b) 1 key ops/s':>18}{'ratio':>8}{'(c) B/held key':>16}"
    )
    print(header)
    print("-" * len(header))
    for name in IMPLEMENTATIONS:
        print(
            f"{name:<24}{med_a[name]:>20,.0f}{ratio(med_a[name], med_a[best_a]):>8}"
            f"{med_b[name]:>18,.0f}{ratio(med_b[name], med_b[best_b]):>8}{memory[name]:>16,.0f}"
        )
    ours_a = med_a["KeyedLock"] / med_a[best_a]
    ours_b = med_b["KeyedLock"] / med_b[best_b]
    ours_c = memory["KeyedLock"]
    verdict = [
        f"(a) {ours_a:.2f}x {best_a} {'ok' if ours_a >= 1.0 else 'MISSED'} (target >= 1.0x)",
        f"(b) {ours_b:.2f}x {best_b} {'ok' if ours_b >= 1.0 else 'MISSED'} (target >= 1.0x)",
        f"(c) {ours_c:.0f} B {'ok' if ours_c <= 400 else 'MISSED'} (target <= 400 B)",
    ]
    print("KeyedLock vs the best peer: " + "; ".join(verdict))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
