"""`KeyedLock`: callers that share a key run one at a time, first in first out.

Design, in short:
- State lives per event loop (asyncio loop or trio run), so one `KeyedLock` serves successive
  loops (a TestClient per test) and trio alike.
- The table maps a key in use to its single holder (the `Held` itself: nothing else is
  allocated on the uncontended path) or, once someone must wait or several may hold, to a
  `_KeyState` with the holders' tasks and a FIFO deque of waiters. A key with no holder and no
  waiter is deleted, so idle keys cost nothing.
- Release hands the key directly to the first waiter (it becomes a holder before it even
  wakes), so nobody can barge in. A waiter that is cancelled or times out after being handed
  the key passes it on, or uses it: the grant is recorded before the wake-up (an asyncio
  waiter's future result, a trio waiter's `granted` flag), and that record settles every race.
- The uncontended path does not yield to the event loop (like `asyncio.Lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import sys
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar, Union, final, overload

import anyio
import anyio.lowlevel

from ._coalesce import coalesce as _coalesce
from ._errors import (
    BackendUnavailable,
    LockAborted,
    LockBusy,
    LockReentryError,
    LockTimeout,
    QueueFull,
)

if TYPE_CHECKING:
    from ._hooks import OnAcquired, OnRejected, OnReleased
    from .backends import BackendLease, LockBackend
    from .keys import KeyExtractor

__all__ = ["Held", "KeyedLock", "LockStats", "OnBackendError", "OnError", "mutex"]

T = TypeVar("T")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Any])
OnError = Literal["continue", "stop"]
OnBackendError = Literal["closed", "open"]

logger = logging.getLogger("keyedlock_asgi")


class _Unset:
    """Marks an option the caller left to the lock's default."""

    def __repr__(self) -> str:
        return "<lock default>"


UNSET: Final = _Unset()

try:  # the running asyncio task of a loop, without a Python-level call where possible
    from _asyncio import current_task as _task_of_loop  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

        _task_of_loop = _current_tasks.get
    except ImportError:
        _task_of_loop = asyncio.current_task
try:  # every loop with a task in the middle of a step right now (any thread) -> that task
    from asyncio.tasks import _current_tasks as _tasks_in_step  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the Python version
    _tasks_in_step = {}
_running_loop = asyncio._get_running_loop
_thread_ident = threading.get_ident
# Up to 3.11, asyncio._get_running_loop() makes a getpid() system call on every call (a check
# for fork), which costs more than taking a free key; the hot paths then trust the loop seen
# last instead (see `KeyedLock._current`). From 3.12 on it is cheap and always asked.
_TRUST_LOOP_CACHE: Final = (
    sys.version_info < (3, 12) and getattr(_task_of_loop, "__self__", None) is _tasks_in_step
)


class _NoLoop:
    """The loop cache before any asyncio loop was trusted: no task, no thread."""

    _thread_id = None


_NO_LOOP: Final = _NoLoop()

# (timeout, max_waiting, on_error) of one hold
_Options = tuple[Union[float, None], Union[int, None], OnError]  # noqa: UP007


@dataclass(frozen=True)
class LockStats:
    """A snapshot of one lock on the current event loop."""

    active_keys: int
    """Keys with at least one holder or waiter."""
    holders: int
    """Holds granted and not yet released, across all keys."""
    waiting: int
    """Callers queued, across all keys."""


class _Waiter:
    """One caller queued on trio. `granted` is set by the releasing task before it wakes.

    On asyncio a waiter is a `(future, task)` tuple instead: the future's result is the
    outcome (`True` granted, an exception aborted) and a cancelled future is a waiter that
    gave up, so no object is allocated and no flag kept beside it (the contended path is hot).
    """

    __slots__ = ("aborted", "granted", "signal", "task")
    task: object
    signal: Any  # a trio.Event
    granted: bool
    aborted: BaseException | None  # on_error="stop": the holder's exception


_AsyncioWaiter = tuple["asyncio.Future[object]", object]
GRANTED: Final = True  # an asyncio waiter's future result when it was handed the key


@final
class _KeyState:
    """A contended key (or one with several holders): holders' tasks and the FIFO queue."""

    __slots__ = ("owners", "waiters")

    def __init__(self, owners: list[object]) -> None:
        self.owners = owners
        self.waiters: deque[_Waiter | _AsyncioWaiter] = deque()


