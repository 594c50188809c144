"""What KeyedLockMiddleware costs a Starlette app: in-process and under uvicorn + wrk.

In-process (the figure the targets are about): the ASGI app is called directly, no network,
one request at a time. Time is this process's CPU time (`time.process_time`): the run is one
thread doing only this work, so the figures hold up when other processes load the machine.
Many short rounds each time every variant once, in a shuffled order, on scopes built before
the clock starts; each variant's cost per request is compared with the bare app's in the same
round, and the table gives the median (and quartiles) of those per-round ratios.

Under uvicorn: one server per variant on 127.0.0.1, `wrk` against each in turn for several
rounds; median requests/s compared with the bare app's. Wall-clock and end to end (server,
HTTP parsing, wrk on the same cores): it is sensitive to machine load, read it as a sanity
check, not as the target.

    PYTHONPATH=. python bench/asgi_overhead.py                  # both
    PYTHONPATH=. python bench/asgi_overhead.py --skip-uvicorn   # in-process only

Targets (in-process ratios): a distinct-key request <= 1.0x the practical floor (the simplest
keyed middleware one could write: a header scan, a refcounted dict of asyncio.Lock, `async with`
around the app; no FIFO, no disconnect handling, no limits), and a request without a key
<= 1.02x a no-op pure-ASGI layer. BaseHTTPMiddleware appears here only as a comparison row.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys


async def endpoint(request: Request) -> Response:
    return PlainTextResponse("ok")


class NoopBaseHTTP(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


class NoopASGI:
    """The cheapest pure-ASGI layer: what a pass-through request is compared with."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class ToyKeyedMiddleware:
    """The practical floor: a keyed middleware with none of the guarantees (no FIFO hand-off,
    no disconnect watching, no timeout, queue bound, key validation or fencing)."""

    def __init__(self, app: Any, header: bytes = b"x-key") -> None:
        self.app = app
        self.header = header
        self.locks: dict[str, list[Any]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == self.header:
                    key = value.decode("latin-1")
                    entry = self.locks.get(key)
                    if entry is None:
                        entry = self.locks[key] = [asyncio.Lock(), 0]
                    entry[1] += 1
                    try:
                        async with entry[0]:
                            await self.app(scope, receive, send)
                    finally:
                        entry[1] -= 1
                        if not entry[1]:
                            del self.locks[key]
                    return
        await self.app(scope, receive, send)


def make_app(middleware: list[Middleware]) -> Starlette:
    return Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])], middleware=middleware)


bare = make_app([])
locked = make_app([Middleware(KeyedLockMiddleware, lock=KeyedLock(), key=keys.header("x-key"))])
basehttp = make_app([Middleware(NoopBaseHTTP)])
noop = make_app([Middleware(NoopASGI)])
toy = make_app([Middleware(ToyKeyedMiddleware)])

# -- in-process -----------------------------------------------------------------------------

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
COMMON_HEADERS = [(b"host", b"bench"), (b"user-agent", b"bench"), (b"accept", b"*/*")]


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


def scopes_for(variant: str, count: int, counter: itertools.count[int]) -> list[dict[str, Any]]:
    """Fresh scopes for one round, built before the clock starts (the apps mutate them)."""
    if variant in ("distinct keys", "floor: toy keyed middleware"):
        return [
            {**BASE_SCOPE, "headers": [*COMMON_HEADERS, (b"x-key", b"user:%d" % next(counter))]}
            for _ in range(count)
        ]
    return [{**BASE_SCOPE, "headers": list(COMMON_HEADERS)} for _ in range(count)]


VARIANTS: dict[str, Any] = {
    "bare": bare,
    "no-op pure-ASGI layer": noop,
    "pass-through (no key)": locked,
    "floor: toy keyed middleware": toy,
    "distinct keys": locked,
    "BaseHTTPMiddleware no-op": basehttp,
}
# Each target row and the row it is measured against.
TARGETS = {
    "pass-through (no key)": ("no-op pure-ASGI layer", 1.02),
    "distinct keys": ("floor: toy keyed middleware", 1.0),
}
# BaseHTTPMiddleware is ~15x slower than the rest: fewer requests per round keep the run short.
SHARE = {"BaseHTTPMiddleware no-op": 0.1}


