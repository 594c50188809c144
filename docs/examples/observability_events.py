"""A lock observer that counts outcomes and wait times (docs/observability.md)."""

from __future__ import annotations

from collections import Counter

import anyio

from keyedlock_asgi import KeyedLock, LockBusy, LockEvent


# --8<-- [start:observer]
class Outcomes:
    """Counts what happened, by outcome and mode, and keeps the wait of each queued grant."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.waits: list[float] = []

    def __call__(self, event: LockEvent) -> None:
        if event.kind in ("granted", "rejected"):
            mode = "shared" if event.held.shared else "exclusive"
            self.counts[event.outcome or "", mode] += 1
        if event.kind == "granted" and event.queued:
            self.waits.append(event.waited)


outcomes = Outcomes()
lock = KeyedLock(name="checkout", observers=[outcomes])


async def try_now() -> None:
    try:
        async with lock.hold("user:1", timeout=0):
            pass
    except LockBusy:
        pass


async def main() -> Counter[tuple[str, str]]:
    async with lock.hold("user:1"), anyio.create_task_group() as tg:
        tg.start_soon(try_now)  # another task, while the key is held: busy
    async with lock.hold("user:1", shared=True):
        pass
    return outcomes.counts


# --8<-- [end:observer]

if __name__ == "__main__":
    print(anyio.run(main))
