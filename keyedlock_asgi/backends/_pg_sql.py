"""Key hashing and the SQL the PostgreSQL backend sends: kept apart so each reads on its own."""

from __future__ import annotations

import re
from hashlib import blake2b

__all__ = [
    "check_sequence_name",
    "key_id",
    "ensure_sequence_sql",
    "session_lock_sql",
    "session_try_lock_sql",
    "session_unlock_sql",
    "session_wait_sql",
    "xact_lock_sql",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


def key_id(namespace: str, key: str, part: str = "") -> int:
    """The advisory lock id of `key`: a signed 64-bit integer from BLAKE2b(namespace, key).

    NUL bytes separate the fields, so ("a", "bc") and ("ab", "c") never share an input.
    `part` names a sub-lock of the key (the gate and slots of `max_concurrency > 1`).
    """
    data = b"\0".join((namespace.encode(), key.encode(), part.encode()))
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big", signed=True)


def check_sequence_name(name: str) -> str:
    """A plain (optionally schema-qualified) identifier: it is spliced into SQL text."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"fence_sequence must be a plain identifier like 'schema.name': {name!r}")
    return name


def ensure_sequence_sql(sequence: str) -> str:
    """Create the fence sequence unless it exists: one simple-protocol statement (it may run
    through pgbouncer's transaction pooling) that needs no CREATE right once it exists."""
    return (
        f"DO $$ BEGIN IF to_regclass('{sequence}') IS NULL THEN "
        f"CREATE SEQUENCE IF NOT EXISTS {sequence}; END IF; END $$"
    )


def _suffix(shared: bool) -> str:
    """`pg_advisory_lock_shared` (ShareLock) for a reader, `pg_advisory_lock` (ExclusiveLock)."""
    return "_shared" if shared else ""


def session_lock_sql(sequence: str, *, shared: bool = False) -> str:
    """Wait for the lock ($2) under `lock_timeout` ($1), then draw the fence once granted.

    Nested subqueries with volatile functions are never flattened by the planner, so the
    order is fixed: set the timeout, wait for the lock, and only then `nextval` (a token drawn
    before the grant could be smaller than one drawn by a caller granted earlier).
    """
    return (
        f"SELECT nextval('{sequence}') FROM ("
        f"SELECT pg_advisory_lock{_suffix(shared)}($2) FROM ("
        "SELECT set_config('lock_timeout', $1, false)) AS t) AS l"
    )


def session_wait_sql(*, shared: bool) -> str:
    """Wait for a lock ($2) under `lock_timeout` ($1), without a fence (a gate, a slot)."""
    return (
        f"SELECT 1 FROM (SELECT pg_advisory_lock{_suffix(shared)}($2) FROM "
        "(SELECT set_config('lock_timeout', $1, false)) AS t) AS l"
    )


def session_try_lock_sql(sequence: str, *, shared: bool = False) -> str:
    """Take the lock ($1) only if it is free: the fence, or NULL when taken."""
    return (
        f"SELECT CASE WHEN pg_try_advisory_lock{_suffix(shared)}($1) THEN nextval('{sequence}') END"
    )


def session_unlock_sql(*, shared: bool) -> str:
    """Release every lock id of `$1` (bigint[]) held in one mode: true when all were held."""
    return (
        f"SELECT bool_and(pg_advisory_unlock{_suffix(shared)}(id)) FROM unnest($1::bigint[]) AS id"
    )


def xact_lock_sql(
    sequence: str, lock: int, *, lock_timeout_ms: int, lease_ms: int, wait: bool, shared: bool
) -> tuple[str, str]:
    """Open the lock's transaction, take the transaction lock and return the fence: the
    statements before, and the query whose one row is the fence (or NULL when `wait` is false
    and the key is taken). Sent as one simple-protocol script ending in `COPY (query) TO
    STDOUT` (`_pg_wire`): literals only (no portal, so an idle-in-transaction holder does not
    pin `backend_xmin`; no prepared statement for a transaction pooler to misroute). The fence
    is drawn in a subquery of the lock, so only once the lock is granted.
    """
    sql = f"BEGIN; SET LOCAL lock_timeout = {int(lock_timeout_ms)}; "
    if lease_ms:
        sql += f"SET LOCAL idle_in_transaction_session_timeout = {int(lease_ms)}; "
    mode = _suffix(shared)
    if wait:
        query = (
            f"SELECT nextval('{sequence}') FROM "
            f"(SELECT pg_advisory_xact_lock{mode}({int(lock)})) AS l"
        )
    else:
        query = (
            f"SELECT CASE WHEN pg_try_advisory_xact_lock{mode}({int(lock)}) "
            f"THEN nextval('{sequence}') END"
        )
    return sql, query
