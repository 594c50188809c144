"""PostgreSQL advisory locks as the engine of a `KeyedLock` shared by processes and hosts.

Each held key owns one connection of the backend's own bounded pool (never the app's) for as
long as it is held: `pg_advisory_lock(bigint)` in session mode, or `pg_advisory_xact_lock` in
an open transaction in transaction mode (for pgbouncer transaction pooling); a shared hold
uses the `_shared` forms (ShareLock instead of ExclusiveLock). The server grants waiters of
both modes in one FIFO queue and wakes them itself; a dead session's locks vanish at once. A frozen
holder is bounded by the server (`idle_session_timeout` or
`idle_in_transaction_session_timeout` = `lease`) while a heartbeat keeps a live one in.
Fencing tokens come from one sequence, drawn after the grant in the same statement.

The in-process lock in front (`KeyedLock`) keeps one engine waiter per key per process, so a
connection is only ever taken by the head of a key's local queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from time import monotonic
from typing import Any, Literal

import anyio

from .._errors import BackendUnavailable, LockBusy, LockTimeout
from . import LeaseLost
from ._pg_lease import PostgresLease, is_closed
from ._pg_pooling import TransactionPoolingError, served_per_transaction
from ._pg_sql import (
    check_sequence_name,
    ensure_sequence_sql,
    key_id,
    session_lock_sql,
    session_try_lock_sql,
    session_unlock_sql,
    session_wait_sql,
    xact_lock_sql,
)
from ._pg_wire import copy_out

__all__ = ["LeaseLost", "PostgresBackend", "PostgresLease", "TransactionPoolingError", "key_id"]

logger = logging.getLogger("keyedlock_asgi.postgres")

Mode = Literal["session", "transaction"]

# asyncpg.create_pool arguments that asyncpg.connect does not take (the start-up probe
# opens plain connections with the rest).
_POOL_ONLY = frozenset(
    (
        "min_size",
        "max_size",
        "max_queries",
        "max_inactive_connection_lifetime",
        "setup",
        "init",
        "reset",
        "connection_class",
    )
)


def _asyncpg() -> Any:
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "PostgresBackend needs asyncpg: pip install 'keyedlock_asgi[postgres]'"
        ) from exc
    return asyncpg


class PostgresBackend:
    """A `LockBackend` on PostgreSQL advisory locks (asyncpg; asyncio only).

    `lease` (seconds, None = no server-side lease) bounds how long a holder that stopped
    answering keeps a key; `heartbeat` (default lease/3) keeps a live holder's session busy.
    `pool_size` bounds the keys one process holds or waits for in the engine at once (the
    rest queue in the process for a connection). `mode="transaction"` holds each key in an
    open transaction, for pgbouncer in transaction pooling; session mode refuses to start
    (`TransactionPoolingError`) when it finds itself behind such a pooler.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        namespace: str = "keyedlock",
        lease: float | None = 30.0,
        heartbeat: float | None = None,
        mode: Mode = "session",
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        fence_sequence: str = "keyedlock_asgi_fence",
        on_lease_lost: Callable[[LeaseLost], object] | None = None,
        retry_after: float = 1.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(namespace, str):
            raise TypeError("namespace must be a str")
        if mode not in ("session", "transaction"):
            raise ValueError("mode must be 'session' or 'transaction'")
        if lease is not None and not lease > 0:
            raise ValueError("lease must be None or > 0 seconds")
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError("heartbeat must be None or > 0 seconds")
        if lease is not None and heartbeat is not None and heartbeat >= lease:
            raise ValueError("heartbeat must be shorter than lease")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError("pool_size must be an int >= 1")
        self.dsn = dsn
        self.namespace = namespace
        self.lease = lease
        self.heartbeat = heartbeat if heartbeat is not None or lease is None else lease / 3
        self.mode: Mode = mode
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.fence_sequence = check_sequence_name(fence_sequence)
        self.on_lease_lost = on_lease_lost
        self.retry_after = retry_after
        self.connect_kwargs = dict(connect_kwargs or {})
        self._pool: _LoopPool | None = None
        self._leases: set[PostgresLease] = set()
        self._closed = False
        self._refused: str | None = None  # why start-up refused this configuration

    @classmethod
    def from_dsn(cls, dsn: str, **options: Any) -> PostgresBackend:
        """`PostgresBackend(dsn, **options)`: the spelling the API promises."""
        return cls(dsn, **options)

    def __repr__(self) -> str:
        return (
            f"<PostgresBackend namespace={self.namespace!r} mode={self.mode!r} "
            f"lease={self.lease} pool_size={self.pool_size}>"
        )

    def lock_id(self, key: str) -> int:
        """The advisory lock id (`pg_locks.objid` pair) a key maps to, for inspection."""
        return key_id(self.namespace, key)

    # -- LockBackend --------------------------------------------------------------------

    async def acquire(
        self, key: str, *, timeout: float | None, max_concurrency: int, shared: bool = False
    ) -> PostgresLease:
        """Take `key` in PostgreSQL; see `LockBackend.acquire`.

        `shared`: `pg_advisory_lock_shared`, so readers hold together and a writer waits for
        all of them; with `max_concurrency > 1` a reader holds every slot lock shared.
        """
        if self._closed:
            raise self._unavailable("the backend is closed")
        if self._refused is not None:
            raise TransactionPoolingError(self._refused)
        if max_concurrency > 1 and self.mode == "transaction":
            raise ValueError(
                "max_concurrency > 1 needs mode='session' (its gate lock is released before "
                "the transaction ends)"
            )
        try_only = timeout is not None and timeout <= 0
        deadline = None if timeout is None else monotonic() + timeout
        pool = await self._get_pool()
        for attempt in (1, 2):
            conn = await self._take(pool, try_only, deadline)
            try:
                if max_concurrency == 1:
                    lock_ids: tuple[int, ...] = (key_id(self.namespace, key),)
                    token = await self._lock(conn, lock_ids[0], shared, try_only, deadline)
                else:
                    lock_ids, token = await self._lock_slot(
                        conn, key, max_concurrency, shared, try_only, deadline
                    )
            except BaseException as exc:
                broken = _connection_failed(conn, exc)  # now: a given-back proxy cannot say
                await self._give_back_failed(pool, conn, exc)
                if isinstance(exc, (LockBusy, LockTimeout)) or not isinstance(exc, Exception):
                    raise
                # A pooled connection the server closed while it sat idle (idle timeout,
                # restart): whatever it held died with it, so one fresh try is safe.
                if attempt == 1 and broken and not _past(deadline):
                    continue
                raise self._translate(exc, deadline) from exc
            lease = PostgresLease(self, pool, conn, key, lock_ids, token, shared)
            self._leases.add(lease)
            return lease
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        """Release every hold still open, then close the pool."""
        self._closed = True
        for lease in list(self._leases):
            await lease.release()
        entry, self._pool = self._pool, None
        if entry is None:
            return
        if entry.loop is not asyncio.get_running_loop():
            entry.terminate()
            return
        with contextlib.suppress(Exception):
            pool = await entry.task
            for conn in entry.take_idle(None):  # asyncpg's close waits for every connection
                with contextlib.suppress(Exception):
                    conn.keyedlock_mark_clean()
                    await pool.release(conn)
            try:
                await asyncio.wait_for(pool.close(), self.connect_timeout)
            except (asyncio.TimeoutError, Exception):
                pool.terminate()

    # -- the pool -------------------------------------------------------------------------

    async def _get_pool(self) -> _LoopPool:
        """This event loop's pool, created on first use (pools cannot cross loops)."""
        loop = asyncio.get_running_loop()
        entry = self._pool
        if entry is None or entry.loop is not loop:
            if entry is not None:
                entry.terminate()
            entry = self._pool = _LoopPool(
                loop, self.pool_size, self._open_pool(), _idle_keep(self.lease)
            )
        task = entry.task
        if task.done() and not task.cancelled() and task.exception() is None:
            return entry
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            self._pool = None
            raise
        except BaseException:
            if self._pool is entry:
                self._pool = None
            raise
        return entry

    async def _open_pool(self) -> Any:
        asyncpg = _asyncpg()
        options: dict[str, Any] = {
            "min_size": 0,
            "max_size": self.pool_size,
            "timeout": self.connect_timeout,
            "init": self._init_connection,
            "reset": self._reset_connection,
            "connection_class": _lock_connection_class(),
        }
        if self.lease is not None:
            # Close idle pooled connections before the server's idle timeout does.
            options["max_inactive_connection_lifetime"] = self.lease / 2
        if self.mode == "transaction":
            options["statement_cache_size"] = 0  # pgbouncer in transaction pooling
        options.update(self.connect_kwargs)
        settings = dict(options.pop("server_settings", None) or {})
        settings.setdefault("application_name", f"keyedlock:{self.namespace}"[:63])
        options["server_settings"] = settings
        try:
            pool = await asyncpg.create_pool(self.dsn, **options)
            try:
                async with pool.acquire() as conn:
                    if self.mode == "session":
                        await self._refuse_transaction_pooling(conn, options)
                    await conn.execute(ensure_sequence_sql(self.fence_sequence))
            except BaseException:
                pool.terminate()
                raise
        except (LockBusy, LockTimeout, BackendUnavailable, TransactionPoolingError):
            raise
        except Exception as exc:
            raise self._translate(exc, None) from exc
        return pool

    async def _refuse_transaction_pooling(self, conn: Any, options: Mapping[str, Any]) -> None:
        """Session mode needs one server session per connection: refuse to start, for good,
        behind a pooler that hands each transaction to any server session."""
        asyncpg = _asyncpg()
        connect_options = {k: v for k, v in options.items() if k not in _POOL_ONLY}
        connect_options["statement_cache_size"] = 0

        async def connect() -> Any:
            return await asyncpg.connect(self.dsn, **connect_options)

        try:
            pooled = await asyncio.wait_for(
                served_per_transaction(conn, connect), 2 * self.connect_timeout
            )
        except asyncio.TimeoutError:  # a saturated session pooler: nothing learnt
            logger.debug("the transaction pooling probe timed out", exc_info=True)
            return
        if pooled:
            self._refused = (
                "mode='session' found itself behind a transaction-pooling proxy (pgbouncer "
                "pool_mode=transaction?): its session locks would land on whichever server "
                "session ran each statement. Use PostgresBackend(..., mode='transaction') "
                "there, or connect directly / through session pooling."
            )
            raise TransactionPoolingError(self._refused)

    async def _init_connection(self, conn: Any) -> None:
        """Session mode: the server-side lease is the session's idle timeout (PG >= 14)."""
        if self.mode != "session" or self.lease is None:
            return
        if conn.get_server_version().major < 14:
            raise BackendUnavailable(
                "lease= needs PostgreSQL 14+ (idle_session_timeout) in session mode; "
                "use mode='transaction' or lease=None"
            )
        await conn.execute(f"SET idle_session_timeout = {_ms(self.lease)}")

    async def _reset_connection(self, conn: Any) -> None:
        """Before pooling a connection again: drop every advisory lock unless the hold ended
        cleanly (a cancelled wait may still have been granted by the server)."""
        if conn.keyedlock_take_clean():
            return
        await conn.execute("SELECT pg_advisory_unlock_all()")

    async def _take(self, pool: _LoopPool, try_only: bool, deadline: float | None) -> Any:
        """A connection for one key. Callers queue (FIFO, bounded by their deadline) on the
        pool's slots, so a burst of keys waits here instead of piling locks on the server."""
        slots = pool.slots
        if try_only:
            if not slots.free:
                raise LockBusy(f"all {self.pool_size} lock connections are in use")
            slots.free -= 1
        else:
            await slots.acquire(deadline)
        conn = pool.pop_idle()
        if conn is not None:
            return conn
        try:
            return await pool.task.result().acquire()
        except BaseException as exc:
            slots.release()
            if isinstance(exc, Exception):
                raise self._translate(exc, None) from exc
            raise

    async def _give_back(self, pool: _LoopPool, conn: Any, *, clean: bool) -> None:
        """Free a connection (shielded by the caller or by being in cleanup): a clean one waits
        for the next hold in the idle stack, any other goes back to asyncpg's pool (whose
        reset unlocks everything)."""
        try:
            if clean:
                pool.push_idle(conn)
                return
            # Bounded: the pool's reset of a connection cut off by the network would wait as
            # long as TCP does; past the timeout asyncpg closes it (and the server's lease
            # frees what it held).
            await pool.task.result().release(conn, timeout=self.connect_timeout)
        except Exception:
            logger.debug("could not return a lock connection to the pool", exc_info=True)
        finally:
            pool.slots.release()

    async def _give_back_failed(self, pool: _LoopPool, conn: Any, exc: BaseException) -> None:
        """After a failed or cancelled wait: end the transaction if we can, and let the
        pool's reset unlock everything the session may have been granted meanwhile."""
        with anyio.CancelScope(shield=True):
            try:
                if self.mode == "transaction" and isinstance(exc, Exception):
                    with contextlib.suppress(Exception):
                        if not conn.is_closed():
                            await conn.execute("ROLLBACK")
            finally:  # even through a native asyncio cancellation, which the shield lets by
                await self._give_back(pool, conn, clean=False)

    # -- SQL ------------------------------------------------------------------------------

    async def _lock(
        self, conn: Any, lock_id: int, shared: bool, try_only: bool, deadline: float | None
    ) -> int:
        """Wait for one advisory lock; the fence token drawn once it is granted."""
        if self.mode == "transaction":
            return await self._lock_xact(conn, lock_id, shared, try_only, deadline)
        asyncpg = _asyncpg()
        sequence = self.fence_sequence
        if try_only:
            token = await conn.fetchval(session_try_lock_sql(sequence, shared=shared), lock_id)
            if token is None:
                raise LockBusy("the key is held in another process")
            return int(token)
        try:
            token = await conn.fetchval(
                session_lock_sql(sequence, shared=shared), str(_lock_timeout_ms(deadline)), lock_id
            )
        except asyncpg.LockNotAvailableError as exc:
            raise LockTimeout("the key was not granted within the timeout") from exc
        return int(token)

    async def _lock_xact(
        self, conn: Any, lock_id: int, shared: bool, try_only: bool, deadline: float | None
    ) -> int:
        """Transaction mode: BEGIN, the timeouts, the lock and the fence in one simple-protocol
        round trip (pgbouncer: no prepared statements; no pinned xmin)."""
        asyncpg = _asyncpg()
        statements, query = xact_lock_sql(
            self.fence_sequence,
            lock_id,
            lock_timeout_ms=_lock_timeout_ms(deadline),
            lease_ms=0 if self.lease is None else _ms(self.lease),
            wait=not try_only,
            shared=shared,
        )
        try:
            value = (await copy_out(conn, statements, query)).strip()
        except asyncpg.LockNotAvailableError as exc:
            raise LockTimeout("the key was not granted within the timeout") from exc
        if value == b"\\N":
            raise LockBusy("the key is held in another process")
        return int(value)

    async def _lock_slot(
        self,
        conn: Any,
        key: str,
        slots: int,
        shared: bool,
        try_only: bool,
        deadline: float | None,
    ) -> tuple[tuple[int, ...], int]:
        """`max_concurrency > 1`: pass a FIFO gate lock (both modes, in arrival order), then
        a writer takes the first free one of `slots` slot locks, polling (only the gate's
        holder polls) until one frees up; a reader takes every slot lock shared (the server
        wakes it once the writers left), which keeps writers out until the readers leave."""
        namespace = self.namespace
        gate = key_id(namespace, key, "gate")
        slot_ids = tuple(key_id(namespace, key, f"slot{slot}") for slot in range(slots))
        if try_only:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", gate):
                raise LockBusy("the key's slots are contended in another process")
        else:
            await self._wait_lock(conn, gate, False, deadline)
        if shared:
            token = await self._lock_all_shared(conn, slot_ids, try_only, deadline)
            await conn.fetchval("SELECT pg_advisory_unlock($1)", gate)
            return slot_ids, token
        try_sql = session_try_lock_sql(self.fence_sequence)
        pause = 0.002
        while True:
            for slot_id in slot_ids:
                token = await conn.fetchval(try_sql, slot_id)
                if token is not None:
                    await conn.fetchval("SELECT pg_advisory_unlock($1)", gate)
                    return (slot_id,), int(token)
            if try_only:
                raise LockBusy(f"all {slots} holders of the key are taken")
            left = _left(deadline)
            if left is not None and left <= 0:
                raise LockTimeout("the key was not granted within the timeout")
            await asyncio.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.05)

    async def _lock_all_shared(
        self, conn: Any, lock_ids: tuple[int, ...], try_only: bool, deadline: float | None
    ) -> int:
        """Take every id shared, one statement each (each wait bounded by the time left);
        the fence drawn with the last grant. A failure leaves partial grants to the reset."""
        for lock_id in lock_ids[:-1]:
            if try_only:
                if not await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", lock_id):
                    raise LockBusy("the key is held by a writer in another process")
            else:
                await self._wait_lock(conn, lock_id, True, deadline)
        return await self._lock(conn, lock_ids[-1], True, try_only, deadline)

    async def _wait_lock(
        self, conn: Any, lock_id: int, shared: bool, deadline: float | None
    ) -> None:
        """A session lock without a fence (the gate, a reader's other slots)."""
        asyncpg = _asyncpg()
        try:
            await conn.fetchval(
                session_wait_sql(shared=shared), str(_lock_timeout_ms(deadline)), lock_id
            )
        except asyncpg.LockNotAvailableError as exc:
            raise LockTimeout("the key was not granted within the timeout") from exc

    async def _unlock(self, conn: Any, lock_ids: tuple[int, ...], shared: bool) -> bool:
        """Release a hold on its own connection; True when the server confirms it. Waits at
        most `connect_timeout`: a server cut off by the network must not hold up the release
        (the server's lease frees the key then)."""
        timeout = self.connect_timeout
        if self.mode == "transaction":
            await conn.execute("COMMIT", timeout=timeout)
            return True
        sql = session_unlock_sql(shared=shared)
        return bool(await conn.fetchval(sql, list(lock_ids), timeout=timeout))

    # -- errors ---------------------------------------------------------------------------

    def _unavailable(self, message: str) -> BackendUnavailable:
        error = BackendUnavailable(message)
        error.retry_after = self.retry_after
        return error

    def _translate(self, exc: Exception, deadline: float | None) -> Exception:
        """A driver or network error as the lock error the caller should see."""
        if isinstance(exc, (LockBusy, LockTimeout, BackendUnavailable)):
            return exc
        if isinstance(exc, asyncio.TimeoutError) and _past(deadline):
            return LockTimeout("the key was not granted within the timeout")
        return self._unavailable(f"PostgreSQL lock backend unavailable: {exc!r}")


