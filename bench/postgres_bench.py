"""PostgreSQL backend benchmark: hand-offs/s and wait percentiles, plus the head-of-line test.

    PYTHONPATH=. python bench/postgres_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/test]
        [--pgbouncer postgresql://postgres@127.0.0.1:6439/test | --no-pgbouncer]
        [--repeat 3] [--holds 4]

1. One process, 100 tasks on one key, each holding once (burst): hand-offs/s, p50/p99 wait.
   Baseline in the same run: the in-process lock alone (no backend).
2. 4 processes x 25 tasks on one key, each task holding `--holds` times: hand-offs/s over all
   grants, p50/p99 wait, and the client processes' CPU per hand-off. Baseline in the same run:
   a raw asyncpg advisory-lock loop (each task takes a pooled connection, `pg_advisory_lock`,
   `pg_advisory_unlock`; pool of 10 per process). Target: backend >= 1.0x raw. Then the same
   through pgbouncer in transaction pooling: the backend in `mode="transaction"` against a raw
   `BEGIN; pg_advisory_xact_lock` then `COMMIT` loop (two round trips, the floor; its pool
   skips asyncpg's reset query, which transaction locks do not need). Each comparison runs
   `--repeat` times, alternating which side goes first; the ratios' range is printed.
   pgbouncer comes from `--pgbouncer DSN`, or is started for the run
   (tests/support/engine_pgbouncer.py).
3. Head of line: 100 requests queued on key A (each holds 20 ms), one request on key B at 50 ms,
   pool of 4 connections: B's wait. Target: < 10 ms (the design study measured 2,072 ms when
   waiters park on the pool before their key).
Hold time is one `sleep(0)` in 1 and 2, so they measure hand-off overhead, not work.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
import uuid
from typing import Any

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.backends.postgres import PostgresBackend, key_id


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def burst(
    lock: KeyedLock, tasks: int, start_at: float | None = None, holds: int = 1
) -> list[float]:
    """`tasks` tasks take one key `holds` times each; their waits in seconds."""
    waits: list[float] = []

    async def one() -> None:
        for _ in range(holds):
            t = time.perf_counter()
            async with lock.hold("hot"):
                waits.append(time.perf_counter() - t)
                await asyncio.sleep(0)

    async with lock.hold("warm-up"):
        pass
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(*(one() for _ in range(tasks)))
    return waits


def report(name: str, waits: list[float], elapsed: float, cpu: float | None = None) -> float:
    rate = len(waits) / elapsed
    line = (
        f"{name:<42} {rate:6.0f} hand-offs/s   p50 {pct(waits, 0.5) * 1e3:6.2f} ms"
        f"   p99 {pct(waits, 0.99) * 1e3:6.2f} ms"
    )
    if cpu is not None:
        line += f"   client CPU {cpu / len(waits) * 1e6:4.0f} us/hand-off"
    print(line)
    return rate


async def one_process(dsn: str) -> None:
    memory = KeyedLock()
    await burst(memory, 100)  # the first burst of a fresh process pays one-off start-up costs
    t = time.perf_counter()
    waits = await burst(memory, 100)
    base = report("in-process only (baseline)", waits, time.perf_counter() - t)
    lock = KeyedLock(backend=PostgresBackend.from_dsn(dsn, namespace=f"bench-{uuid.uuid4().hex}"))
    t = time.perf_counter()
    waits = await burst(lock, 100)
    rate = report("postgres, 1 process x 100 tasks", waits, time.perf_counter() - t)
    print(f"{'':42} ratio to baseline: {rate / base:.3f}")
    await lock.aclose()


def _worker(
    dsn: str,
    namespace: str,
    mode: str,
    start_at: float,
    holds: int,
    out: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    async def run() -> tuple[list[float], float, float]:
        backend = PostgresBackend.from_dsn(dsn, namespace=namespace, mode=mode)  # type: ignore[arg-type]
        lock = KeyedLock(backend=backend)
        async with lock.hold("warm-up"):  # connected (and imports done) before the CPU clock,
            pass  # as the raw loop's pool is
        cpu = time.process_time()
        waits = await burst(lock, 25, start_at, holds)
        end, cpu = time.time(), time.process_time() - cpu
        await lock.aclose()
        return waits, end, cpu

    out.put(asyncio.run(run()))


def _raw_worker(
    dsn: str,
    namespace: str,
    mode: str,
    start_at: float,
    holds: int,
    out: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    """The loop one would write by hand with asyncpg: no in-process queue, no fence."""
    import asyncpg  # type: ignore[import-untyped]

    lock_id = key_id(namespace, "hot")

    async def no_reset(conn: Any) -> None:
        """A transaction lock ends with its COMMIT: no reset query needed on release."""

    async def run() -> tuple[list[float], float, float]:
        options: dict[str, Any] = {"statement_cache_size": 100}
        if mode == "transaction":
            options = {"statement_cache_size": 0, "reset": no_reset}
        pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10, **options)
        waits: list[float] = []

        async def one() -> None:
            for _ in range(holds):
                t = time.perf_counter()
                async with pool.acquire() as conn:
                    if mode == "transaction":
                        await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({lock_id})")
                        waits.append(time.perf_counter() - t)
                        await asyncio.sleep(0)
                        await conn.execute("COMMIT")
                    else:
                        await conn.fetchval("SELECT pg_advisory_lock($1)", lock_id)
                        waits.append(time.perf_counter() - t)
                        await asyncio.sleep(0)
                        await conn.fetchval("SELECT pg_advisory_unlock($1)", lock_id)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu = time.process_time()
        await asyncio.gather(*(one() for _ in range(25)))
        end, cpu = time.time(), time.process_time() - cpu
        await pool.close()
        return waits, end, cpu

    out.put(asyncio.run(run()))


def four_processes(dsn: str, name: str, mode: str, holds: int, worker: Any = _worker) -> float:
    namespace = f"bench-{uuid.uuid4().hex}"
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 1.5
    procs = [
        multiprocessing.Process(target=worker, args=(dsn, namespace, mode, start_at, holds, out))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    waits = [w for ws, _, _ in results for w in ws]
    cpu = sum(cpu for _, _, cpu in results)
    return report(name, waits, max(end for _, end, _ in results) - start_at, cpu)


def against_raw(dsn: str, where: str, mode: str, repeat: int, holds: int) -> None:
    """The backend and the raw loop, 4 x 25 on one key, `repeat` times interleaved."""
    ratios = []
    for round_ in range(repeat):
        sides = [("raw", _raw_worker, f"raw asyncpg, 4 x 25 ({where})")]
        sides.append(("backend", _worker, f"postgres {mode}, 4 x 25 ({where})"))
        if round_ % 2:
            sides.reverse()
        rates = {
            side: four_processes(dsn, name, mode, holds, worker) for side, worker, name in sides
        }
        ratios.append(rates["backend"] / rates["raw"])
        print(f"{'':42} ratio to raw asyncpg: {ratios[-1]:.2f}x")
    print(
        f"{'':42} {where}: backend / raw {min(ratios):.2f}x to {max(ratios):.2f}x, median "
        f"{statistics.median(ratios):.2f}x, over {repeat} runs (target >= 1.0x)"
    )


async def head_of_line(dsn: str) -> None:
    lock = KeyedLock(
        backend=PostgresBackend.from_dsn(dsn, namespace=f"bench-{uuid.uuid4().hex}", pool_size=4)
    )

    async def warm(n: int) -> None:
        async with lock.hold(f"warm-up:{n}"):
            await asyncio.sleep(0.01)

    # Steady state: the pool's connections are open (opening one costs several ms here).
    await asyncio.gather(*(warm(n) for n in range(4)))

    async def on_a() -> None:
        async with lock.hold("A"):
            await asyncio.sleep(0.02)

    async def on_b() -> float:
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        async with lock.hold("B"):
            return time.perf_counter() - t

    t = time.perf_counter()
    results = await asyncio.gather(*(on_a() for _ in range(100)), on_b())
    drain = time.perf_counter() - t
    b_wait = results[-1]
    assert isinstance(b_wait, float)
    print(
        f"{'head of line (pool 4)':<42} key-A drain {drain:5.2f} s   key-B wait "
        f"{b_wait * 1e3:6.2f} ms (target < 10 ms)"
    )
    await lock.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--pgbouncer", help="DSN through pgbouncer in transaction pooling")
    parser.add_argument("--no-pgbouncer", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per comparison")
    parser.add_argument("--holds", type=int, default=4, help="holds per task in the 4 x 25 runs")
    args = parser.parse_args()
    dsn = args.dsn
    print(f"Python {sys.version.split()[0]}")
    asyncio.run(one_process(dsn))
    against_raw(dsn, "direct", "session", args.repeat, args.holds)
    if not args.no_pgbouncer:
        bouncer = args.pgbouncer
        if bouncer is None:
            from tests.support.engine_pgbouncer import _start

            bouncer, why = _start()
            if bouncer is None:
                print(f"pgbouncer: skipped ({why})")
        if bouncer is not None:
            against_raw(bouncer, "pgbouncer", "transaction", args.repeat, args.holds)
    asyncio.run(head_of_line(dsn))


if __name__ == "__main__":
    main()
