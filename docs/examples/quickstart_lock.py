"""Quickstart: the lock in five lines (docs/index.md)."""

# --8<-- [start:lock]
import anyio

from keyedlock_asgi import KeyedLock

lock = KeyedLock()
balances = {"alice": 100}


async def pay(user: str, amount: int) -> None:
    async with lock.hold(f"user:{user}"):  # same user: one at a time, in arrival order
        balance = balances[user]
        await anyio.sleep(0.01)  # talk to the payment provider
        balances[user] = balance - amount


# --8<-- [end:lock]


async def main() -> int:
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(pay, "alice", 10)
    print(f"alice's balance after ten payments of 10: {balances['alice']}")
    return balances["alice"]


if __name__ == "__main__":
    anyio.run(main)
