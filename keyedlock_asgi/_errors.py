"""The errors a keyed lock raises; each maps to one HTTP answer in the ASGI layer."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "HoldExpired",
    "KeyedLockError",
    "LockAborted",
    "LockBusy",
    "LockClosed",
    "LockReentryError",
    "LockTimeout",
    "QueueFull",
]


class KeyedLockError(Exception):
    """Base class of every error raised by keyedlock_asgi."""

    retry_after: float | None = None
    """A hint, in seconds, for when trying again may succeed (HTTP `Retry-After`)."""


class LockTimeout(KeyedLockError):
    """The key was not granted within the timeout; the waiter has left the queue."""


class LockBusy(KeyedLockError):
    """`timeout=0` and the key could not be granted at once."""


class QueueFull(KeyedLockError):
    """`max_waiting` callers already wait on the key."""


class LockAborted(KeyedLockError):
    """The holder raised under `on_error="stop"`; `__cause__` is its exception."""


class LockReentryError(KeyedLockError, RuntimeError):
    """The task already holds this key: waiting for it would deadlock forever."""


class BackendUnavailable(KeyedLockError):
    """A distributed backend cannot be reached and the lock fails closed."""


class LockClosed(KeyedLockError):
    """The lock is draining or closed (`drain()`, `aclose()`): it takes no new holds."""


class HoldExpired(KeyedLockError):
    """The hold outlived `max_hold` (or its engine lease was lost) and was revoked: the block
    was cancelled and the key passed on once it had unwound."""
