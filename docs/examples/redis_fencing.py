"""Fencing tokens: the protected store refuses a writer whose lease ended.

A holder that pauses longer than its lease (a GC pause, a frozen VM, a hung call) can wake up
and write after another process was given the key. No lock can stop that; the store can, if
every write carries `held.token` and the store keeps the highest token it has seen.
"""

from __future__ import annotations

import anyio
import redis.asyncio as aioredis

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.backends.redis import RedisBackend

# Write `value` only if `token` is newer than any token used on this record before.
FENCED_WRITE = """
local last = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'token', ARGV[2])
return 1
"""


async def fenced_write(store: aioredis.Redis, record: str, value: str, token: int) -> bool:
    """True if the store took the write; False if a newer holder already wrote."""
    return bool(await store.eval(FENCED_WRITE, 1, record, value, str(token)))


async def demo(url: str, namespace: str) -> dict[str, bool]:
    """A paused holder loses its lease to a second process; its late write is refused."""
    store = aioredis.Redis.from_url(url)
    record = f"{namespace}:account:42"
    # Worker A renews its lease for at most 0.6 s; worker B is another process's backend.
    worker_a = KeyedLock(
        backend=RedisBackend.from_url(url, namespace=namespace, lease=0.3, max_hold=0.6)
    )
    worker_b = KeyedLock(backend=RedisBackend.from_url(url, namespace=namespace))
    b_wrote = anyio.Event()
    outcome: dict[str, bool] = {}

    async def second_worker() -> None:
        async with worker_b.hold("account:42") as held:
            outcome["b"] = await fenced_write(store, record, "written by B", held.token)
            b_wrote.set()

    async with anyio.create_task_group() as tg, worker_a.hold("account:42") as held:
        tg.start_soon(second_worker)
        await b_wrote.wait()  # A "pauses" past its lease; B gets the key and writes
        outcome["a"] = await fenced_write(store, record, "written by A", held.token)
    outcome["kept_b"] = (await store.hget(record, "value")) == b"written by B"
    await store.delete(record)
    await worker_a.aclose()
    await worker_b.aclose()
    await store.aclose()
    return outcome


if __name__ == "__main__":
    print(anyio.run(demo, "redis://127.0.0.1:6379/0", "fencing-demo"))  # A refused, B kept
