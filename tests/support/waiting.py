"""The suite's one "wait until" helper: a bounded rendezvous on observable state.

Lock state, Redis keys and PostgreSQL rows have no event a test can wait on, so a test polls
them. The poll is a rendezvous, never an assertion about time: the limit only turns a hang into
a loud failure that names what never happened.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")

# A plain condition is first polled once per checkpoint: in-process state moves one scheduling
# round at a time, so those polls see every step of it. Past SPIN_POLLS, and for an async
# condition (its state lives in Redis, PostgreSQL or another process), short sleeps spare the CPU.
SPIN_POLLS = 1000
POLL_INTERVAL = 0.002


async def wait_until(
    condition: Callable[[], T | Awaitable[T]], what: str, *, limit: float = 10.0
) -> T:
    """Poll `condition()` (plain or async) until it is truthy and return its value; raise
    AssertionError naming `what` after `limit` seconds. Works on asyncio and trio."""
    polls = 0
    with anyio.move_on_after(limit):
        while True:
            result = condition()
            remote = inspect.isawaitable(result)  # the state lives in a server: never spin on it
            value = await result if inspect.isawaitable(result) else result
            if value:
                return value
            polls += 1
            if polls < SPIN_POLLS and not remote:
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.sleep(POLL_INTERVAL)
    raise AssertionError(f"never reached within {limit} s: {what}")
