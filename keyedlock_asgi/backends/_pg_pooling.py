"""Telling, at start-up, whether a connection is one server session or a transaction pooler.

Session locks need every statement of a connection to run in one server session. pgbouncer in
`pool_mode=transaction` gives each transaction whichever server session is idle, so a lock and
its unlock can land on two sessions. pgbouncer answers `SHOW` only on its admin database and
passes the server's parameters through, so the probe looks at what only pooling can do: hand the
probe connection's server session to another client while the probe connection is idle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["TransactionPoolingError", "served_per_transaction"]

PINS = 2
"""Other connections the probe opens (each held inside a transaction while it looks)."""


class TransactionPoolingError(RuntimeError):
    """`mode="session"` runs behind a transaction-pooling proxy, where its locks would strand.

    Raised by every `acquire` of the backend once its start-up probe found the pooler: a
    configuration error, not an outage (no `Retry-After`, never served "open").
    """


async def backend_pid(conn: Any) -> int:
    """The server session's pid, over the simple protocol (no prepared statement, which a
    transaction pooler could run on another session than the one that prepared it)."""
    out = bytearray()

    async def sink(chunk: bytes) -> None:
        out.extend(chunk)

    await conn.copy_from_query("SELECT pg_backend_pid()", output=sink)
    return int(bytes(out).strip())


async def served_per_transaction(conn: Any, connect: Callable[[], Awaitable[Any]]) -> bool:
    """True when `conn`'s transactions may run on different server sessions.

    With a direct connection (or session pooling) no other client ever gets `conn`'s session,
    and `conn` keeps its pid: the probe cannot answer True there. Behind a transaction pooler,
    another client that opens a transaction while `conn` is idle takes an idle server session,
    by default the most recently used one (pgbouncer reuses them LIFO), which is `conn`'s; or,
    if it took another one, `conn`'s next statement may move.
    """
    mine = await backend_pid(conn)
    others: list[Any] = []
    try:
        for _ in range(PINS):
            other = await connect()
            others.append(other)
            await other.execute("BEGIN")
            if await backend_pid(other) == mine or await backend_pid(conn) != mine:
                return True
        return False
    finally:
        for other in others:
            other.terminate()
