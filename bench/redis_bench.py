"""Hand-offs per second and wait percentiles: our RedisBackend vs redis-py's `Lock` (defaults).

Two workloads, both one key and a zero-length critical section (so the numbers measure the
hand-off, not work), both run for each design in the same run against the same Redis:
- one process, 100 tasks, each acquires once (burst);
- 4 OS processes x 25 tasks, each acquires once, started together.
Hand-offs/s = grants / (last release - first grant); wait = time from asking to being granted.
Exclusion is checked afterwards from every holder's (granted, released) wall-clock interval
(one host, one clock): sorted by grant time, no interval may start before the previous ended.
It costs no round trip inside the critical section, so it does not skew either design.

The floor: a hand-off on one key costs at least one script round trip (the RELEASE that grants
the next waiter), so a bare EVALSHA loop (one call in flight per process, a one-line script on
one key) from 1 process, and from 4 processes at once, is printed beside it, and the
backend's hand-offs/s as a fraction of one loop's rate under the same number of processes.

Cluster (`--cluster`, needs redis-server): 4 processes x 100 keys x 2 tasks x 3 holds each,
on a private 3-master cluster vs a private single redis-server, both started by this script.

    PYTHONPATH=. python bench/redis_bench.py [--url redis://127.0.0.1:6379/0] [--reps 3]
        [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import statistics
import subprocess
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.backends.redis import RedisBackend
from tests.support.redis_cluster import RedisClusterProcesses, _free_ports


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


# -- the floor: bare EVALSHA round trips --------------------------------------------------

FLOOR_CALLS = 3000


async def _evalsha_loop(url: str, ns: str, start_at: float) -> float:
    """One call in flight at a time; returns this loop's calls per second."""
    client = aioredis.Redis.from_url(url)
    script = client.register_script("return redis.call('EXISTS', KEYS[1])")
    await script(keys=[f"{{{ns}}}:floor"])  # loaded, connected
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    began = time.perf_counter()
    for _ in range(FLOOR_CALLS):
        await script(keys=[f"{{{ns}}}:floor"])
    rate = FLOOR_CALLS / (time.perf_counter() - began)
    await client.aclose()
    return rate


def _floor_main(args: tuple[str, str, float], out: Any) -> None:
    out.put(asyncio.run(_evalsha_loop(*args)))


def evalsha_floor(url: str, processes: int) -> dict[str, float]:
    """Per-loop and total EVALSHA round trips per second with `processes` loops at once."""
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 1.5
    procs = [
        context.Process(target=_floor_main, args=((url, ns, start_at), out))
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    rates = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    return {"per_loop": statistics.mean(rates), "total": sum(rates)}


# -- many keys: a 3-master cluster vs one node ----------------------------------------------

KEYS, TASKS_PER_KEY, HOLDS = 100, 2, 3


async def _many_keys(url: str, cluster: bool, ns: str, start_at: float) -> dict[str, Any]:
    lock = KeyedLock(backend=RedisBackend.from_url(url, cluster=cluster, namespace=ns))
    spans: list[tuple[float, float]] = []

    async def one(key: str) -> None:
        for _ in range(HOLDS):
            async with lock.hold(key):
                got = time.time()
                await asyncio.sleep(0)
                spans.append((got, time.time()))

    for i in range(KEYS):  # connect, and subscribe each slot's channel, before the clock
        async with lock.hold(f"k{i}"):
            pass
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    began = time.time()
    await asyncio.gather(*(one(f"k{i}") for i in range(KEYS) for _ in range(TASKS_PER_KEY)))
    ended = time.time()
    await lock.aclose()
    return {"grants": len(spans), "began": began, "ended": ended}


def _many_main(args: tuple[str, bool, str, float], out: Any) -> None:
    out.put(asyncio.run(_many_keys(*args)))


def many_keys(url: str, cluster: bool) -> float:
    """Grants per second of 4 processes over 100 contended keys."""
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 3.0
    procs = [
        context.Process(target=_many_main, args=((url, cluster, ns, start_at), out))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    grants = sum(r["grants"] for r in results)
    return grants / (max(r["ended"] for r in results) - min(r["began"] for r in results))


def cluster_rows(reps: int) -> None:
    cluster = RedisClusterProcesses(first_port=7180).start()
    (port,) = _free_ports(1, 7190)
    single = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        one_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while (
            subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True).stdout
            != b"PONG\n"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        one = statistics.median(many_keys(one_url, False) for _ in range(reps))
        three = statistics.median(many_keys(cluster.url, True) for _ in range(reps))
    finally:
        single.kill()
        single.wait()
        cluster.stop()
    print(
        f"\n4 processes x {KEYS} keys x {TASKS_PER_KEY} tasks x {HOLDS} holds (medians of {reps}):"
    )
    print("| deployment | grants/s |")
    print("|---|---|")
    print(f"| one redis-server | {one:.0f} |")
    print(f"| 3-master cluster | {three:.0f} |")
    print(f"cluster: {three / one:.2f}x one node")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="also cluster vs one node")
    options = parser.parse_args()
    rows: dict[tuple[str, str], dict[str, float]] = {}
    floors: dict[int, list[dict[str, float]]] = {1: [], 4: []}
    fractions: dict[int, list[float]] = {1: [], 4: []}
    for processes, workload, run in (
        (1, "1 process x 100 tasks", one_process),
        (4, "4 processes x 25", four_processes),
    ):
        for design in ("redis-py Lock", "keyedlock"):
            reps = []
            for _ in range(options.reps):
                if design == "keyedlock":  # the floor right before, under the same load
                    floors[processes].append(evalsha_floor(options.url, processes))
                reps.append(run("redispy" if design == "redis-py Lock" else design, options.url))
                if design == "keyedlock":
                    per_loop = floors[processes][-1]["per_loop"]
                    fractions[processes].append(reps[-1]["handoffs"] / per_loop)
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
    print("\nthe floor: bare EVALSHA round trips/s (one in flight per process), each measured")
    print("right before a keyedlock run; fraction = that run's hand-offs/s / one loop's rate")
    print("| processes | per loop | total | keyedlock hand-offs/s | fraction of one loop |")
    print("|---|---|---|---|---|")
    for processes, workload in ((1, "1 process x 100 tasks"), (4, "4 processes x 25")):
        per_loop = statistics.median(f["per_loop"] for f in floors[processes])
        total = statistics.median(f["total"] for f in floors[processes])
        ours = rows[(workload, "keyedlock")]["handoffs"]
        fraction = statistics.median(fractions[processes])
        print(f"| {processes} | {per_loop:.0f} | {total:.0f} | {ours:.0f} | {fraction:.2f} |")
    if options.cluster:
        cluster_rows(options.reps)


if __name__ == "__main__":
    main()
