"""KeyedLock and its peers in CPU instructions per operation (valgrind callgrind).

The workloads of `lock_bench.py` (a) and (b), counted instead of timed: instruction counts do
not move with machine load. Each implementation runs twice under callgrind, with 0 and with N
operations after the same warm-up; the difference divided by N is the cost of one operation.

    PYTHONPATH=. python bench/lock_instructions.py [-n 20000]    # needs valgrind on PATH

Instructions are not time: a system call counts as one instruction here (Python <= 3.11 asks
the kernel for the process id whenever asyncio is asked for the running loop), so the
CPU-time ratios of `lock_bench.py` stay the measure; this shows where instructions go.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys

from bench import lock_bench as bench


async def serve(name: str, workload: str, count: int) -> None:
    make = bench.IMPLEMENTATIONS[name]
    run = bench.uncontended if workload == "a" else bench.contended
    args = (100,) if workload == "b" else ()
    await run(make(), 1000, *args)  # the same warm-up for every run
    if count:
        await run(make(), count, *args)


def instructions(name: str, workload: str, count: int) -> int:
    valgrind = shutil.which("valgrind")
    assert valgrind is not None
    command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--serve", name, workload, str(count)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stderr
    found = re.search(r"Collected : (\d+)", out)
    assert found is not None, out
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--ops", type=int, default=20_000)
    parser.add_argument("--serve", nargs=3, metavar=("NAME", "WORKLOAD", "COUNT"))
    args = parser.parse_args()
    if args.serve:
        name, workload, count = args.serve
        asyncio.run(serve(name, workload, int(count)))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found (apt-get install -y valgrind)")
    n = args.ops
    print(f"python {sys.version.split()[0]}, asyncio, {n} operations, instructions per operation")
    print(f"{'implementation':<24}{'(a) distinct keys':>20}{'(b) one key x 100':>20}")
    for name in bench.IMPLEMENTATIONS:
        a = (instructions(name, "a", n) - instructions(name, "a", 0)) / n
        b = (instructions(name, "b", n) - instructions(name, "b", 0)) / n
        print(f"{name:<24}{a:>20,.0f}{b:>20,.0f}")


if __name__ == "__main__":
    main()
