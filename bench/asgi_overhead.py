"""What KeyedLockMiddleware costs a Starlette app: in-process and under uvicorn + wrk.

In-process: the ASGI app is called directly (no network), one request at a time; variants run
in interleaved rounds and the median time per request of each is compared with the bare app
measured in the same run. Under uvicorn: one server per variant on 127.0.0.1, `wrk` against
each in turn for several rounds; median requests/s compared with the bare app's.

    PYTHONPATH=. python bench/asgi_overhead.py                  # both
    PYTHONPATH=. python bench/asgi_overhead.py --skip-uvicorn   # in-process only

Targets: pass-through <= 1.03x bare, distinct keys <= 1.10x bare (in-process time ratio).
BaseHTTPMiddleware appears here only as the comparison row.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
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


def make_app(middleware: list[Middleware]) -> Starlette:
    return Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])], middleware=middleware)


bare = make_app([])
locked = make_app([Middleware(KeyedLockMiddleware, lock=KeyedLock(), key=keys.header("x-key"))])
basehttp = make_app([Middleware(NoopBaseHTTP)])

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


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


def headers_for(variant: str, counter: itertools.count[int]) -> Callable[[], list[Any]]:
    common = [(b"host", b"bench"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if variant == "distinct keys":
        return lambda: [*common, (b"x-key", b"user:%d" % next(counter))]
    return lambda: list(common)


VARIANTS: dict[str, Any] = {
    "bare": bare,
    "pass-through (no key)": locked,
    "distinct keys": locked,
    "BaseHTTPMiddleware no-op": basehttp,
}


async def in_process(rounds: int, per_round: int) -> dict[str, float]:
    counter = itertools.count()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    makers = {name: headers_for(name, counter) for name in VARIANTS}
    for name, app in VARIANTS.items():  # warm up
        for _ in range(200):
            await app({**BASE_SCOPE, "headers": makers[name]()}, receive, send)
    order = list(VARIANTS)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            app, make_headers = VARIANTS[name], makers[name]
            start = time.perf_counter()
            for _ in range(per_round):
                await app({**BASE_SCOPE, "headers": make_headers()}, receive, send)
            samples[name].append((time.perf_counter() - start) / per_round)
    return {name: statistics.median(found) for name, found in samples.items()}


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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--skip-uvicorn", action="store_true")
    parser.add_argument("--wrk-rounds", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--wrk-connections", type=int, default=32)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}")
    medians = anyio.run(in_process, args.rounds, args.per_round)
    base = medians["bare"]
    print(f"\nin-process, {args.rounds} interleaved rounds x {args.per_round} requests")
    print(f"{'variant':<28}{'us/request':>12}{'x bare':>9}")
    for name, value in medians.items():
        print(f"{name:<28}{value * 1e6:>12.2f}{value / base:>9.3f}")
    if args.skip_uvicorn:
        return
    served = under_uvicorn(args.wrk_rounds, args.wrk_seconds, args.wrk_connections)
    if served is None:
        return
    print(
        f"\nuvicorn + wrk -t1 -c{args.wrk_connections} -d{args.wrk_seconds}s, "
        f"median of {args.wrk_rounds} interleaved rounds"
    )
    print(f"{'variant':<28}{'req/s':>10}{'/ bare':>9}")
    for name, value in served.items():
        print(f"{name:<28}{value:>10.0f}{value / served['bare']:>9.3f}")


if __name__ == "__main__":
    main()
