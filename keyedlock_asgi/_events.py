"""What the lock reports: one stream of `LockEvent`s, read by observers.

The lock tells every observer when a caller queues, is granted, is turned away (and why) and
gives its keys back (and how). Metrics, spans and the HTTP layers' hooks all read this one
stream instead of each adding branches to the lock. With no observer attached, the grant and
release paths pay one truth test of a tuple.

An observer is any callable taking a `LockEvent`. It runs synchronously inside the lock's grant
or release step, so it must be quick and must not block; whatever it raises is logged and
swallowed, so a broken observer can never strand a key or fail a caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

if TYPE_CHECKING:
    from ._lock import Held

__all__ = ["EventKind", "LockEvent", "LockObserver", "Outcome", "notify"]

logger = logging.getLogger("keyedlock_asgi")

EventKind = Literal["queued", "granted", "rejected", "released"]
Outcome = Literal[
    # granted
    "acquired",
    # rejected
    "busy",
    "queue_full",
    "timeout",
    "aborted",
    "canceled",
    "closed",
    "backend_unavailable",
    # released
    "normal",
    "error",
    "expired",
]


class LockEvent(NamedTuple):
    """One thing that happened to one hold (one caller asking for one or more keys).

    A NamedTuple: built on every grant and release while an observer is attached, and a tuple
    is the cheapest immutable value to build."""

    kind: EventKind
    """`queued`: the caller must wait; `granted`: it holds its keys; `rejected`: it was turned
    away (or gave up) without holding; `released`: it gave its keys back."""
    held: Held
    """The hold: its lock, keys, mode (`held.shared`), token and `held.context`."""
    outcome: Outcome | None = None
    """`granted`: "acquired". `rejected`: "busy", "queue_full", "timeout", "aborted",
    "canceled", "closed" or "backend_unavailable". `released`: "normal", "error" (an exception
    left the block) or "expired" (the hold was revoked). None for `queued`."""
    queued: bool = False
    """Whether the caller waited in a queue before this event (granted, rejected, released)."""
    waited: float = 0.0
    """Seconds spent queued (0 when it did not queue)."""
    held_for: float = 0.0
    """`released`: seconds between grant and release."""
    error: BaseException | None = None
    """`rejected`: the error the caller got; `released`: the exception that left the block."""


LockObserver: TypeAlias = Callable[[LockEvent], Any]
"""Anything called with each `LockEvent` of a lock (see `KeyedLock(observers=...)`)."""


def notify(observers: tuple[LockObserver, ...], event: LockEvent) -> None:
    """Tell every observer; one that raises is logged and skipped."""
    for observer in observers:
        try:
            observer(event)
        except Exception:
            logger.exception("a keyedlock observer raised; ignored")
