"""What `@lock.serialize` costs an uncontended Starlette endpoint, in process.

The ASGI app is called directly, one request at a time, each with its own key (the path every
request takes when its key is free). Time is this process's CPU time. Many short rounds each
time both variants once, in a shuffled order, on scopes built before the clock starts; the
table gives the median (and quartiles) of the per-round ratio of the decorated endpoint to the
bare one, so the ratio holds up when other processes load the machine.

    PYTHONPATH=. python bench/route_overhead.py
    PYTHONPATH=/path/to/other/checkout python bench/route_overhead.py   # compare two trees
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, keys

lock = KeyedLock()


async def plain(request: Request) -> Response:
    return PlainTextResponse("ok")


@lock.serialize(keys.header("x-key"))
async def serialized(request: Request) -> Response:
    return PlainTextResponse("ok")


VARIANTS: dict[str, Any] = {
    "bare": Starlette(routes=[Route("/", plain)]),
    "@lock.serialize, free key": Starlette(routes=[Route("/", serialized)]),
}

BASE_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "client": ("127.0.0.1", 1234),
    "server": ("127.0.0.1", 8000),
}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


def scopes(count: int, counter: itertools.count[int]) -> list[dict[str, Any]]:
    return [
        {**BASE_SCOPE, "headers": [(b"host", b"bench"), (b"x-key", b"u%d" % next(counter))]}
        for _ in range(count)
    ]


async def run(rounds: int, per_round: int) -> None:
    counter = itertools.count()
    for app in VARIANTS.values():  # warm up
        for scope in scopes(500, counter):
            await app(scope, receive, send)
    ratios: list[float] = []
    costs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        order = list(VARIANTS)
        random.shuffle(order)
        this: dict[str, float] = {}
        for name in order:
            app = VARIANTS[name]
            batch = scopes(per_round, counter)
            started = time.process_time()
            for scope in batch:
                await app(scope, receive, send)
            this[name] = (time.process_time() - started) / per_round
            costs[name].append(this[name])
        ratios.append(this["@lock.serialize, free key"] / this["bare"])
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    print(f"Python {sys.version.split()[0]}, anyio backend asyncio, {rounds} x {per_round}")
    for name in VARIANTS:
        print(f"  {name:28} {statistics.median(costs[name]) * 1e6:7.2f} us/request")
    print(f"  ratio serialize/bare: median {median:.3f} (quartiles {q1:.3f}-{q3:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    anyio.run(run, args.rounds, args.per_round)


if __name__ == "__main__":
    main()
