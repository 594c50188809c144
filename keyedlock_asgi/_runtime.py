"""Everything the lock asks of the running event loop, in one place.

Public APIs answer every question here. One question has a faster private answer:

- `may_be_cancelled(task)`: whether an anyio cancel scope around an asyncio task was cancelled.
  A waiter handed a key is woken by a done future, and anyio does not interrupt a task whose
  awaited future is already done, so without this check a waiter whose deadline fired at the
  moment of hand-off would run its block up to its next checkpoint. The public check
  (`anyio.lowlevel.checkpoint_if_cancelled`) costs a coroutine and a backend lookup on every
  hand-off; the probe reads anyio's record of the task's cancel scopes directly (one dict
  lookup). Measured with `python bench/lock_bench.py` (b), one key handed between 100 tasks:
  see docs/performance.md. When anyio's internals differ from what the probe expects it answers
  "maybe" and the public check runs; `tests/test_runtime.py` forces that fallback.

`mark_coroutine_function` marks a plain function returning an awaitable as a coroutine
function, which servers inspect: `inspect.markcoroutinefunction` from Python 3.12, asyncio's
own marker before (what asgiref does).
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.lowlevel

__all__ = [
    "checkpoint_if_cancelled",
    "current_asyncio_task",
    "current_trio_run",
    "mark_coroutine_function",
    "may_be_cancelled",
    "public_may_be_cancelled",
    "running_asyncio_loop",
]

running_asyncio_loop = asyncio.get_running_loop
"""The running asyncio loop; raises RuntimeError with none (under trio, or outside a loop)."""

current_asyncio_task = asyncio.current_task
"""`current_asyncio_task(loop)`: that loop's running task, or None outside a task."""

checkpoint_if_cancelled = anyio.lowlevel.checkpoint_if_cancelled
"""Raise a pending cancellation, if any, without yielding otherwise (anyio's public call)."""


def current_trio_run() -> tuple[object, object] | None:
    """The running trio run's root task and the current task, or None outside trio."""
    try:
        import trio
    except ImportError:  # trio is optional
        return None
    try:
        return trio.lowlevel.current_root_task(), trio.lowlevel.current_task()
    except RuntimeError:
        return None


def public_may_be_cancelled(task: object) -> bool:
    """The fallback: always "maybe", so the caller runs the public check."""
    return True


def _anyio_task_states() -> dict[Any, Any] | None:
    """anyio's per-task record of cancel scopes (the weak dictionary's own dict), or None."""
    try:
        from anyio._backends._asyncio import _task_states
    except ImportError:  # anyio moved it
        return None
    data = getattr(_task_states, "data", None)
    return data if isinstance(data, dict) else None


def _probe_for(task_states: dict[Any, Any] | None) -> Callable[[object], bool]:
    """The fast `may_be_cancelled` over anyio's records, or the fallback if there are none."""
    if task_states is None:
        return public_may_be_cancelled
    ref = weakref.ref

    def may_be_cancelled(task: object) -> bool:
        """Whether a cancel scope around `task` was cancelled (True when unsure)."""
        try:
            task_state = task_states.get(ref(task))
            scope = task_state.cancel_scope if task_state is not None else None
            while scope is not None:
                if scope._cancel_called:
                    return True
                if scope._shield:
                    return False
                scope = scope._parent_scope
        except (AttributeError, TypeError):  # anyio's internals changed: ask the public way
            return True
        return False

    return may_be_cancelled


may_be_cancelled: Callable[[object], bool] = _probe_for(_anyio_task_states())
"""Whether an anyio cancel scope around this asyncio task may have been cancelled."""

_F = TypeVar("_F", bound=Callable[..., Any])


def mark_coroutine_function(function: _F) -> _F:
    """Mark a function that returns an awaitable as a coroutine function, the way each Python
    lets one: `inspect.markcoroutinefunction` (3.12+), else asyncio's marker (as asgiref does)."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        marked: _F = mark(function)
        return marked
    function._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return function
