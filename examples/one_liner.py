"""The seed's one-liner: `await mutex(key, fn, on_error="stop")`.

`mutex` runs `fn` under `key` on a lock shared by the whole process (one per event loop), like
async-mutex-lite's `mutex(key, fn, {onError})`. With `on_error="stop"`, when a call fails, every
call already queued on that key gets `LockAborted` (it never runs) instead of silently returning
None as the seed does; calls that arrive afterwards run normally.

    python examples/one_liner.py
"""

from __future__ import annotations

import anyio

from keyedlock_asgi import LockAborted, mutex


class PaymentProvider:
    """Charges a card. Attempt 1 is declined, once the demo has queued attempts 2 and 3."""

    def __init__(self) -> None:
        self.charged: list[int] = []
        self.holding = anyio.Event()  # attempt 1 is inside, holding the key
        self.decline = anyio.Event()  # the demo lets attempt 1 fail

    async def charge(self, attempt: int) -> str:
        if attempt == 1:
            self.holding.set()
            await self.decline.wait()
            raise RuntimeError("card declined")
        await anyio.sleep(0.01)
        self.charged.append(attempt)
        return f"charged on attempt {attempt}"


async def checkout(provider: PaymentProvider, attempt: int) -> str:
    # --8<-- [start:one_liner]
    try:
        return await mutex("user:alice", provider.charge, attempt, on_error="stop")
    except LockAborted as aborted:  # queued behind a call that failed: never ran
        return f"aborted ({aborted.__cause__})"
    except RuntimeError as error:  # this call ran and failed
        return f"failed ({error})"
    # --8<-- [end:one_liner]


async def main() -> dict[int, str]:
    provider = PaymentProvider()
    outcome: dict[int, str] = {}

    async def attempt(n: int, started: anyio.Event | None = None) -> None:
        if started is not None:
            started.set()  # main runs again only once this task sits in the key's queue
        outcome[n] = await checkout(provider, n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, 1)
        await provider.holding.wait()
        for n in (2, 3):
            queued = anyio.Event()
            tg.start_soon(attempt, n, queued)
            await queued.wait()
        provider.decline.set()
    await attempt(4)  # arrives after the failure: runs normally
    for n in sorted(outcome):
        print(f"attempt {n}: {outcome[n]}")
    return outcome


if __name__ == "__main__":
    anyio.run(main)