_connection_class: type[Any] | None = None


def _lock_connection_class() -> type[Any]:
    """An asyncpg Connection that remembers whether its last hold ended cleanly."""
    global _connection_class
    if _connection_class is None:
        asyncpg = _asyncpg()

        class LockConnection(asyncpg.Connection):  # type: ignore[misc,name-defined]
            _keyedlock_clean = False
            _keyedlock_lease: PostgresLease | None = None
            _keyedlock_listening = False

            def keyedlock_hold(self, lease: PostgresLease | None) -> None:
                """The lease this connection holds now (None: none), told if it closes. One
                termination listener per connection: adding one per hold cost two
                `inspect` calls."""
                if not self._keyedlock_listening:
                    self._keyedlock_listening = True
                    self.add_termination_listener(self._keyedlock_closed)
                self._keyedlock_lease = lease

            def _keyedlock_closed(self, _conn: Any) -> None:
                lease = self._keyedlock_lease
                if lease is not None:
                    lease._connection_closed()

            def keyedlock_mark_clean(self) -> None:
                self._keyedlock_clean = True

            def keyedlock_take_clean(self) -> bool:
                clean, self._keyedlock_clean = self._keyedlock_clean, False
                return clean

        _connection_class = LockConnection
    return _connection_class


class _Slots:
    """A FIFO semaphore for pool connections with O(1) give-up: a burst of 100,000 waiters
    that time out must not cost a quadratic `deque.remove` each (asyncio.Semaphore does)."""

    __slots__ = ("free", "loop", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()  # invariant: free > 0 => empty

    async def acquire(self, deadline: float | None) -> None:
        if self.free:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(waiter)
        timer = None
        if deadline is not None:
            when = self.loop.time() + (deadline - monotonic())
            timer = self.loop.call_at(when, _expire, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot while being cancelled: pass it on
            waiter.cancel()  # if still queued, `release` skips it
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(LockTimeout("no lock connection became free within the timeout"))


class _LoopPool:
    """One event loop's asyncpg pool (opening in `task`), the FIFO slots bounding it, and the
    idle stack: clean connections kept out of asyncpg's pool for up to `keep` seconds, for the
    next hold. asyncpg's release and acquire cost a hand-off three event-loop passes and a
    task (its release is an `asyncio.shield`); past `keep` a connection goes back to asyncpg,
    whose `max_inactive_connection_lifetime` closes it before the server's idle timeout."""

    __slots__ = ("idle", "keep", "loop", "releasing", "slots", "sweep", "task")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        size: int,
        opening: Coroutine[Any, Any, Any],
        keep: float,
    ) -> None:
        self.loop = loop
        self.slots = _Slots(loop, size)
        self.task: asyncio.Task[Any] = loop.create_task(opening)
        self.keep = keep
        self.idle: list[tuple[float, Any]] = []  # (freed at, connection), oldest first
        self.sweep: asyncio.TimerHandle | None = None
        self.releasing: set[asyncio.Task[None]] = set()  # swept ones on their way back

    def pop_idle(self) -> Any:
        """The most recently freed live connection, or None; dead ones are dropped (asyncpg
        already took them back when they closed)."""
        idle = self.idle
        while idle:
            conn = idle.pop()[1]
            if not is_closed(conn):
                return conn
            with contextlib.suppress(Exception):
                conn.terminate()
        return None

    def push_idle(self, conn: Any) -> None:
        self.idle.append((self.loop.time(), conn))
        if self.sweep is None:
            self.sweep = self.loop.call_later(self.keep, self._sweep)

    def take_idle(self, older_than: float | None) -> list[Any]:
        """Remove and return the idle connections freed before `older_than` (None: all)."""
        idle = self.idle
        count = len(idle)
        if older_than is not None:
            count = next((n for n, (at, _) in enumerate(idle) if at >= older_than), count)
        taken = [conn for _, conn in idle[:count]]
        del idle[:count]
        if not idle and self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None
        return taken

    def _sweep(self) -> None:
        """Give connections idle longer than `keep` back to asyncpg's pool."""
        self.sweep = None
        for conn in self.take_idle(self.loop.time() - self.keep):
            task = self.loop.create_task(self._release(conn))
            self.releasing.add(task)
            task.add_done_callback(self.releasing.discard)
        if self.idle:
            self.sweep = self.loop.call_at(self.idle[0][0] + self.keep, self._sweep)

    async def _release(self, conn: Any) -> None:
        try:
            conn.keyedlock_mark_clean()
            await self.task.result().release(conn)
        except Exception:
            logger.debug("could not return an idle lock connection to the pool", exc_info=True)

    def terminate(self) -> None:
        """Drop a pool that belongs to another (usually finished) event loop."""
        task = self.task
        if task.done() and not task.cancelled() and task.exception() is None:
            with contextlib.suppress(Exception):
                task.result().terminate()


def _idle_keep(lease: float | None) -> float:
    """How long a freed connection waits in the idle stack: a second, or lease/8 if shorter
    (it is out of asyncpg's idle-lifetime clock meanwhile; the server's clock is `lease`)."""
    return 1.0 if lease is None else min(1.0, lease / 8)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _lock_timeout_ms(deadline: float | None) -> int:
    """`lock_timeout` for the time left: 0 (no limit) without a deadline, else >= 1 ms."""
    if deadline is None:
        return 0
    return _ms(max(deadline - monotonic(), 0.0))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - monotonic(), 0.0)


def _connection_failed(conn: Any, exc: BaseException) -> bool:
    """Whether `exc` is the connection failing rather than the statement: closed, the server
    ending the session (class 57: shutdown, idle timeout), or asyncpg's protocol stuck on the
    error such an end left on an idle connection (`InternalClientError`, `InterfaceError`)."""
    asyncpg = _asyncpg()
    failures = (
        OSError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError,
    )
    return is_closed(conn) or isinstance(exc, failures)


def _past(deadline: float | None) -> bool:
    return deadline is not None and monotonic() >= deadline
