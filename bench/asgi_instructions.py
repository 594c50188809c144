"""What KeyedLockMiddleware costs a Starlette app, in CPU instructions (valgrind callgrind).

The same apps and requests as `asgi_overhead.py`, counted instead of timed: instruction counts
do not move with machine load, so small changes can be compared run to run. Each variant runs
twice under callgrind, with 0 and with N requests after the same warm-up and on the same
prebuilt scopes; the difference divided by N is the cost of one request.

    PYTHONPATH=. python bench/asgi_instructions.py            # needs valgrind on PATH
    PYTHONPATH=. python bench/asgi_instructions.py -n 6000    # more requests, less GC noise

Instructions are not time: the locked path also misses caches and branches somewhat more
often than the bare app, so its CPU-time ratio is a few points above its instruction ratio.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys

import anyio

from bench import asgi_overhead as bench

COUNTED = [
    "bare",
    "no-op pure-ASGI layer",
    "pass-through (no key)",
    "floor: toy keyed middleware",
    "distinct keys",
]


async def serve(variant: str, count: int, total: int) -> None:
    counter = itertools.count()
    for name in COUNTED:  # the same warm-up for every run
        for scope in bench.scopes_for(name, 300, counter):
            await bench.VARIANTS[name](scope, bench.receive, bench.send)
    app = bench.VARIANTS[variant]
    scopes = bench.scopes_for(variant, total, counter)
    for scope in scopes[:count]:
        await app(scope, bench.receive, bench.send)


def instructions(variant: str, count: int, total: int) -> int:
    """Instructions of a whole run of `serve(variant, count, total)` under callgrind."""
    valgrind = shutil.which("valgrind")
    assert valgrind is not None
    command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--serve", variant, str(count), str(total)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stderr
    found = re.search(r"Collected : (\d+)", out)
    assert found is not None, out
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=2000)
    parser.add_argument("--serve", nargs=3, metavar=("VARIANT", "COUNT", "TOTAL"))
    args = parser.parse_args()
    if args.serve:
        variant, count, total = args.serve
        anyio.run(serve, variant, int(count), int(total))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found (apt-get install -y valgrind)")
    n = args.requests
    print(f"python {sys.version.split()[0]}, asyncio, {n} requests, instructions per request")
    per_request = {
        name: (instructions(name, n, n) - instructions(name, 0, n)) / n for name in COUNTED
    }
    bare = per_request["bare"]
    print(f"{'variant':<28}{'instructions':>14}{'x bare':>9}")
    for name, value in per_request.items():
        print(f"{name:<28}{value:>14,.0f}{value / bare:>9.3f}")


if __name__ == "__main__":
    main()
