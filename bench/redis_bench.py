"""Hand-offs per second and wait percentiles: our RedisBackend vs redis-py's `Lock` (defaults).

Two workloads, both one key and a zero-length critical section (so the numbers measure the
hand-off, not work), both run for each design in the same run against the same Redis:
- one process, 100 tasks, each acquires once (burst);
- 4 OS processes x 25 tasks, each acquires once, started together.
Hand-offs/s = grants / (last release - first grant); wait = time from asking to being granted.
Exclusion is checked afterwards from every holder's (granted, released) wall-clock interval
(one host, one clock): sorted by grant time, no interval may start before the previous ended.
It costs no round trip inside the critical section, so it does not skew either design.

    PYTHONPATH=. python bench/redis_bench.py [--url redis://127.0.0.1:6379/0] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import statistics
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.backends.redis import RedisBackend


async def _run_tasks(design: str, url: str, ns: str, tasks: int, start_at: float) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, max_connections=200)
    lock: KeyedLock | None = None
    if design == "keyedlock":
        lock = KeyedLock(backend=RedisBackend.from_url(url, namespace=ns))
    waits: list[float] = []
    grants: list[tuple[float, float]] = []

    async def one() -> None:
        asked = time.perf_counter()
        if lock is not None:
            async with lock.hold("hot"):
                got, got_at = time.perf_counter(), time.time()
                await asyncio.sleep(0)
                done_at = time.time()
        else:
            redis_lock = client.lock(f"{ns}:redispy", timeout=30)  # one Lock per acquisition
            await redis_lock.acquire()
            got, got_at = time.perf_counter(), time.time()
            await asyncio.sleep(0)
            done_at = time.time()
            await redis_lock.release()
        waits.append(got - asked)
        grants.append((got_at, done_at))

    await client.ping()
    if lock is not None:  # connect (and subscribe) before the clock starts
        async with lock.hold("warm-up"):
            pass
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    await asyncio.gather(*(one() for _ in range(tasks)))
    if lock is not None:
        await lock.aclose()
    await client.aclose()
    return {"waits": waits, "grants": grants}


def _process_main(args: tuple[str, str, str, int, float], out: Any) -> None:
    design, url, ns, tasks, start_at = args
    out.put(asyncio.run(_run_tasks(design, url, ns, tasks, start_at)))


def _summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    waits = sorted(w for r in results for w in r["waits"])
    grants = sorted(g for r in results for g in r["grants"])
    overlaps = sum(1 for a, b in itertools.pairwise(grants) if b[0] < a[1])
    first = min(g[0] for g in grants)
    last = max(g[1] for g in grants)
    return {
        "handoffs": len(grants) / (last - first),
        "p50": waits[len(waits) // 2] * 1000,
        "p99": waits[min(len(waits) - 1, int(len(waits) * 0.99))] * 1000,
        "violations": overlaps,
    }


def one_process(design: str, url: str) -> dict[str, float]:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    return _summarize([asyncio.run(_run_tasks(design, url, ns, 100, 0.0))])


def four_processes(design: str, url: str) -> dict[str, float]:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 1.5  # every process connected and waiting by then
    procs = [
        context.Process(target=_process_main, args=((design, url, ns, 25, start_at), out))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    return _summarize(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--reps", type=int, default=3)
    options = parser.parse_args()
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for workload, run in (
        ("1 process x 100 tasks", one_process),
        ("4 processes x 25", four_processes),
    ):
        for design in ("redis-py Lock", "keyedlock"):
            reps = [
                run("redispy" if design == "redis-py Lock" else design, options.url)
                for _ in range(options.reps)
            ]
            rows[(workload, design)] = {
                key: statistics.median(rep[key] for rep in reps) for key in reps[0]
            }
    print(f"medians of {options.reps} runs; one key, zero-length critical section\n")
    print("| workload | design | hand-offs/s | wait p50 ms | wait p99 ms | violations |")
    print("|---|---|---|---|---|---|")
    for (workload, design), row in rows.items():
        print(
            f"| {workload} | {design} | {row['handoffs']:.0f} | {row['p50']:.1f} | "
            f"{row['p99']:.1f} | {row['violations']:.0f} |"
        )
    print()
    for workload in ("1 process x 100 tasks", "4 processes x 25"):
        ours, theirs = rows[(workload, "keyedlock")], rows[(workload, "redis-py Lock")]
        print(
            f"{workload}: hand-offs/s {ours['handoffs'] / theirs['handoffs']:.1f}x redis-py's "
            f"Lock; p99 wait {ours['p99'] / theirs['p99']:.3f} of its p99"
        )


if __name__ == "__main__":
    main()
