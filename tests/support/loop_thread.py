"""An asyncio event loop on a thread of its own: a second "process" the test can freeze.

`freeze()` blocks the loop inside one of its callbacks, as a stuck event loop would: nothing
on it runs (no heartbeat, no reading of replies) until the test lets it go. Every wait here is
bounded and fails loudly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

LIMIT = 30.0
"""Seconds any wait on the other loop may take before the test fails."""


class LoopThread:
    """Run coroutines on a private event loop; `close()` stops it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` as a task on the loop; cancel it with the future's `cancel()`."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and await its result from the caller's loop."""
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(coro)), LIMIT)

    @contextmanager
    def freeze(self) -> Iterator[None]:
        """Block the loop for the duration of the block (returns once it is blocked)."""
        blocked, thaw = threading.Event(), threading.Event()

        def block() -> None:
            blocked.set()
            thaw.wait(LIMIT)

        self.loop.call_soon_threadsafe(block)
        if not blocked.wait(LIMIT):
            raise AssertionError("the other event loop never ran the freeze")
        try:
            yield
        finally:
            thaw.set()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(LIMIT)
        self.loop.close()
