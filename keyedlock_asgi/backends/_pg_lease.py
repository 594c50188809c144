"""One key held in PostgreSQL: its connection, its heartbeat and how it tells it was lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import anyio

from . import LeaseLost, LeaseLostReason

if TYPE_CHECKING:
    from .postgres import PostgresBackend

__all__ = ["PostgresLease", "is_closed"]

logger = logging.getLogger("keyedlock_asgi.postgres")

_finishing: set[asyncio.Task[None]] = set()
"""Releases a native cancellation interrupted before they began, running to the end."""


class PostgresLease:
    """A key granted by the server, held by one pooled connection until `release()`.

    Session mode releases with `pg_advisory_unlock` (`_shared` for a reader), transaction
    mode with `COMMIT`. All
    traffic on the connection (heartbeat, release) goes through `_io`, never two at once.
    The heartbeat task starts only once a hold outlives one heartbeat interval (a timer
    until then): most holds are far shorter, and a task per hold cost them a loop pass.
    """

    __slots__ = (
        "_answered_at",
        "_backend",
        "_beat",
        "_conn",
        "_done",
        "_granted_at",
        "_io",
        "_lock_ids",
        "_pool",
        "key",
        "lost",
        "on_lost",
        "shared",
        "token",
    )

    def __init__(
        self,
        backend: PostgresBackend,
        pool: Any,
        conn: Any,
        key: str,
        lock_ids: tuple[int, ...],
        token: int,
        shared: bool,
    ) -> None:
        self._backend = backend
        self._pool = pool
        self._conn = conn
        self._lock_ids = lock_ids  # every advisory lock the session holds for this key
        self.shared = shared
        self._io = asyncio.Lock()
        self._done = False
        self.key = key
        self.token = token
        self._granted_at = self._answered_at = monotonic()
        """`_answered_at`: when the server's lease on this session began, at the latest: each
        answered beat's sending (the server ended that statement later). The grant's answer
        arrives a little after the server ended it, which the heartbeat's margin covers."""
        self.on_lost: Callable[[LeaseLost], object] | None = None
        """Told of the loss right after the backend's `on_lease_lost` (the core revokes)."""
        self.lost = False
        """True once the server is known to have dropped the hold."""
        conn.keyedlock_hold(self)  # told by `_connection_closed` if the connection closes
        self._beat: asyncio.TimerHandle | asyncio.Task[None] | None = None
        if backend.heartbeat is not None:
            self._beat = asyncio.get_running_loop().call_later(
                backend.heartbeat, self._start_heartbeat
            )

    def __repr__(self) -> str:
        state = "released" if self._done else ("lost" if self.lost else "held")
        mode = " shared" if self.shared else ""
        return f"<PostgresLease key={self.key!r} token={self.token}{mode} {state}>"

    async def release(self) -> None:
        """Unlock on the same connection and give it back to the pool; never raises for a
        lost hold. Shielded: a cancelled caller still releases.

        anyio's shield does not hold back a native asyncio cancellation (`Task.cancel()`,
        `asyncio.timeout`): one that lands in the unlock still gives the connection back
        (unclean: the pool's reset unlocks), one that lands while the release waits for a
        heartbeat's query leaves the release to a task of its own."""
        with anyio.CancelScope(shield=True):
            try:
                await self._release()
            except asyncio.CancelledError:
                if not self._done:
                    task = asyncio.get_running_loop().create_task(self._release())
                    _finishing.add(task)
                    task.add_done_callback(_finishing.discard)
                raise

    async def _release(self) -> None:
        async with self._io:
            if self._done:
                return
            self._done = True
            self._stop_heartbeat()
            # After the connection died the pool may have detached our proxy already:
            # nothing below may raise, or the pool slot would never be given back.
            with contextlib.suppress(Exception):
                self._conn.keyedlock_hold(None)
            clean = False
            try:
                if not self.lost and not is_closed(self._conn):
                    try:
                        clean = await self._backend._unlock(self._conn, self._lock_ids, self.shared)
                    except Exception as exc:
                        self._report_lost("unreachable", "release failed", exc)
            finally:
                await self._backend._give_back(self._pool, self._conn, clean=clean)
                self._backend._leases.discard(self)

    def _stop_heartbeat(self) -> None:
        beat = self._beat
        if beat is not None and beat is not asyncio.current_task():
            beat.cancel()  # a timer, or a task that sleeps or waits for `_io`: safe to cancel
        self._beat = None

    def _start_heartbeat(self) -> None:
        """The hold outlived one interval: from now on a task beats (the first beat at once)."""
        if not self._done:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Keep the server-side lease (`idle_session_timeout`) from firing while we live."""
        backend = self._backend
        interval = backend.heartbeat
        assert interval is not None
        lease = backend.lease
        assert lease is not None
        # A tenth of the lease, or half the slack a heartbeat close to the lease leaves.
        margin = min(lease / 10, (lease - interval) / 2)
        while True:
            async with self._io:
                if self._done or self.lost:
                    return
                # The server ends the session `lease` after the last statement it answered:
                # a beat still unanswered then means the key may be someone else's already,
                # so it may only wait what is left of that (not a whole lease from now), less
                # a margin for timers and the network. Giving up early never lets two in: the
                # hold is revoked while the server still keeps the key for it.
                sent_at = monotonic()
                left = lease - margin - (sent_at - self._answered_at)
                if left <= 0:
                    self._report_lost("expired", "no heartbeat was answered within the lease", None)
                    return
                try:
                    await self._conn.execute("SELECT 1", timeout=left)
                except Exception as exc:
                    self._report_lost("unreachable", "heartbeat failed", exc)
                    return
                self._answered_at = sent_at  # the server cannot have ended it before this
            await asyncio.sleep(interval)

    def _connection_closed(self) -> None:
        if not self._done:
            self._report_lost("connection_lost", "the lock connection closed", None)

    def _report_lost(
        self, reason: LeaseLostReason, detail: str, error: BaseException | None
    ) -> None:
        if self.lost:
            return
        self.lost = True
        event = LeaseLost(self.key, self.token, reason, monotonic() - self._granted_at, error)
        logger.warning(
            "lost the PostgreSQL lock on %r (token %d): %s", self.key, self.token, detail
        )
        hook = self._backend.on_lease_lost
        if hook is not None:
            try:
                hook(event)
            except Exception:
                logger.exception("the on_lease_lost hook raised")
        if self.on_lost is not None:
            self.on_lost(event)


def is_closed(conn: Any) -> bool:
    """Whether a pooled connection is unusable (closed, or already detached by the pool)."""
    try:
        return bool(conn.is_closed())
    except Exception:
        return True
