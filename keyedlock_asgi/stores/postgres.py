"""`PostgresStore`: completed responses in a PostgreSQL table, created on first use.

Each write also deletes up to `cleanup_batch` expired rows (one bounded statement, using the
index on `expires_at`), so the table never grows without bound and nobody must run a sweep;
reads ignore expired rows. asyncpg is asyncio-only.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ._base import StoredResponse, decode, encode

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "PostgresStore needs asyncpg: pip install 'keyedlock_asgi[postgres]'"
    ) from exc

__all__ = ["PostgresStore"]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresStore:
    """Rows `(key, entry, expires_at)` in `table`; keys are `<namespace>:<key>`."""

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "keyedlock_idempotency",
        namespace: str = "keyedlock",
        pool_size: int = 4,
        cleanup_batch: int = 100,
        command_timeout: float = 5.0,
        **connect_options: Any,
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError("table must be a lower-case SQL identifier (letters, digits, _)")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty str")
        if pool_size < 1 or cleanup_batch < 1:
            raise ValueError("pool_size and cleanup_batch must be at least 1")
        self.dsn = dsn
        self.table = table
        self.namespace = namespace
        self.pool_size = pool_size
        self.cleanup_batch = cleanup_batch
        self._connect_options = {"command_timeout": command_timeout, **connect_options}
        self._pool: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        self._get_sql = f"SELECT entry FROM {table} WHERE key = $1 AND expires_at > now()"
        self._cleanup_sql = (
            f"DELETE FROM {table} WHERE key IN (SELECT key FROM {table} "
            f"WHERE expires_at <= now() ORDER BY expires_at LIMIT {cleanup_batch} "
            "FOR UPDATE SKIP LOCKED)"
        )
        # Keep the first entry; an expired one (not yet cleaned up) is replaced.
        self._put_sql = (
            f"INSERT INTO {table} AS t (key, entry, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3)) "
            "ON CONFLICT (key) DO UPDATE SET entry = EXCLUDED.entry, "
            "expires_at = EXCLUDED.expires_at WHERE t.expires_at <= now()"
        )

    @classmethod
    def from_dsn(cls, dsn: str, **options: Any) -> PostgresStore:
        """`PostgresStore(dsn, **options)`: the spelling the API promises."""
        return cls(dsn, **options)

    def __repr__(self) -> str:
        return f"<PostgresStore table={self.table!r} namespace={self.namespace!r}>"

    def row_key(self, key: str) -> str:
        return f"{self.namespace}:{key}"

    async def _get_pool(self) -> Any:
        """This event loop's pool, opened (and the table created) on first use."""
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool[0] is not loop:
            self._pool = (loop, loop.create_task(self._open()))
        task = self._pool[1]
        try:
            return await asyncio.shield(task)
        except BaseException:
            if task.done() and self._pool is not None and self._pool[1] is task:
                self._pool = None  # failed: the next call tries again
            raise

    async def _open(self) -> Any:
        pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=self.pool_size, **self._connect_options
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                # Workers starting together: one creates, the others wait and see it exists.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.table)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} ("
                    "key text PRIMARY KEY, entry bytea NOT NULL, expires_at timestamptz NOT NULL)"
                )
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {self.table}_expires_at "
                    f"ON {self.table} (expires_at)"
                )
        except BaseException:
            await pool.close()
            raise
        return pool

    async def get(self, key: str) -> StoredResponse | None:
        pool = await self._get_pool()
        blob = await pool.fetchval(self._get_sql, self.row_key(key))
        return None if blob is None else decode(bytes(blob))

    async def put(self, key: str, response: StoredResponse, ttl: float) -> None:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            await conn.execute(self._cleanup_sql)
            await conn.execute(self._put_sql, self.row_key(key), encode(response), float(ttl))

    async def aclose(self) -> None:
        entry, self._pool = self._pool, None
        if entry is None:
            return
        pool = await entry[1]
        await pool.close()
