"""The lock-engine protocol that lets one `KeyedLock` span processes and hosts.

`KeyedLock` always takes the key in its in-process lock first (level 1), then asks the backend
(level 2), so a process has at most one engine-level waiter per key. A backend therefore only
ever sees one caller at a time per key from each `KeyedLock`, and never multi-key requests:
the core takes several keys one by one in sorted order, which keeps them deadlock-free.

An engine may also implement `HandOverBackend`: then a lease whose key the in-process release
hands to the next caller of the same process travels to that caller, and one engine step
releases it and takes the key for the caller (one round trip per local hand-off, not two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = ["BackendLease", "HandOverBackend", "LeaseLost", "LeaseLostReason", "LockBackend"]

LeaseLostReason = Literal["expired", "max_hold", "unreachable", "connection_lost"]


@dataclass(frozen=True)
class LeaseLost:
    """A held key's engine-level lease ended before its release: another process may hold it.

    Passed to the backend's `on_lease_lost`. Writes that carry `token` as a fencing token can be
    refused by the protected resource once a newer token was used. One class for every engine.
    """

    key: str
    """The key as the engine saw it (with the lock's `key_prefix`)."""
    token: int
    """The fencing token of the hold that lost its lease."""
    reason: LeaseLostReason
    """`expired`: the engine no longer had the lease when renewing; `max_hold`: renewal stopped
    at the cap; `unreachable`: the engine could not be reached until the lease surely ended;
    `connection_lost`: the session that held the key ended (PostgreSQL)."""
    held_for: float
    """Seconds since the key was granted."""
    error: BaseException | None = None
    """The error that revealed the loss, when there was one."""


@runtime_checkable
class BackendLease(Protocol):
    """One key granted by the engine; released exactly once by the core."""

    @property
    def token(self) -> int:
        """The engine's fencing token: strictly increasing per key across every grant."""
        ...

    async def release(self) -> None:
        """Give the key back; called shielded from cancellation. A lost lease is no error."""
        ...

    on_lost: Callable[[LeaseLost], object] | None
    """Set by the core after the grant: call it (on the event loop) when the lease is lost
    while held, so the hold is revoked (`HoldExpired`). A lease that cannot tell leaves it."""


@runtime_checkable
class LockBackend(Protocol):
    """A lock engine shared by several processes (Redis, PostgreSQL, ...)."""

    async def acquire(
        self, key: str, *, timeout: float | None, max_concurrency: int, shared: bool = False
    ) -> BackendLease:
        """Take `key` (already prefixed by the lock) in the engine.

        `shared`: a reader's hold, granted together with other shared holds and never with an
        exclusive one, in arrival order across both modes.

        `timeout` is the time left of the caller's budget: `None` waits forever, `0` fails at
        once. Raise `LockTimeout` when it passes, `LockBusy` when it is `0` and the key is
        taken, `BackendUnavailable` when the engine cannot be reached. Whatever happens,
        including cancellation, nothing may stay held or queued in the engine once this raises.
        """
        ...

    async def aclose(self) -> None:
        """Close connections and background tasks; holds still open are released first."""
        ...


@runtime_checkable
class HandOverBackend(LockBackend, Protocol):
    """A lock engine that takes a key for a caller and releases the previous holder's lease in
    one step (optional: without it, the core releases the lease when the hold ends)."""

    async def acquire_after(
        self,
        lease: BackendLease,
        key: str,
        *,
        timeout: float | None,
        max_concurrency: int,
        shared: bool = False,
    ) -> BackendLease:
        """`acquire(key, ...)` for the caller of this process that the in-process lock handed
        `key` to, releasing `lease` (the hold that ended, on the same key) in the same step.

        Release `lease` first, as `lease.release()` would: callers already queued in the
        engine (other processes) go before this one, in arrival order. Whatever happens,
        including cancellation, `lease` is released (or left to expire if the engine cannot be
        reached) once this returns or raises.
        """
        ...