async def in_process(rounds: int, per_round: int) -> dict[str, tuple[float, float, float, float]]:
    """Per variant: median CPU seconds per request, then the median and quartiles of its
    per-round ratio to the bare app (each round times every variant, in a shuffled order)."""
    counter = itertools.count()
    counts = {name: max(1, int(per_round * SHARE.get(name, 1.0))) for name in VARIANTS}
    for name, app in VARIANTS.items():  # warm up
        for scope in scopes_for(name, 500, counter):
            await app(scope, receive, send)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    versus: dict[str, list[float]] = {name: [] for name in TARGETS}
    order = list(VARIANTS)
    clock = time.process_time
    for _ in range(rounds):
        random.shuffle(order)
        this_round: dict[str, float] = {}
        for name in order:
            app = VARIANTS[name]
            scopes = scopes_for(name, counts[name], counter)
            start = clock()
            for scope in scopes:
                await app(scope, receive, send)
            this_round[name] = (clock() - start) / counts[name]
            del scopes
        for name, value in this_round.items():
            times[name].append(value)
            ratios[name].append(value / this_round["bare"])
            if name in TARGETS:
                versus[name].append(value / this_round[TARGETS[name][0]])
    result: dict[str, tuple[float, float, float, float]] = {}
    for name in VARIANTS:
        q1, median, q3 = statistics.quantiles(ratios[name], n=4)
        result[name] = (statistics.median(times[name]), median, q1, q3)
    for name, (baseline, target) in TARGETS.items():
        q1, median, q3 = statistics.quantiles(versus[name], n=4)
        verdict = "ok" if median <= target else "MISSED"
        print(
            f"target: {name} {median:.3f}x {baseline} (quartiles {q1:.3f}-{q3:.3f}; "
            f"target <= {target:.2f}x) {verdict}"
        )
    return result


# -- uvicorn + wrk --------------------------------------------------------------------------

DISTINCT_LUA = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/", {["X-Key"] = "user:" .. counter})
end
"""

SERVED = {
    "bare": ("bench.asgi_overhead:bare", None),
    "pass-through (no key)": ("bench.asgi_overhead:locked", None),
    "distinct keys": ("bench.asgi_overhead:locked", "distinct"),
    "BaseHTTPMiddleware no-op": ("bench.asgi_overhead:basehttp", None),
}


def under_uvicorn(rounds: int, seconds: int, connections: int) -> dict[str, float] | None:
    from tests.support.server import uvicorn_server

    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found (apt-get install -y wrk): skipping the uvicorn run")
        return None
    results: dict[str, list[float]] = {name: [] for name in SERVED}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "distinct.lua")
        with open(script, "w") as handle:
            handle.write(DISTINCT_LUA)
        urls = {
            target: stack.enter_context(uvicorn_server(target))
            for target in {target for target, _ in SERVED.values()}
        }
        order = list(SERVED)
        for _ in range(rounds):
            random.shuffle(order)
            for name in order:
                target, mode = SERVED[name]
                cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", urls[target] + "/"]
                if mode == "distinct":
                    cmd[1:1] = ["-s", script]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                found = re.search(r"Requests/sec:\s+([\d.]+)", out)
                assert found is not None, out
                if "Non-2xx" in out:
                    raise RuntimeError(f"{name}: non-2xx answers\n{out}")
                results[name].append(float(found.group(1)))
    return {name: statistics.median(found) for name, found in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--skip-uvicorn", action="store_true")
    parser.add_argument("--wrk-rounds", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--wrk-connections", type=int, default=32)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {args.backend}")
    found = anyio.run(in_process, args.rounds, args.per_round, backend=args.backend)
    print(
        f"\nin-process, CPU time, {args.rounds} interleaved rounds x {args.per_round} requests "
        f"(BaseHTTPMiddleware: x{SHARE['BaseHTTPMiddleware no-op']})"
    )
    print(f"{'variant':<28}{'us/request':>12}{'x bare':>9}{'quartiles':>16}")
    for name, (per_request, ratio, q1, q3) in found.items():
        print(f"{name:<28}{per_request * 1e6:>12.2f}{ratio:>9.3f}{q1:>8.3f}-{q3:.3f}")
    if args.skip_uvicorn:
        return
    served = under_uvicorn(args.wrk_rounds, args.wrk_seconds, args.wrk_connections)
    if served is None:
        return
    print(
        f"\nuvicorn + wrk -t1 -c{args.wrk_connections} -d{args.wrk_seconds}s, wall clock "
        f"(load-sensitive), median of {args.wrk_rounds} interleaved rounds"
    )
    print(f"{'variant':<28}{'req/s':>10}{'/ bare':>9}")
    for name, value in served.items():
        print(f"{name:<28}{value:>10.0f}{value / served['bare']:>9.3f}")


if __name__ == "__main__":
    main()
