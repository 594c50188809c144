"""A first look: same-key work runs one at a time, other keys in parallel.

The examples issue replaces this with the full checkout demo.
"""

from __future__ import annotations

import anyio

from keyedlock_asgi import KeyedLock

lock = KeyedLock()


async def checkout(user: str, order: int, log: list[str]) -> None:
    async with lock.hold(f"user:{user}") as held:
        log.append(f"{user} order {order}: in  (waited {held.waited * 1000:5.1f} ms)")
        await anyio.sleep(0.05)
        log.append(f"{user} order {order}: out")


async def main() -> None:
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        for order in range(3):
            tg.start_soon(checkout, "alice", order, log)
        tg.start_soon(checkout, "bob", 0, log)
    print("\n".join(log))
    print("alice's orders ran one after another; bob's ran beside them.")


if __name__ == "__main__":
    anyio.run(main)
