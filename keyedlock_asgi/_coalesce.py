"""Single flight: concurrent callers for one key share one call of `fn` (in-process only).

The first caller runs `fn` in its own task. Callers that arrive while it runs wait for its
outcome: its return value, or the exception it raised. If the running caller is cancelled,
that cancellation is its own: the waiting callers wake and the first of them runs `fn` anew
(waiters wake in arrival order on asyncio and trio alike). Nothing is cached: once the call
ends, the next caller runs `fn` again.

State lives per event loop (an anyio `RunVar`), so one lock serves successive loops and trio.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import anyio
from anyio.lowlevel import RunVar

__all__ = ["coalesce"]


class _Flight:
    """One call of `fn` for a key: who waits for it and, once it ends, its outcome."""

    __slots__ = ("done", "error", "next", "rerun", "successor", "value", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiters: list[object] = []
        """The callers waiting for this call, in arrival order."""
        self.rerun = False
        """The runner was cancelled: `successor` runs `fn` anew as `next`; the others wait."""
        self.successor: object | None = None
        self.next: _Flight | None = None


# Per event loop: for each lock (weakly), the calls running by key.
_Table = weakref.WeakKeyDictionary[object, dict[str, _Flight]]
_flights: RunVar[_Table] = RunVar("keyedlock_asgi.coalesce")


def _table_for(owner: object) -> dict[str, _Flight]:
    try:
        tables = _flights.get()
    except LookupError:
        tables = weakref.WeakKeyDictionary()
        _flights.set(tables)
    table = tables.get(owner)
    if table is None:
        table = tables[owner] = {}
    return table


def _finish(table: dict[str, _Flight], key: str, flight: _Flight) -> None:
    if table.get(key) is flight:
        del table[key]
    flight.done.set()


def _abandon(table: dict[str, _Flight], key: str, flight: _Flight) -> None:
    """`flight` lost its runner: its first waiter becomes the runner of a new call that the
    other waiters join (chosen here, not by wake-up order, which trio randomizes)."""
    flight.rerun = True
    if flight.waiters:
        flight.successor = flight.waiters.pop(0)
        flight.next = table[key] = _Flight()
        flight.next.waiters, flight.waiters = flight.waiters, []
        flight.done.set()
    else:
        _finish(table, key, flight)


def _leave(table: dict[str, _Flight], key: str, flight: _Flight, me: object) -> None:
    """Waiter `me` is cancelled: leave the queue, or pass on a run it was handed."""
    while flight.rerun:
        assert flight.next is not None
        if flight.successor is me:
            _abandon(table, key, flight.next)
            return
        flight = flight.next
    if not flight.done.is_set():
        flight.waiters.remove(me)


async def coalesce(
    owner: object, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> Any:
    """`fn(*args, **kwargs)` (awaited if awaitable), shared with every concurrent caller that
    passes the same `owner` and `key` on this event loop."""
    table = _table_for(owner)
    flight = table.get(key)
    if flight is None:
        flight = table[key] = _Flight()
    else:
        me = object()
        flight.waiters.append(me)
        while True:
            try:
                await flight.done.wait()
            except BaseException:
                _leave(table, key, flight, me)
                raise
            if not flight.rerun:
                if flight.error is not None:
                    raise flight.error
                return flight.value
            chosen = flight.successor is me
            assert flight.next is not None
            flight = flight.next
            if chosen:
                break
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except anyio.get_cancelled_exc_class():
        _abandon(table, key, flight)
        raise
    except BaseException as exc:
        flight.error = exc
        _finish(table, key, flight)
        raise
    flight.value = result
    _finish(table, key, flight)
    return result
