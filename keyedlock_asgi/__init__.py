"""keyedlock_asgi: requests that share a key run one at a time, in any ASGI app."""

from . import keys
from ._errors import (
    BackendUnavailable,
    KeyedLockError,
    LockAborted,
    LockBusy,
    LockReentryError,
    LockTimeout,
    QueueFull,
)
from ._idempotency import IdempotencyMiddleware
from ._lock import Held, KeyedLock, LockStats, mutex
from ._middleware import KeyedLockMiddleware
from ._responses import Rejection

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Held",
    "IdempotencyMiddleware",
    "KeyedLock",
    "KeyedLockError",
    "KeyedLockMiddleware",
    "LockAborted",
    "LockBusy",
    "LockReentryError",
    "LockStats",
    "LockTimeout",
    "QueueFull",
    "Rejection",
    "__version__",
    "keys",
    "mutex",
]
