"""The one asyncpg internal the PostgreSQL backend relies on, kept here on its own.

asyncpg's public simple-protocol calls either drop the rows (`execute`) or wrap a single query
in `COPY (...) TO STDOUT` (`copy_from_query`). Opening a transaction and taking a lock in it
through them costs two round trips; `Connection._copy_out` sends a script as written, so
`BEGIN; ...; COPY (...) TO STDOUT` costs one (asyncpg >= 0.30 passes over the statements
before the COPY and returns its rows).
"""

from __future__ import annotations

from typing import Any

__all__ = ["copy_out_script"]


async def copy_out_script(conn: Any, script: str) -> bytes:
    """Run a simple-protocol `script` whose last statement is `COPY ... TO STDOUT`; its output."""
    out = bytearray()

    async def sink(chunk: bytes) -> None:
        out.extend(chunk)

    await conn._copy_out(script, sink, None)
    return bytes(out)