class _LoopState:
    """The key table of one event loop, and how that loop parks and wakes a waiter.

    asyncio: a waiter awaits a bare future (the cheapest wake-up); trio: a `trio.Event`.
    """

    __slots__ = ("__weakref__", "checkpoint_if_cancelled", "event_class", "keys", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, event_class: Any = None) -> None:
        self.keys: dict[str, Held | _KeyState] = {}
        self.loop = loop  # asyncio: waiters park on a bare future, the cheapest wake-up
        self.event_class = event_class  # trio: waiters park on a trio.Event
        self.checkpoint_if_cancelled = _checkpoint_if_cancelled_for(
            "trio" if loop is None else "asyncio"
        )


_NO_STATE: Final = object.__new__(_LoopState)  # paired with _NO_LOOP, never used


def _checkpoint_if_cancelled_for(library: str) -> Callable[[], Awaitable[None]]:
    """anyio's `checkpoint_if_cancelled` for one event loop, looked up once, not per call."""
    try:
        from anyio._core._eventloop import get_async_backend

        found: Callable[[], Awaitable[None]] = get_async_backend(library).checkpoint_if_cancelled
    except (ImportError, AttributeError, LookupError):  # pragma: no cover - anyio internals moved
        return anyio.lowlevel.checkpoint_if_cancelled
    return found


def _anyio_task_states() -> dict[Any, Any] | None:
    """anyio's record of each asyncio task's cancel scope (the weak dictionary's own dict, read
    without its Python-level `get`), or None if anyio moved it."""
    try:
        from anyio._backends._asyncio import _task_states
    except ImportError:  # pragma: no cover - anyio internals moved
        return None
    data = getattr(_task_states, "data", None)
    return data if isinstance(data, dict) else None


_task_states = _anyio_task_states()
_weakref = weakref.ref


def _may_be_cancelled(task: object) -> bool:
    """Cheap test for an anyio cancel scope already cancelled around an asyncio task.

    anyio does not interrupt a task whose awaited future is already done (a hand-off), so
    without this a cancelled waiter would run its block up to its next checkpoint. It reads
    anyio's private attributes (one dict lookup, no property calls: the contended path is
    hot); when in doubt (anyio internals changed) it answers True and the public check runs.
    """
    if _task_states is None:
        return True
    try:
        task_state = _task_states.get(_weakref(task))
        scope = task_state.cancel_scope if task_state is not None else None
        while scope is not None:
            if scope._cancel_called:
                return True
            if scope._shield:
                return False
            scope = scope._parent_scope
    except (AttributeError, TypeError):  # pragma: no cover - anyio internals changed
        return True
    return False


def _trio_current() -> tuple[object, object] | None:
    """The running trio run's root task and the current task, or None outside trio."""
    try:
        import trio
    except ImportError:  # pragma: no cover - trio is optional
        return None
    try:
        return trio.lowlevel.current_root_task(), trio.lowlevel.current_task()
    except RuntimeError:
        return None


def _holds(entry: Held | _KeyState, task: object) -> bool:
    """Whether `task` acquired one of the holds on this table entry."""
    if type(entry) is Held:
        return entry._task is task
    return task in entry.owners


