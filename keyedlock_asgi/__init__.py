"""keyedlock_asgi: requests that share a key run one at a time, in any ASGI app."""

from ._errors import (
    BackendUnavailable,
    KeyedLockError,
    LockAborted,
    LockBusy,
    LockReentryError,
    LockTimeout,
    QueueFull,
)
from ._lock import Held, KeyedLock, LockStats, mutex

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Held",
    "KeyedLock",
    "KeyedLockError",
    "LockAborted",
    "LockBusy",
    "LockReentryError",
    "LockStats",
    "LockTimeout",
    "QueueFull",
    "__version__",
    "mutex",
]
