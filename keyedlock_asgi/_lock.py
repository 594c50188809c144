"""`KeyedLock`: callers that share a key run one at a time, first in first out.

Design, in short:
- State lives per event loop (asyncio loop or trio run), so one `KeyedLock` serves successive
  loops (a TestClient per test) and trio alike.
- Per key: the tasks holding it and, only once someone has to wait, a FIFO deque of waiters.
  A key with neither is deleted from the table, so idle keys cost nothing.
- Release hands the key directly to the first waiter (it becomes a holder before it even
  wakes), so nobody can barge in. A waiter that is cancelled or times out after being handed
  the key passes it on, or uses it: a `granted` flag settles every race.
- The uncontended path is one dict lookup and one small object; it does not yield to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar, overload

import anyio

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

_current_asyncio_task = asyncio.current_task


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
    """One queued caller. `granted` is set by the releasing task before the waiter wakes."""

    __slots__ = ("aborted", "granted", "signal", "task")

    def __init__(self, task: object, signal: Any) -> None:
        self.task = task
        self.signal = signal
        self.granted = False
        self.aborted: BaseException | None = None


class _KeyState:
    """A key in use: the tasks that acquired its holds, and its queue once contended."""

    __slots__ = ("owners", "waiters")

    def __init__(self, owner: object) -> None:
        self.owners = [owner]
        self.waiters: deque[_Waiter] | None = None


class _LoopState:
    """The key table of one event loop, with that loop's way of parking a waiter."""

    __slots__ = ("__weakref__", "keys")

    def __init__(self) -> None:
        self.keys: dict[str, _KeyState] = {}

    def new_signal(self) -> Any:
        raise NotImplementedError

    async def wait(self, signal: Any) -> None:
        raise NotImplementedError

    def wake(self, signal: Any) -> None:
        raise NotImplementedError


