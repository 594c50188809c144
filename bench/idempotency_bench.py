"""What IdempotencyMiddleware costs a hello-world Starlette POST: first run vs replay.

In-process, one request at a time, the ASGI app called directly (no network but Redis's).
Each round times every variant once, in a shuffled order, on scopes built before the clock
starts; the table gives the median wall-clock µs per request over the rounds and the median of
the per-round ratios to the bare app (no middleware) measured in the same round.

- first run: a new key per request: the store is read, the key locked, read again, the app
  runs, its response is stored, the key released.
- replay: a key already completed: one store read, the stored response sent; the app and the
  lock are not touched.

Variants: MemoryStore with an in-process lock; RedisStore with a RedisBackend lock (the
several-workers setup; Redis on 127.0.0.1:6379, skipped if it does not answer).

    PYTHONPATH=. python bench/idempotency_bench.py [--rounds 30 --per-round 200]

Target: a replay costs less than a first run (for the hello-world endpoint, the cheapest app).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from keyedlock_asgi import IdempotencyMiddleware, KeyedLock
from keyedlock_asgi.stores import MemoryStore

REDIS_URL = "redis://127.0.0.1:6379/0"


async def hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


bare = Starlette(routes=[Route("/", hello, methods=["POST"])])

BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "client": ("127.0.0.1", 1234),
    "server": ("127.0.0.1", 8000),
}
COMMON_HEADERS = [(b"host", b"bench"), (b"content-type", b"application/json")]
BODY = b'{"amount": 10}'


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


def scope_with(key: bytes | None) -> dict[str, Any]:
    headers = list(COMMON_HEADERS)
    if key is not None:
        headers.append((b"idempotency-key", key))
    return {**BASE_SCOPE, "headers": headers}


class Variant:
    def __init__(self, app: Any, make_key: Callable[[], bytes | None]) -> None:
        self.app = app
        self.make_key = make_key


def variants(redis: bool) -> dict[str, Variant]:
    fresh = itertools.count()
    run = uuid.uuid4().hex[:8].encode()
    memory = IdempotencyMiddleware(
        bare, store=MemoryStore(max_entries=10_000_000), lock=KeyedLock()
    )
    found = {
        "bare (no middleware)": Variant(bare, lambda: None),
        "memory: first run": Variant(memory, lambda: b"m-%s-%d" % (run, next(fresh))),
        "memory: replay": Variant(memory, lambda: b"m-replayed"),
    }
    if redis:
        from keyedlock_asgi.backends.redis import RedisBackend
        from keyedlock_asgi.stores import RedisStore

        namespace = f"bench-idem-{run.decode()}"
        on_redis = IdempotencyMiddleware(
            bare,
            store=RedisStore.from_url(REDIS_URL, namespace=namespace),
            lock=KeyedLock(backend=RedisBackend.from_url(REDIS_URL, namespace=namespace)),
            ttl=600,  # the bench's keys expire by themselves
        )
        found["redis: first run"] = Variant(on_redis, lambda: b"r-%s-%d" % (run, next(fresh)))
        found["redis: replay"] = Variant(on_redis, lambda: b"r-replayed")
    return found


def redis_answers() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), 0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def measure(rounds: int, per_round: int, redis: bool) -> dict[str, tuple[float, float]]:
    found = variants(redis)
    for variant in found.values():  # warm up; completes the replayed keys
        for _ in range(50):
            await variant.app(scope_with(variant.make_key()), receive, send)
    times: dict[str, list[float]] = {name: [] for name in found}
    ratios: dict[str, list[float]] = {name: [] for name in found}
    order = list(found)
    clock = time.perf_counter
    for _ in range(rounds):
        random.shuffle(order)
        this_round: dict[str, float] = {}
        for name in order:
            variant = found[name]
            scopes = [scope_with(variant.make_key()) for _ in range(per_round)]
            start = clock()
            for scope in scopes:
                await variant.app(scope, receive, send)
            this_round[name] = (clock() - start) / per_round
        for name, value in this_round.items():
            times[name].append(value)
            ratios[name].append(value / this_round["bare (no middleware)"])
    for variant in found.values():
        if isinstance(variant.app, IdempotencyMiddleware):
            await variant.app.store.aclose()
            await variant.app.lock.aclose()
    return {
        name: (statistics.median(times[name]), statistics.median(ratios[name])) for name in found
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    redis = redis_answers()
    results = asyncio.run(measure(args.rounds, args.per_round, redis))
    print(f"Python {platform.python_version()}, {args.rounds} rounds x {args.per_round} requests")
    print(f"{'variant':24} {'µs/request':>11} {'x bare':>8}")
    for name, (seconds, ratio) in results.items():
        print(f"{name:24} {seconds * 1e6:11.1f} {ratio:8.2f}")
    if not redis:
        print("(Redis on 127.0.0.1:6379 did not answer: Redis rows skipped)")
    for engine in ("memory", "redis"):
        if f"{engine}: replay" in results:
            first, replay = results[f"{engine}: first run"][0], results[f"{engine}: replay"][0]
            verdict = "OK" if replay < first else "NOT MET"
            print(f"{engine}: replay / first run = {replay / first:.2f} ({verdict})")


if __name__ == "__main__":
    main()