@final
class Held:
    """A hold on one or more keys of a `KeyedLock`: use it once, with `async with`.

    Entering waits for every key (in sorted order, all or nothing); leaving releases them.
    Inside the block the attributes tell what was granted.
    """

    __slots__ = (
        "_key",
        "_leases",
        "_lock",
        "_options",
        "_state",
        "_task",
        "_token",
        "_tokens",
        "_waited",
    )
    _task: object  # the task that entered
    _state: _LoopState | None  # the loop's table while held, then None
    _token: int
    _tokens: list[int]  # several keys: each one's token
    _waited: float
    _leases: list[BackendLease | None]  # with a backend: the engine's holds
    # Set by `KeyedLock.hold` (no `__init__`: `Held()` is the cheapest way to make an object);
    # the rest is set when granted.
    _lock: KeyedLock
    _key: str | tuple[str, ...]  # prefixed; several keys: a sorted tuple without duplicates
    _options: _Options

    @property
    def token(self) -> int:
        """The fencing token: strictly increasing per key across grants (several keys: the
        largest). `0` before the hold is granted, and under a fail-open fallback (not fenced)."""
        return getattr(self, "_token", 0)

    @property
    def waited(self) -> float:
        """Seconds spent waiting for the keys."""
        return getattr(self, "_waited", 0.0)

    @property
    def lock(self) -> KeyedLock:
        """The lock these keys belong to."""
        return self._lock

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys as passed (without the lock's prefix), sorted, duplicates removed."""
        keys = (self._key,) if isinstance(self._key, str) else self._key
        cut = len(self._lock.key_prefix)
        if not cut:
            return keys
        return tuple(key[cut:] for key in keys)

    @property
    def tokens(self) -> dict[str, int]:
        """Each key's fencing token."""
        tokens: list[int] | None = getattr(self, "_tokens", None)
        if tokens is None:
            return dict.fromkeys(self.keys, self.token)
        return dict(zip(self.keys, tokens, strict=True))

    def __repr__(self) -> str:
        status = "held" if getattr(self, "_state", None) is not None else "not held"
        return f"<Held keys={self.keys!r} {status} token={self.token}>"

    async def __aenter__(self) -> Held:
        lock = self._lock
        loop, state = lock._loop_cache  # `_current()`'s common case, inline
        task = _task_of_loop(loop)
        if task is None or len(_tasks_in_step) != 1 or loop._thread_id != _thread_ident():
            state, task = lock._current()
        self._task = task
        key = self._key
        if type(key) is not str or lock._backend is not None:
            await self._acquire_all(state, task)
            return self
        # The hot path: one key, in-process only.
        table = state.keys
        entry = table.get(key)
        if entry is None:
            table[key] = self
        else:
            timeout, max_waiting, _ = self._options
            if (
                type(entry) is _KeyState
                and entry.waiters  # others queue already: so does this caller
                and timeout is None
                and max_waiting is None
                and task not in entry.owners
            ):
                queue: _KeyState | None = entry
            else:
                queue = lock._join(state, key, entry, self, task)
            if queue is not None:
                start = perf_counter()
                loop = state.loop
                if loop is not None and timeout is None:
                    # asyncio without a deadline (the contended hot path): `_wait` inline,
                    # no frame. A `(future, task)` tuple is the waiter.
                    future: asyncio.Future[object] = asyncio.Future(loop=loop)
                    waiter = (future, task)
                    queue.waiters.append(waiter)
                    try:
                        await future
                    except BaseException:
                        lock._give_up(state, key, queue, waiter)
                        raise
                    if future.result() is not GRANTED or _may_be_cancelled(task):
                        await lock._settle(state, key, queue, waiter, None)
                else:
                    await lock._wait(state, key, queue, task, timeout)
                self._waited = perf_counter() - start
        self._token = next(lock._fence)
        self._state = state
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        key = self._key
        lock = self._lock
        state = getattr(self, "_state", None)
        if state is None:
            raise RuntimeError("this hold is not held")
        self._state = None
        if exc is None and type(key) is str and lock._backend is None:
            # The hot path: a free key is forgotten inline; a contended one is handed on.
            table = state.keys
            if table.get(key) is self:
                del table[key]
            else:
                lock._release(state, key, self._task)
            return
        if (
            exc is not None
            and self._options[2] == "stop"
            and not isinstance(exc, anyio.get_cancelled_exc_class())
        ):
            for one in (key,) if type(key) is str else key:
                lock._abort_waiters(state, one, exc)
        if lock._backend is not None:
            await self._release_leases(self._leases)
        for one in (key,) if type(key) is str else key:
            lock._release(state, one, self._task)

    def _enter_now(self) -> bool:
        """Enter without waiting if that is possible (one key, in-process, grantable now).

        False, with nothing changed, when `__aenter__` would have to wait (or talk to a
        backend); raises what `__aenter__` would raise at once (busy, queue full, re-entry).
        Lets the ASGI layer start its disconnect watcher only for requests that must queue.
        """
        lock = self._lock
        key = self._key
        if type(key) is not str or lock._backend is not None:
            return False
        state, task = lock._current()
        if lock._grant_now(state, key, self, task) is not None:
            return False
        self._task = task
        self._state = state
        self._token = next(lock._fence)
        return True

    def _exit_now(self) -> None:
        """Leave after a normal end without awaiting (one key, in-process: nothing to await).

        What `__aexit__(None, None, None)` does; the ASGI fast path calls it directly.
        """
        try:
            state = self._state
        except AttributeError:  # never entered
            state = None
        if state is None:
            raise RuntimeError("this hold is not held")
        self._state = None
        key: str = self._key  # type: ignore[assignment]
        table = state.keys
        if table.get(key) is self:
            del table[key]
        else:  # contended: hand the key on
            self._lock._release(state, key, self._task)

    async def _acquire_all(self, state: _LoopState, task: object) -> None:
        """Several keys, or a backend: take every key in order, all or nothing."""
        lock = self._lock
        backend = lock._backend
        keys = (self._key,) if type(self._key) is str else self._key
        for key in keys:
            entry = state.keys.get(key)
            if entry is not None and _holds(entry, task):
                raise LockReentryError(f"this task already holds the key {key!r}")
        timeout = self._options[0]
        start = perf_counter()
        deadline = None if not timeout else start + timeout
        tokens: list[int] = []
        leases: list[BackendLease | None] = []
        waited = False
        taken = 0
        try:
            for key in keys:
                remaining = timeout if deadline is None else max(deadline - perf_counter(), 0.0)
                queue = lock._grant_now(state, key, self, task)
                if queue is not None:
                    waited = True
                    await lock._wait(state, key, queue, task, remaining)
                taken += 1
                if backend is None:
                    tokens.append(next(lock._fence))
                    continue
                waited = True
                if deadline is not None:
                    remaining = max(deadline - perf_counter(), 0.0)
                leases.append(await self._acquire_lease(backend, key, remaining))
                tokens.append(0 if leases[-1] is None else leases[-1].token)
        except BaseException as error:
            if isinstance(error, LockTimeout):
                error.retry_after = timeout  # the caller's whole budget, not what was left
            with anyio.CancelScope(shield=True):
                await self._release_leases(leases)
                for key in keys[:taken]:
                    lock._release(state, key, task)
            raise
        if waited:
            self._waited = perf_counter() - start
        self._leases = leases
        self._state = state
        if len(tokens) == 1:
            self._token = tokens[0]
        else:
            self._tokens = tokens
            self._token = max(tokens)

    async def _acquire_lease(
        self, backend: LockBackend, key: str, timeout: float | None
    ) -> BackendLease | None:
        """The engine-level hold; None when the engine is down and the lock fails open."""
        lock = self._lock
        try:
            return await backend.acquire(key, timeout=timeout, max_concurrency=lock.max_concurrency)
        except LockBusy:
            if self._options[0] == 0:
                raise
            # The in-process wait used up the whole budget: that is a timeout, not "busy".
            error = LockTimeout(f"the key was not granted within {self._options[0]:g} seconds")
            error.retry_after = self._options[0]
            raise error from None
        except BackendUnavailable:
            if lock.on_backend_error == "closed":
                raise
            logger.warning(
                "lock backend unavailable; serving under the in-process lock only "
                "(on_backend_error='open')",
                exc_info=True,
            )
            return None

    @staticmethod
    async def _release_leases(leases: list[BackendLease | None]) -> None:
        """Give engine leases back, shielded: a cancelled request must not strand a key."""
        with anyio.CancelScope(shield=True):
            for lease in reversed(leases):
                if lease is None:
                    continue
                try:
                    await lease.release()
                except Exception:
                    logger.warning("failed to release a lock lease", exc_info=True)


class KeyedLock:
    """Callers that share a key run one at a time, in arrival order; other keys run freely.

    Options set here are defaults; `hold()` overrides `timeout`, `max_waiting` and `on_error`
    per call.
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        max_waiting: int | None = None,
        max_concurrency: int = 1,
        on_error: OnError = "continue",
        key_prefix: str = "",
        backend: LockBackend | None = None,
        on_backend_error: OnBackendError = "closed",
    ) -> None:
        _check_timeout(timeout)
        _check_max_waiting(max_waiting)
        _check_on_error(on_error)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError("max_concurrency must be an int")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not isinstance(key_prefix, str):
            raise TypeError("key_prefix must be a str")
        if on_backend_error not in ("closed", "open"):
            raise ValueError("on_backend_error must be 'closed' or 'open'")
        self._defaults: _Options = (timeout, max_waiting, on_error)
        self._max_concurrency = max_concurrency
        self._key_prefix = key_prefix
        self._on_backend_error: OnBackendError = on_backend_error
        self._backend = backend
        self._fence = itertools.count(1)
        self._states: weakref.WeakKeyDictionary[object, _LoopState] = weakref.WeakKeyDictionary()
        # The event loop (asyncio loop or trio root task) seen last and its state; and the
        # asyncio loop seen last that the hot paths may trust without asking (see `_current`).
        self._cache: tuple[object, _LoopState | None] = (None, None)
        self._loop_cache: tuple[Any, _LoopState] = (_NO_LOOP, _NO_STATE)

    @property
    def timeout(self) -> float | None:
        """Default seconds to wait for a key: None waits forever, 0 fails at once."""
        return self._defaults[0]

    @property
    def max_waiting(self) -> int | None:
        """Default bound on callers queued per key (holders not counted)."""
        return self._defaults[1]

    @property
    def on_error(self) -> OnError:
        """Default policy when a holder's block raises: "continue" or "stop"."""
        return self._defaults[2]

    @property
    def max_concurrency(self) -> int:
        """How many may hold one key at once (1: a mutex)."""
        return self._max_concurrency

    @property
    def key_prefix(self) -> str:
        """Namespace prepended to every key."""
        return self._key_prefix

    @property
    def on_backend_error(self) -> OnBackendError:
        """ "closed": an unreachable engine raises `BackendUnavailable`; "open": in-process only."""
        return self._on_backend_error

    @property
    def backend(self) -> LockBackend | None:
        """The engine shared across processes, or None for in-process only."""
        return self._backend

    def __repr__(self) -> str:
        engine = "in-process" if self._backend is None else type(self._backend).__name__
        return (
            f"<KeyedLock {engine} max_concurrency={self.max_concurrency} "
            f"timeout={self.timeout} max_waiting={self.max_waiting} on_error={self.on_error!r}>"
        )

    # -- public API -------------------------------------------------------------------------

    def hold(
        self,
        key: str,
        /,
        *more_keys: str,
        timeout: float | _Unset | None = UNSET,
        max_waiting: int | _Unset | None = UNSET,
        on_error: OnError | _Unset = UNSET,
    ) -> Held:
        """Hold one or more keys for the length of an `async with` block.

        Several keys are taken in sorted order, all or nothing, so two callers asking for the
        same keys in different orders can never deadlock.
        """
        held = Held()
        held._lock = self
        if more_keys or type(key) is not str:
            held._key = self._key_set(key, more_keys)
            held._options = self._options(timeout, max_waiting, on_error)
            return held
        held._key = self._key_prefix + key if self._key_prefix else key
        if timeout is UNSET and max_waiting is UNSET and on_error is UNSET:
            held._options = self._defaults  # the hot path: nothing to check
        else:
            held._options = self._options(timeout, max_waiting, on_error)
        return held

    def _take_now(self, key: str, options: _Options) -> Held | None:
        """`hold(key)` already entered, when nobody holds or waits for `key` on this loop and
        the lock is in-process; None otherwise (nothing changed: take the general path).

        The ASGI layers' fast path: one call, no await, nothing allocated but the `Held`.
        """
        if self._backend is not None:
            return None
        # `_current()` inlined for a task on the asyncio loop seen last (the common case).
        loop, state = self._loop_cache
        task = _task_of_loop(loop)
        if task is None or len(_tasks_in_step) != 1 or loop._thread_id != _thread_ident():
            state, task = self._current()
        if self._key_prefix:
            key = self._key_prefix + key
        table = state.keys
        if key in table:
            return None
        held = Held()
        held._lock = self
        held._key = key
        held._options = options
        held._task = task
        held._state = state
        held._token = next(self._fence)
        table[key] = held
        return held

    @overload
    async def run(
        self, key: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def run(
        self, key: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def run(self, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call `fn(*args, **kwargs)` holding `key`; await its result if it is awaitable.

        Sync functions run inline on the event loop; pass
        `functools.partial(anyio.to_thread.run_sync, fn)` to run a blocking one in a thread.
        """
        async with self.hold(key):
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

    def locked(self, key: str) -> bool:
        """Whether someone holds `key` on the current event loop."""
        state = self._current_state()
        return state is not None and (self._key_prefix + key) in state.keys

    def waiting(self, key: str) -> int:
        """How many callers are queued on `key` on the current event loop."""
        state = self._current_state()
        if state is None:
            return 0
        entry = state.keys.get(self._key_prefix + key)
        return len(entry.waiters) if isinstance(entry, _KeyState) else 0

    def stats(self) -> LockStats:
        """Totals for the current event loop (all zero outside one)."""
        state = self._current_state()
        if state is None:
            return LockStats(0, 0, 0)
        holders = waiting = 0
        for entry in state.keys.values():
            if isinstance(entry, _KeyState):
                holders += len(entry.owners)
                waiting += len(entry.waiters)
            else:
                holders += 1
        return LockStats(len(state.keys), holders, waiting)

    def serialize(
        self,
        key: str | KeyExtractor,
        *,
        timeout: float | _Unset | None = UNSET,
        max_waiting: int | _Unset | None = UNSET,
        on_error: OnError | _Unset = UNSET,
        on_missing_key: Literal["pass", "reject"] = "pass",
        max_key_length: int = 256,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> Callable[[F], F]:
        """Decorate a Starlette endpoint or FastAPI path operation to run under `key`.

        `key`: a string, or a key extractor `(scope) -> str | None` (see `keys`). The key is
        held until the response has been sent, streamed bodies included. Options left out
        are the lock's defaults; rejections answer like `KeyedLockMiddleware`.
        """
        from ._route_guard import serialize

        return serialize(
            self,
            key,
            timeout=timeout,
            max_waiting=max_waiting,
            on_error=on_error,
            on_missing_key=on_missing_key,
            max_key_length=max_key_length,
            on_acquired=on_acquired,
            on_released=on_released,
            on_rejected=on_rejected,
        )

    def depends(
        self,
        key: str | Callable[..., Any],
        *,
        timeout: float | _Unset | None = UNSET,
        max_waiting: int | _Unset | None = UNSET,
        on_error: OnError | _Unset = UNSET,
        on_missing_key: Literal["pass", "reject"] = "pass",
        max_key_length: int = 256,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> Any:
        """A FastAPI dependency (`dependencies=[lock.depends(...)]`) that holds `key`.

        `key`: a string, an extractor made by `keys` (read from the request), or any other
        callable, which is a FastAPI dependency returning the key (its own parameters are
        resolved and validated by FastAPI first). Used as a parameter, it gives the `Held`
        covering the key, or None when the request has no key.
        """
        from ._route_guard import depends

        return depends(
            self,
            key,
            timeout=timeout,
            max_waiting=max_waiting,
            on_error=on_error,
            on_missing_key=on_missing_key,
            max_key_length=max_key_length,
            on_acquired=on_acquired,
            on_released=on_released,
            on_rejected=on_rejected,
        )

    async def aclose(self) -> None:
        """Close the backend's connections, if the lock has a backend."""
        if self._backend is not None:
            await self._backend.aclose()

    # -- internals --------------------------------------------------------------------------

    def _key_set(self, key: str, more_keys: tuple[str, ...]) -> str | tuple[str, ...]:
        """Several keys: prefixed, sorted, without duplicates (one left: a plain str)."""
        for one in (key, *more_keys):
            if not isinstance(one, str):
                raise TypeError(f"keys must be str, not {type(one).__name__}")
        prefix = self._key_prefix
        unique = sorted({prefix + one for one in (key, *more_keys)})
        return unique[0] if len(unique) == 1 else tuple(unique)

    def _options(
        self,
        timeout: float | _Unset | None,
        max_waiting: int | _Unset | None,
        on_error: OnError | _Unset,
    ) -> _Options:
        """Per-call options, each defaulting to the lock's."""
        if isinstance(timeout, _Unset):
            timeout = self.timeout
        else:
            _check_timeout(timeout)
        if isinstance(max_waiting, _Unset):
            max_waiting = self.max_waiting
        else:
            _check_max_waiting(max_waiting)
        if isinstance(on_error, _Unset):
            on_error = self.on_error
        else:
            _check_on_error(on_error)
        return (timeout, max_waiting, on_error)

    def _current(self) -> tuple[_LoopState, object]:
        """The current event loop's key table and the current task.

        Up to Python 3.11 the hot paths skip this when they can prove, without asking asyncio
        (a system call there), that the loop seen last (`_loop_cache`) runs the caller: it runs
        in this thread (`loop._thread_id`), has a task in a step, and no other loop anywhere
        has one (`_tasks_in_step` holds one entry). The caller, running in a task step, is in
        that entry, so the entry is the caller's loop and task. A second loop in a step (another
        thread, a loop nested in a task of another, a forked child's stale entry) sends every
        caller here. Loops without a readable `_thread_id` (uvloop) always come here.
        """
        loop = _running_loop()
        task = _task_of_loop(loop) if loop is not None else None
        if task is not None:
            cached_loop, state = self._cache
            if cached_loop is loop and state is not None:
                return state, task
            state = self._states.get(loop)
            if state is None:
                state = self._states[loop] = _LoopState(loop)
            self._cache = (loop, state)
            if _TRUST_LOOP_CACHE and getattr(loop, "_thread_id", None) == _thread_ident():
                self._loop_cache = (loop, state)
            return state, task
        found = _trio_current()
        if found is None:
            raise RuntimeError("KeyedLock must be used from a task on an asyncio or trio loop")
        root, trio_task = found
        cached_root, cached_state = self._cache
        if cached_root is root and cached_state is not None:
            return cached_state, trio_task
        state = self._states.get(root)
        if state is None:
            import trio

            state = self._states[root] = _LoopState(None, trio.Event)
        self._cache = (root, state)
        return state, trio_task

    def _current_state(self) -> _LoopState | None:
        """The current loop's table, or None outside an event loop."""
        try:
            return self._current()[0]
        except RuntimeError:
            return None

    def _grant_now(self, state: _LoopState, key: str, held: Held, task: object) -> _KeyState | None:
        """Take `key` if it is free now (None), or return the queue the caller must join.

        Raises `LockBusy` / `QueueFull` when the caller may not queue.
        """
        table = state.keys
        entry = table.get(key)
        if entry is None:
            table[key] = held
            return None
        return self._join(state, key, entry, held, task)

    def _join(
        self, state: _LoopState, key: str, entry: Held | _KeyState, held: Held, task: object
    ) -> _KeyState | None:
        """`_grant_now` for a key in use: share it (None) or return the queue to join."""
        table = state.keys
        # Re-entry first, before busy / queue full: waiting would never end.
        if type(entry) is Held:
            if entry._task is task:
                raise LockReentryError(f"this task already holds the key {key!r}")
            if self._max_concurrency > 1:
                table[key] = _KeyState([entry._task, task])
                return None
            queued = 0
        else:
            if task in entry.owners:
                raise LockReentryError(f"this task already holds the key {key!r}")
            if len(entry.owners) < self._max_concurrency and not entry.waiters:
                entry.owners.append(task)
                return None
            queued = len(entry.waiters)
        timeout, max_waiting, _ = held._options
        if timeout == 0:
            raise LockBusy("the key is held")
        if max_waiting is not None and queued >= max_waiting:
            raise QueueFull(f"{queued} callers already wait for the key (max_waiting)")
        if type(entry) is Held:
            entry = table[key] = _KeyState([entry._task])
        return entry

    async def _wait(
        self,
        state: _LoopState,
        key: str,
        entry: _KeyState,
        task: object,
        timeout: float | None,
    ) -> None:
        """Wait in `entry`'s queue until `key` is handed over (then the caller holds it)."""
        loop = state.loop
        if loop is None:
            await self._wait_trio(state, key, entry, task, timeout)
            return
        future: asyncio.Future[object] = asyncio.Future(loop=loop)
        waiter = (future, task)
        entry.waiters.append(waiter)
        try:
            if timeout is None:
                await future
            else:
                with anyio.move_on_after(timeout):
                    await future
        except BaseException:
            self._give_up(state, key, entry, waiter)
            raise
        if not future.cancelled() and future.result() is GRANTED and not _may_be_cancelled(task):
            return
        await self._settle(state, key, entry, waiter, timeout)

    async def _settle(
        self,
        state: _LoopState,
        key: str,
        entry: _KeyState,
        waiter: _AsyncioWaiter,
        timeout: float | None,
    ) -> None:
        """An asyncio waiter woke up: run a cancellation pending on a grant (passing the key
        on), or leave the queue and raise what ended the wait (abort, deadline)."""
        future, task = waiter
        outcome = future.result() if future.done() and not future.cancelled() else None
        if outcome is GRANTED:
            await self._checkpoint_holding(state, key, task)
            return
        self._leave_queue(state, key, entry, waiter)
        if isinstance(outcome, BaseException):
            raise LockAborted("the holder of the key failed") from outcome
        raise _timed_out(timeout)

    async def _wait_trio(
        self,
        state: _LoopState,
        key: str,
        entry: _KeyState,
        task: object,
        timeout: float | None,
    ) -> None:
        """`_wait` on trio: the waiter parks on a `trio.Event` and carries its outcome."""
        waiter = _Waiter()
        waiter.task = task
        waiter.signal = signal = state.event_class()
        waiter.granted = False
        waiter.aborted = None
        entry.waiters.append(waiter)
        try:
            if timeout is None:
                await signal.wait()
            else:
                with anyio.move_on_after(timeout):
                    await signal.wait()
        except BaseException:
            self._give_up(state, key, entry, waiter)
            raise
        if waiter.granted:
            await self._checkpoint_holding(state, key, task)
            return
        self._leave_queue(state, key, entry, waiter)
        if waiter.aborted is not None:
            raise LockAborted("the holder of the key failed") from waiter.aborted
        raise _timed_out(timeout)

    async def _checkpoint_holding(self, state: _LoopState, key: str, task: object) -> None:
        """Raise a cancellation pending on a task just handed `key`, passing the key on first."""
        try:
            await state.checkpoint_if_cancelled()
        except BaseException:
            self._release(state, key, task)
            raise

    def _give_up(
        self, state: _LoopState, key: str, entry: _KeyState, waiter: _Waiter | _AsyncioWaiter
    ) -> None:
        """A waiter was cancelled: pass the key on if it was handed over, else leave the queue."""
        if type(waiter) is tuple:
            future, task = waiter
            granted = future.done() and not future.cancelled() and future.result() is GRANTED
        else:
            assert isinstance(waiter, _Waiter)  # trio
            granted, task = waiter.granted, waiter.task
        if granted:
            self._release(state, key, task)
        else:
            self._leave_queue(state, key, entry, waiter)

    @staticmethod
    def _leave_queue(
        state: _LoopState, key: str, entry: _KeyState, waiter: _Waiter | _AsyncioWaiter
    ) -> None:
        """Remove a waiter that gave up; drop the key's state if nobody else needs it."""
        with contextlib.suppress(ValueError):  # already taken off the queue
            entry.waiters.remove(waiter)
        if not entry.owners and not entry.waiters and state.keys.get(key) is entry:
            del state.keys[key]

    @staticmethod
    def _release(state: _LoopState, key: str, task: object) -> None:
        """Give one hold on `key` back: hand it to the first waiter, or forget the key."""
        table = state.keys
        entry = table[key]
        if type(entry) is Held:
            del table[key]
            return
        owners = entry.owners
        owners.remove(task)
        waiters = entry.waiters
        while waiters:
            waiter = waiters.popleft()
            if type(waiter) is tuple:
                future, next_task = waiter
                if future.done():  # cancelled, not yet out of the queue: skip it
                    continue
                future.set_result(GRANTED)
            else:
                assert isinstance(waiter, _Waiter)  # trio
                waiter.granted = True
                next_task = waiter.task
                waiter.signal.set()
            owners.append(next_task)
            return
        if not owners:
            del table[key]

    @staticmethod
    def _abort_waiters(state: _LoopState, key: str, cause: BaseException) -> None:
        """`on_error="stop"`: every caller queued on `key` right now gets `LockAborted`."""
        entry = state.keys.get(key)
        if not isinstance(entry, _KeyState):
            return
        waiters = entry.waiters
        while waiters:
            waiter = waiters.popleft()
            if type(waiter) is tuple:
                if not waiter[0].done():
                    waiter[0].set_result(cause)
            else:
                assert isinstance(waiter, _Waiter)  # trio
                waiter.aborted = cause
                waiter.signal.set()

    # -- single flight (logic in _coalesce) ---------------------------------------------------

    @overload
    async def coalesce(
        self, key: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def coalesce(
        self, key: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def coalesce(self, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Single flight: concurrent calls for `key` share one call of `fn` (this process only).

        A caller cancelled while running `fn` does not cancel the others: one of them runs it
        anew. Nothing is cached after the call ends. No key is held; `fn` may be sync or async.
        """
        return await _coalesce(self, self._key_prefix + key, fn, *args, **kwargs)


def _timed_out(timeout: float | None) -> LockTimeout:
    within = "" if timeout is None else f" within {timeout:g} seconds"
    error = LockTimeout(f"the key was not granted{within}")
    error.retry_after = timeout
    return error


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:
        raise ValueError("timeout must be None or a number >= 0")


def _check_max_waiting(max_waiting: int | None) -> None:
    if max_waiting is None:
        return
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int):
        raise TypeError("max_waiting must be None or an int")
    if max_waiting < 0:
        raise ValueError("max_waiting must be None or >= 0")


def _check_on_error(on_error: str) -> None:
    if on_error not in ("continue", "stop"):
        raise ValueError("on_error must be 'continue' or 'stop'")


_default_lock = KeyedLock()


@overload
async def mutex(
    key: str,
    fn: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    on_error: OnError = ...,
    timeout: float | None = ...,
) -> T: ...


@overload
async def mutex(
    key: str,
    fn: Callable[..., T],
    /,
    *args: Any,
    on_error: OnError = ...,
    timeout: float | None = ...,
) -> T: ...


async def mutex(
    key: str,
    fn: Callable[..., Any],
    /,
    *args: Any,
    on_error: OnError = "continue",
    timeout: float | None = None,
) -> Any:
    """Run `fn(*args)` under `key` on a lock shared by the whole process (per event loop).

    The one-liner of async-mutex-lite: `await mutex("user:1", charge, on_error="stop")`.
    """
    async with _default_lock.hold(key, on_error=on_error, timeout=timeout):
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result
