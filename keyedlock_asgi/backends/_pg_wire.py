"""The one asyncpg internal the PostgreSQL backend relies on, kept here on its own.

asyncpg's public simple-protocol calls either drop the rows (`execute`) or wrap a single query
in `COPY (...) TO STDOUT` (`copy_from_query`). Opening a transaction and taking a lock in it
through them costs two round trips; `Connection._copy_out` sends a script as written, so
`BEGIN; ...; COPY (...) TO STDOUT` costs one (asyncpg >= 0.30 passes over the statements
before the COPY and returns its rows). Measured through pgbouncer (docs/postgres.md): the
backend's hand-offs/s rose from 0.61x to 0.78x a raw asyncpg loop on 3.11, 0.67x to 0.81x on
3.13. Where asyncpg lacks it, the public calls run instead (`tests/test_backends_postgres.py`
forces that fallback).
"""

from __future__ import annotations

from typing import Any

__all__ = ["copy_out"]

_SCRIPT_OUT = "_copy_out"
"""The asyncpg `Connection` method that runs a script ending in a COPY (private)."""


async def copy_out(conn: Any, statements: str, query: str) -> bytes:
    """Run `statements`, then `COPY (query) TO STDOUT`, in one round trip where asyncpg allows
    it: the COPY's output."""
    out = bytearray()

    async def sink(chunk: bytes) -> None:
        out.extend(chunk)

    script_out = getattr(conn, _SCRIPT_OUT, None)
    if script_out is None:  # the public way: two round trips
        await conn.execute(statements)
        await conn.copy_from_query(query, output=sink)
    else:
        await script_out(f"{statements}COPY ({query}) TO STDOUT", sink, None)
    return bytes(out)
