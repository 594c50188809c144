"""`MemoryStore`: completed responses in this process's memory, bounded in count and bytes."""

from __future__ import annotations

from collections import OrderedDict
from time import monotonic

from ._base import StoredResponse

__all__ = ["MemoryStore"]


class MemoryStore:
    """Entries expire after their ttl; beyond `max_entries` or `max_bytes` the oldest go first.

    One process only: with several workers use `RedisStore` or `PostgresStore`. An entry evicted
    early means a retry of it runs again, so size the bounds for `ttl` worth of keys.
    Plain data, no I/O: works on asyncio and trio.
    """

    def __init__(self, *, max_entries: int = 10_000, max_bytes: int = 64 << 20) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes the entries kept right now cost (bodies and headers)."""
        return self._bytes

    def __repr__(self) -> str:
        return f"<MemoryStore entries={len(self)} max_entries={self.max_entries}>"

    async def get(self, key: str) -> StoredResponse | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, response = found
        if expires <= monotonic():
            self._drop(key)
            return None
        return response

    async def put(self, key: str, response: StoredResponse, ttl: float) -> None:
        now = monotonic()
        found = self._entries.get(key)
        if found is not None:
            if found[0] > now:
                return  # keep the first
            self._drop(key)
        self._entries[key] = (now + ttl, response)
        self._bytes += response.size
        self._evict(now)

    async def aclose(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        _, response = self._entries.pop(key)
        self._bytes -= response.size

    def _evict(self, now: float) -> None:
        """Expired entries at the front, then the oldest while over a bound (the newest always
        stays): amortised O(1)."""
        entries = self._entries
        while len(entries) > 1:
            key, (expires, _) = next(iter(entries.items()))
            over = len(entries) > self.max_entries or self._bytes > self.max_bytes
            if not over and expires > now:
                return
            self._drop(key)
