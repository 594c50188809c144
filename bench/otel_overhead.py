"""What OpenTelemetry metrics cost the lock and the middleware, as ratios in one run.

Variants, all in this process, each on a fresh lock:
- `metrics=False`: no observer (the same code path as a build without the feature);
- `no SDK`: `metrics=True` with only opentelemetry-api (its placeholder providers: nothing is
  attached, so this should match `metrics=False`);
- `SDK`: `metrics=True` with an SDK `MeterProvider` passed to the lock (an in-memory reader,
  never collected during the run).

    PYTHONPATH=. python bench/otel_overhead.py
    PYTHONPATH=. python bench/otel_overhead.py --cycles 100000 --repeat 7

(a) is `lock_bench.py`'s uncontended distinct keys (`async with lock.hold(key)`), (b) is
`asgi_overhead.py`'s distinct keys through `KeyedLockMiddleware`, CPU time per operation.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Callable

import anyio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.middleware import Middleware

from bench import asgi_overhead as asgi
from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

SDK = MeterProvider(metric_readers=[InMemoryMetricReader()])
VARIANTS: dict[str, Callable[[], KeyedLock]] = {
    "metrics=False": lambda: KeyedLock(metrics=False),
    "no SDK (api only)": lambda: KeyedLock(),
    "SDK": lambda: KeyedLock(meter_provider=SDK),
}


async def holds(lock: KeyedLock, cycles: int) -> float:
    """Seconds of CPU per uncontended hold."""
    names = [f"user:{i}" for i in range(cycles)]
    start = time.process_time()
    for key in names:
        async with lock.hold(key):
            pass
    return (time.process_time() - start) / cycles


async def requests(lock: KeyedLock, count: int) -> float:
    """Seconds of CPU per request with a distinct key through the middleware."""
    app = asgi.make_app([Middleware(KeyedLockMiddleware, lock=lock, key=keys.header("x-key"))])
    counter = itertools.count()
    for scope in asgi.scopes_for("distinct keys", 300, counter):  # warm-up
        await app(scope, asgi.receive, asgi.send)
    scopes = asgi.scopes_for("distinct keys", count, counter)
    start = time.process_time()
    for scope in scopes:
        await app(scope, asgi.receive, asgi.send)
    return (time.process_time() - start) / count


async def main(args: argparse.Namespace) -> None:
    per_hold: dict[str, list[float]] = {name: [] for name in VARIANTS}
    per_request: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeat):
        for name, make in VARIANTS.items():
            gc.collect()
            per_hold[name].append(await holds(make(), args.cycles))
            gc.collect()
            per_request[name].append(await requests(make(), args.requests))
    print(
        f"python {sys.version.split()[0]}, {args.cycles} holds, {args.requests} requests, "
        f"median of {args.repeat}; ratios to metrics=False"
    )
    base_a = statistics.median(per_hold["metrics=False"])
    base_b = statistics.median(per_request["metrics=False"])
    header = f"{'variant':<20}{'(a) us/hold':>12}{'ratio':>8}{'(b) us/request':>16}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        a = statistics.median(per_hold[name])
        b = statistics.median(per_request[name])
        print(f"{name:<20}{a * 1e6:>12.2f}{a / base_a:>8.3f}{b * 1e6:>16.2f}{b / base_b:>8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    anyio.run(main, parser.parse_args())
