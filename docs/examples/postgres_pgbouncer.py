"""PostgreSQL backend behind pgbouncer in transaction pooling, and shared holds on the backend.

`main()` takes a key through pgbouncer in transaction mode, shows that session mode is refused
there, and holds one key shared by two readers (what `lock.hold(key, shared=True)` asks of the
backend) while a writer is kept out.
"""

from __future__ import annotations

import uuid
from typing import Any

from keyedlock_asgi import KeyedLock, LockBusy
from keyedlock_asgi.backends.postgres import PostgresBackend, TransactionPoolingError


def make_lock(dsn_through_pgbouncer: str, namespace: str) -> KeyedLock:
    # --8<-- [start:setup]
    backend = PostgresBackend.from_dsn(
        dsn_through_pgbouncer,  # e.g. postgresql://app@pgbouncer:6432/app
        namespace=namespace,
        mode="transaction",  # each hold is one transaction: pgbouncer keeps it on one server
    )
    # --8<-- [end:setup]
    return KeyedLock(backend=backend)


async def main(dsn_through_pgbouncer: str) -> dict[str, Any]:
    namespace = f"docs-{uuid.uuid4().hex[:12]}"
    lock = make_lock(dsn_through_pgbouncer, namespace)
    async with lock.hold("order:1") as held:
        fenced = held.token > 0
    await lock.aclose()

    # --8<-- [start:refused]
    session = PostgresBackend.from_dsn(dsn_through_pgbouncer, namespace=namespace)
    try:
        await session.acquire("order:1", timeout=1.0, max_concurrency=1)
    except TransactionPoolingError as exc:  # raised before anything was locked
        refused = "mode='transaction'" in str(exc)
    # --8<-- [end:refused]
    await session.aclose()

    # --8<-- [start:shared]
    def process() -> PostgresBackend:  # one backend stands for one worker process
        return PostgresBackend.from_dsn(
            dsn_through_pgbouncer, namespace=namespace, mode="transaction"
        )

    readers, writer = [process(), process()], process()
    first = await readers[0].acquire("doc:1", timeout=0, max_concurrency=1, shared=True)
    second = await readers[1].acquire("doc:1", timeout=0, max_concurrency=1, shared=True)
    try:
        await writer.acquire("doc:1", timeout=0, max_concurrency=1)
        writer_kept_out = False
    except LockBusy:
        writer_kept_out = True
    await first.release()
    await second.release()
    # --8<-- [end:shared]
    for backend in (*readers, writer):
        await backend.aclose()
    return {"fenced": fenced, "refused": refused, "writer_kept_out": writer_kept_out}
