"""keyedlock_asgi: requests that share a key run one at a time, in any ASGI app."""

from . import keys
from ._errors import (
    BackendUnavailable,
    HoldExpired,
    KeyedLockError,
    LockAborted,
    LockBusy,
    LockClosed,
    LockReentryError,
    LockTimeout,
    QueueFull,
)
from ._events import LockEvent, LockObserver
from ._hooks import OnAcquired, OnRejected, OnReleased
from ._idempotency import IdempotencyMiddleware
from ._lock import Held, LockStats, mutex
from ._middleware import BusyResponse, KeyedLockMiddleware
from ._options import LOCK_DEFAULT, HoldOptions, LockDefault
from ._responses import Rejection
from .routes import KeyedLock

__version__ = "0.1.0"

__all__ = [
    "LOCK_DEFAULT",
    "BackendUnavailable",
    "BusyResponse",
    "Held",
    "HoldExpired",
    "HoldOptions",
    "IdempotencyMiddleware",
    "KeyedLock",
    "KeyedLockError",
    "KeyedLockMiddleware",
    "LockAborted",
    "LockBusy",
    "LockClosed",
    "LockDefault",
    "LockEvent",
    "LockObserver",
    "LockReentryError",
    "LockStats",
    "LockTimeout",
    "OnAcquired",
    "OnRejected",
    "OnReleased",
    "QueueFull",
    "Rejection",
    "__version__",
    "keys",
    "mutex",
]