class _AsyncioLoopState(_LoopState):
    """Waiters park on a bare future: the cheapest wake-up asyncio has."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop

    def new_signal(self) -> asyncio.Future[None]:
        return self.loop.create_future()

    async def wait(self, signal: asyncio.Future[None]) -> None:
        await signal

    def wake(self, signal: asyncio.Future[None]) -> None:
        if not signal.done():
            signal.set_result(None)


class _TrioLoopState(_LoopState):
    """Waiters park on a `trio.Event`."""

    __slots__ = ("event_class",)

    def __init__(self, event_class: Any) -> None:
        super().__init__()
        self.event_class = event_class

    def new_signal(self) -> Any:
        return self.event_class()

    async def wait(self, signal: Any) -> None:
        await signal.wait()

    def wake(self, signal: Any) -> None:
        signal.set()


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


class Held:
    """A hold on one or more keys of a `KeyedLock`: use it with `async with`.

    Entering waits for every key (in sorted order, all or nothing); leaving releases them.
    Inside the block the attributes tell what was granted.
    """

    __slots__ = (
        "_entered",
        "_keys",
        "_leases",
        "_lock",
        "_max_waiting",
        "_on_error",
        "_state",
        "_task",
        "_timeout",
        "_tokens",
        "token",
        "waited",
    )

    def __init__(
        self,
        lock: KeyedLock,
        keys: tuple[str, ...],
        timeout: float | None,
        max_waiting: int | None,
        on_error: OnError,
    ) -> None:
        self._lock = lock
        self._keys = keys  # prefixed, sorted, unique
        self._timeout = timeout
        self._max_waiting = max_waiting
        self._on_error = on_error
        self._entered = False
        self._state: _LoopState | None = None
        self._task: object = None
        self._tokens: list[int] | None = None
        self._leases: list[BackendLease | None] | None = None
        self.token = 0
        """The fencing token: strictly increasing per key across grants (several keys: the
        largest). `0` only while not held, or under a fail-open fallback (not fenced)."""
        self.waited = 0.0
        """Seconds spent waiting for the keys."""

    @property
    def lock(self) -> KeyedLock:
        """The lock these keys belong to."""
        return self._lock

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys as passed (without the lock's prefix), sorted, duplicates removed."""
        cut = len(self._lock.key_prefix)
        if not cut:
            return self._keys
        return tuple(key[cut:] for key in self._keys)

    @property
    def tokens(self) -> dict[str, int]:
        """Each key's fencing token."""
        if self._tokens is None:
            return dict.fromkeys(self.keys, self.token)
        return dict(zip(self.keys, self._tokens, strict=True))

    def __repr__(self) -> str:
        status = "held" if self._entered and self._state is not None else "not held"
        return f"<Held keys={self.keys!r} {status} token={self.token}>"

    async def __aenter__(self) -> Held:
        if self._entered:
            raise RuntimeError("this hold was already entered; call lock.hold() again")
        self._entered = True
        lock = self._lock
        state, task = lock._current()
        self._task = task
        keys = self._keys
        if len(keys) == 1 and lock._backend is None:
            # The hot path: one key, in-process only.
            key = keys[0]
            table = state.keys
            entry = table.get(key)
            if entry is None:
                table[key] = _KeyState(task)
                self.token = next(lock._fence)
                self._state = state
                return self
            if task in entry.owners:
                raise LockReentryError(f"this task already holds the key {keys[0]!r}")
        else:
            for key in keys:
                entry = state.keys.get(key)
                if entry is not None and task in entry.owners:
                    raise LockReentryError(f"this task already holds the key {key!r}")
        await self._acquire_all(state, task)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        if state is None:
            raise RuntimeError("this hold is not held")
        self._state = None
        if (
            exc is not None
            and self._on_error == "stop"
            and not isinstance(exc, anyio.get_cancelled_exc_class())
        ):
            for key in self._keys:
                self._lock._abort_waiters(state, key, exc)
        if self._leases is not None:
            await self._release_leases(len(self._keys))
        release = self._lock._release
        for key in self._keys:
            release(state, key, self._task)

    def _enter_now(self) -> bool:
        """Enter without waiting if that is possible (one key, in-process, grantable now).

        False, with nothing changed, when `__aenter__` would have to wait (or talk to a
        backend); raises what `__aenter__` would raise at once (busy, queue full, re-entry).
        Lets the ASGI layer start its disconnect watcher only for requests that must queue.
        """
        lock = self._lock
        if self._entered or len(self._keys) != 1 or lock._backend is not None:
            return False
        state, task = lock._current()
        key = self._keys[0]
        entry = state.keys.get(key)
        if entry is not None and task in entry.owners:
            raise LockReentryError(f"this task already holds the key {key!r}")
        if not lock._grant_now(state, key, task, self._timeout, self._max_waiting):
            return False
        self._entered = True
        self._task = task
        self._state = state
        self.token = next(lock._fence)
        return True

    async def _acquire_all(self, state: _LoopState, task: object) -> None:
        """Take every key in order; on any failure give back what was taken."""
        lock = self._lock
        backend = lock._backend
        timeout = self._timeout
        start = perf_counter()
        deadline = None if timeout is None or timeout == 0 else start + timeout
        tokens: list[int] = []
        leases: list[BackendLease | None] = []
        if backend is not None:
            self._leases = leases
        waited = False
        taken = 0
        try:
            for key in self._keys:
                remaining = timeout if deadline is None else max(deadline - perf_counter(), 0.0)
                if not lock._grant_now(state, key, task, remaining, self._max_waiting):
                    waited = True
                    await lock._wait(state, key, task, remaining)
                taken += 1
                if backend is None:
                    tokens.append(next(lock._fence))
                    continue
                waited = True
                if deadline is not None:
                    remaining = max(deadline - perf_counter(), 0.0)
                try:
                    lease: BackendLease | None = await backend.acquire(
                        key, timeout=remaining, max_concurrency=lock.max_concurrency
                    )
                except BackendUnavailable:
                    if lock.on_backend_error == "closed":
                        raise
                    logger.warning(
                        "lock backend unavailable; serving under the in-process lock only "
                        "(on_backend_error='open')",
                        exc_info=True,
                    )
                    lease = None
                leases.append(lease)
                tokens.append(0 if lease is None else lease.token)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if self._leases is not None:
                    await self._release_leases(len(leases))
                    self._leases = None
                for key in self._keys[:taken]:
                    lock._release(state, key, task)
            raise
        if waited:
            self.waited = perf_counter() - start
        self._state = state
        if len(tokens) == 1:
            self.token = tokens[0]
        else:
            self._tokens = tokens
            self.token = max(tokens)

    async def _release_leases(self, count: int) -> None:
        """Give engine leases back, shielded: a cancelled request must not strand a key."""
        leases = self._leases
        assert leases is not None
        with anyio.CancelScope(shield=True):
            for lease in reversed(leases[:count]):
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
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.max_concurrency = max_concurrency
        self.on_error: OnError = on_error
        self.key_prefix = key_prefix
        self.on_backend_error: OnBackendError = on_backend_error
        self._backend = backend
        self._fence = itertools.count(1)
        self._states: weakref.WeakKeyDictionary[object, _LoopState] = weakref.WeakKeyDictionary()
        self._cache: tuple[object, _LoopState | None] = (None, None)

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
        *keys: str,
        timeout: float | _Unset | None = UNSET,
        max_waiting: int | _Unset | None = UNSET,
        on_error: OnError | _Unset = UNSET,
    ) -> Held:
        """Hold one or more keys for the length of an `async with` block.

        Several keys are taken in sorted order, all or nothing, so two callers asking for the
        same keys in different orders can never deadlock.
        """
        if len(keys) == 1:
            key = keys[0]
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            prefixed: tuple[str, ...] = (self.key_prefix + key,)
        else:
            if not keys:
                raise ValueError("hold() needs at least one key")
            for key in keys:
                if not isinstance(key, str):
                    raise TypeError(f"keys must be str, not {type(key).__name__}")
            prefix = self.key_prefix
            prefixed = tuple(sorted({prefix + key for key in keys}))
        if isinstance(timeout, _Unset):
            timeout = self.timeout
        elif timeout is not None:
            _check_timeout(timeout)
        if isinstance(max_waiting, _Unset):
            max_waiting = self.max_waiting
        elif max_waiting is not None:
            _check_max_waiting(max_waiting)
        if isinstance(on_error, _Unset):
            on_error = self.on_error
        else:
            _check_on_error(on_error)
        return Held(self, prefixed, timeout, max_waiting, on_error)

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
        return state is not None and (self.key_prefix + key) in state.keys

    def waiting(self, key: str) -> int:
        """How many callers are queued on `key` on the current event loop."""
        state = self._current_state()
        if state is None:
            return 0
        entry = state.keys.get(self.key_prefix + key)
        if entry is None or entry.waiters is None:
            return 0
        return len(entry.waiters)

    def stats(self) -> LockStats:
        """Totals for the current event loop (all zero outside one)."""
        state = self._current_state()
        if state is None:
            return LockStats(0, 0, 0)
        holders = waiting = 0
        for entry in state.keys.values():
            holders += len(entry.owners)
            if entry.waiters:
                waiting += len(entry.waiters)
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

    def _current(self) -> tuple[_LoopState, object]:
        """The current event loop's key table and the current task."""
        try:
            task = _current_asyncio_task()
        except RuntimeError:
            task = None
        if task is not None:
            loop = task.get_loop()
            cached_loop, cached_state = self._cache
            if cached_loop is loop and cached_state is not None:
                return cached_state, task
            state = self._states.get(loop)
            if state is None:
                state = self._states[loop] = _AsyncioLoopState(loop)
            self._cache = (loop, state)
            return state, task
        found = _trio_current()
        if found is None:
            raise RuntimeError("KeyedLock must be used from a task on an asyncio or trio loop")
        root, trio_task = found
        state = self._states.get(root)
        if state is None:
            import trio

            state = self._states[root] = _TrioLoopState(trio.Event)
        return state, trio_task

    def _current_state(self) -> _LoopState | None:
        """The current loop's table, or None outside an event loop."""
        try:
            return self._current()[0]
        except RuntimeError:
            return None

    def _grant_now(
        self,
        state: _LoopState,
        key: str,
        task: object,
        timeout: float | None,
        max_waiting: int | None,
    ) -> bool:
        """Take `key` if it is free; otherwise say whether the caller may queue (or raise)."""
        entry = state.keys.get(key)
        if entry is None:
            state.keys[key] = _KeyState(task)
            return True
        if len(entry.owners) < self.max_concurrency and not entry.waiters:
            entry.owners.append(task)
            return True
        if timeout == 0:
            raise LockBusy("the key is held")
        if max_waiting is not None and entry.waiters is not None:
            if len(entry.waiters) >= max_waiting:
                raise QueueFull(f"{max_waiting} callers already wait for the key")
        elif max_waiting == 0:
            raise QueueFull("no caller may wait for the key (max_waiting=0)")
        return False

    async def _wait(self, state: _LoopState, key: str, task: object, timeout: float | None) -> None:
        """Queue for `key` and wait until it is handed over (then the caller holds it)."""
        entry = state.keys[key]
        waiter = _Waiter(task, state.new_signal())
        if entry.waiters is None:
            entry.waiters = deque()
        entry.waiters.append(waiter)
        try:
            if timeout is None:
                await state.wait(waiter.signal)
            else:
                with anyio.move_on_after(timeout):
                    await state.wait(waiter.signal)
        except BaseException:
            # Cancelled: pass the key on if it was already handed to us, else leave the queue.
            if waiter.granted:
                self._release(state, key, task)
            else:
                self._leave_queue(state, key, entry, waiter)
            raise
        if waiter.granted:
            return
        if waiter.aborted is not None:
            raise LockAborted("the holder of the key failed") from waiter.aborted
        self._leave_queue(state, key, entry, waiter)
        raise LockTimeout(f"the key was not granted within {timeout} seconds")

    def _leave_queue(self, state: _LoopState, key: str, entry: _KeyState, waiter: _Waiter) -> None:
        """Remove a waiter that gave up; drop the key's state if nobody else needs it."""
        waiters = entry.waiters
        if waiters is not None:
            with contextlib.suppress(ValueError):  # already taken off the queue (aborted)
                waiters.remove(waiter)
        if not entry.owners and not waiters and state.keys.get(key) is entry:
            del state.keys[key]

    def _release(self, state: _LoopState, key: str, task: object) -> None:
        """Give one hold on `key` back: hand it to the first waiter, or forget the key."""
        entry = state.keys[key]
        entry.owners.remove(task)
        waiters = entry.waiters
        if waiters:
            waiter = waiters.popleft()
            waiter.granted = True
            entry.owners.append(waiter.task)
            state.wake(waiter.signal)
        elif not entry.owners:
            del state.keys[key]

    def _abort_waiters(self, state: _LoopState, key: str, cause: BaseException) -> None:
        """`on_error="stop"`: every caller queued on `key` right now gets `LockAborted`."""
        entry = state.keys.get(key)
        if entry is None or not entry.waiters:
            return
        waiters = entry.waiters
        while waiters:
            waiter = waiters.popleft()
            waiter.aborted = cause
            state.wake(waiter.signal)


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
