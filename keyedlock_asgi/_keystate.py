"""The rules of one key: who may hold it now, who waits, who is next. Every grant and release.

A key's entry in an event loop's table is either the single `Held` holding it (the uncontended
case: nothing else is allocated) or, once a second caller arrives, a `KeyState`: its holders by
task, how many of them are exclusive, and the FIFO queue. The functions here are the only code
that changes an entry:

- `enter`: grant a hold at once, or say which queue it must wait in (or refuse it: re-entry,
  busy, queue full). It never queues the caller itself: the caller appends itself when it
  actually parks, so asking costs nothing when the answer is "wait".
- `leave`: give one hold back, then `KeyState.hand_on`: grant from the head of the queue while
  the rules allow. Waiters become holders before they wake (direct hand-off): nobody barges in.
- `withdraw`: a waiter that gave up leaves the queue; those behind it may now be granted.
- `abort`: `on_error="stop"`: every waiter queued right now is woken with the holder's error.

The rules: with `limit` = `max_concurrency`, up to `limit` exclusive holders together, or any
number of shared holders, never both. Strict FIFO across modes: a caller queues whenever anyone
waits; the head is granted when the rules allow it, and a run of shared waiters at the head is
granted together, up to the next exclusive waiter (so writers never starve). A key with no
holder and no waiter has no entry.

How a waiter parks and wakes differs between asyncio (a future) and trio (an event): the loop's
`wake` callable does it and says whether the waiter was still there to wake.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, final

from ._errors import LockBusy, LockReentryError, QueueFull

if TYPE_CHECKING:
    from ._lock import Held

__all__ = ["GRANTED", "KeyState", "Wake", "abort", "enter", "leave", "withdraw"]

GRANTED: Final = True
"""A waiter's `_outcome` once it was handed the key (an exception: it was aborted)."""

Wake = Callable[["Held"], bool]
"""Wake a parked waiter; False when it already gave up (an asyncio future cancelled)."""


@final
class KeyState:
    """A key with several holds or with waiters: holders by task, their modes, the queue."""

    __slots__ = ("exclusive", "holders", "limit", "queue", "wake")

    def __init__(self, first: Held, limit: int, wake: Wake) -> None:
        self.holders: dict[object, Held] = {first._task: first}
        self.exclusive = 0 if first._options.shared else 1
        """How many of the holders are exclusive (the rest are shared)."""
        self.limit = limit
        self.queue: deque[Held] = deque()
        self.wake = wake

    def admits(self, shared: bool) -> bool:
        """Whether a hold of this mode fits beside the current holders."""
        if shared:
            return self.exclusive == 0
        return self.exclusive < self.limit and self.exclusive == len(self.holders)

    def add(self, held: Held) -> None:
        self.holders[held._task] = held
        if not held._options.shared:
            self.exclusive += 1

    def hand_on(self) -> None:
        """Grant from the head of the queue while the rules allow (a shared run together)."""
        queue = self.queue
        while queue:
            head = queue[0]
            if not self.admits(head._options.shared):
                return
            queue.popleft()
            if self.wake(head):  # it runs only once we yield: the record below is in time
                head._outcome = GRANTED
                self.add(head)


def enter(
    table: dict[str, Held | KeyState], key: str, held: Held, limit: int, wake: Wake
) -> KeyState | None:
    """Grant `held` (its `_task` and `_options` set) on `key` now: None. Or return the state
    whose queue it must join. Raises `LockReentryError`, `LockBusy` or `QueueFull` instead,
    with nothing changed."""
    entry = table.get(key)
    if entry is None:
        table[key] = held
        return None
    task = held._task
    if type(entry) is KeyState:
        state = entry
        if task in state.holders:  # re-entry first: waiting would never end
            raise LockReentryError(f"this task already holds the key {key!r}")
    else:
        if entry._task is task:
            raise LockReentryError(f"this task already holds the key {key!r}")
        state = KeyState(entry, limit, wake)
    options = held._options
    if not state.queue and state.admits(options.shared):
        state.add(held)
        table[key] = state
        return None
    if options.timeout == 0:
        raise LockBusy("the key is held")
    max_waiting = options.max_waiting
    if max_waiting is not None and len(state.queue) >= max_waiting:
        raise QueueFull(f"{len(state.queue)} callers already wait for the key (max_waiting)")
    table[key] = state
    return state


def leave(table: dict[str, Held | KeyState], key: str, held: Held) -> None:
    """Give `held`'s hold on `key` back, handing the key on to whoever is next."""
    entry = table[key]
    if entry is held:
        del table[key]
        return
    assert type(entry) is KeyState
    del entry.holders[held._task]
    if not held._options.shared:
        entry.exclusive -= 1
    entry.hand_on()
    if not entry.holders and not entry.queue:
        del table[key]


def withdraw(table: dict[str, Held | KeyState], key: str, state: KeyState, held: Held) -> None:
    """`held` stops waiting for `key` without having been granted it."""
    with contextlib.suppress(ValueError):  # already off the queue (aborted, or skipped)
        state.queue.remove(held)
    state.hand_on()  # it may have stood in front of waiters that fit now
    if not state.holders and not state.queue and table.get(key) is state:
        del table[key]


def abort(table: dict[str, Held | KeyState], key: str, cause: BaseException) -> None:
    """Wake every caller queued on `key` right now with `cause` (they raise `LockAborted`)."""
    state = table.get(key)
    if type(state) is not KeyState:
        return
    queue = state.queue
    while queue:
        waiter = queue.popleft()
        waiter._outcome = cause
        state.wake(waiter)
