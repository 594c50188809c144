"""Cache stampede: 100 concurrent misses for one key make exactly one database call.

`lock.coalesce` is single flight: the first caller that misses the cache runs the load; the 99
others that miss while it runs do not run it, they get its result (or its exception) when it
ends. Other keys load in parallel. If the first caller is cancelled, a waiting caller runs the
load anew instead of seeing the cancellation.

    python examples/cache_stampede.py
"""

from __future__ import annotations

import anyio

from keyedlock_asgi import KeyedLock


class Database:
    """A slow database that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def load_product(self, product_id: str) -> dict[str, str]:
        self.calls += 1
        await anyio.sleep(0.05)  # a slow query
        return {"id": product_id, "name": f"Product {product_id}"}


# --8<-- [start:cache]
class ProductCache:
    """Read-through cache: on a miss, one caller per key loads; the others share its result."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.values: dict[str, dict[str, str]] = {}
        self.lock = KeyedLock(key_prefix="product-cache:")

    async def get(self, product_id: str) -> dict[str, str]:
        cached = self.values.get(product_id)
        if cached is not None:
            return cached  # the hot path takes no lock
        return await self.lock.coalesce(product_id, self._load, product_id)

    async def _load(self, product_id: str) -> dict[str, str]:
        value = self.values[product_id] = await self.db.load_product(product_id)
        return value


# --8<-- [end:cache]


async def stampede(cache: ProductCache, product_id: str, callers: int) -> list[dict[str, str]]:
    """`callers` concurrent reads of one product on a cold cache."""
    results: list[dict[str, str]] = []

    async def read() -> None:
        results.append(await cache.get(product_id))

    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(read)
    return results


async def main() -> int:
    db = Database()
    cache = ProductCache(db)
    results = await stampede(cache, "42", callers=100)
    print(f"100 concurrent misses for product 42 -> {db.calls} database call(s)")
    print(f"every caller got the same value: {all(r == results[0] for r in results)}")
    return 0 if db.calls == 1 and len(results) == 100 else 1


if __name__ == "__main__":
    raise SystemExit(anyio.run(main))
