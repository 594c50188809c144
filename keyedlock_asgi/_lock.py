"""`KeyedLock`: callers that share a key run one at a time, first in first out.

Design, in short:
- State lives per event loop (asyncio loop or trio run), so one `KeyedLock` serves successive
  loops (a TestClient per test) and trio alike.
- Every grant and release goes through the key's rules in `_keystate` (`enter`, `leave`,
  `withdraw`, `abort`). This module decides only *how* a caller waits: it parks on its loop's
  signal, and when it wakes its `_outcome` (set by whoever woke it, before the wake-up) says
  whether it holds the key or was aborted, which settles every race between a hand-off and a
  cancellation or deadline: a waiter handed the key while it was being cancelled passes it on.
- The uncontended path does not yield to the event loop (like `asyncio.Lock`).
- With a backend, each key is taken in-process first (level 1), then in the engine (level 2).
- What happens is reported to observers as `LockEvent`s (`_events`); with none attached, the
  paths here pay one truth test.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar, cast, final, overload

import anyio

from . import _runtime
from ._coalesce import coalesce as _coalesce
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
from ._events import LockEvent, LockObserver, Outcome, notify
from ._keystate import GRANTED, KeyState, abort, enter, leave, withdraw
from ._options import HoldKeywords, HoldOptions, OnError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .backends import BackendLease, HandOverBackend, LeaseLost, LockBackend

__all__ = ["Held", "KeyedLock", "LockStats", "OnBackendError", "mutex"]

T = TypeVar("T")
P = ParamSpec("P")
OnBackendError = Literal["closed", "open"]

logger = logging.getLogger("keyedlock_asgi")

_current_asyncio_task = _runtime.current_asyncio_task
_running_loop = _runtime.running_asyncio_loop


@dataclass(frozen=True)
class LockStats:
    """A snapshot of one lock on the current event loop."""

    active_keys: int
    """Keys with at least one holder or waiter."""
    holders: int
    """Holds granted and not yet released, across all keys (shared and exclusive)."""
    waiting: int
    """Callers queued, across all keys."""


def _wake_future(waiter: Held) -> bool:
    future = waiter._signal
    if future.done():  # cancelled by `Task.cancel()`: it is leaving the queue
        return False
    future.set_result(None)
    return True


def _wake_event(waiter: Held) -> bool:
    waiter._signal.set()
    return True


_NO_TASK = "KeyedLock must be used from a task on an asyncio or trio loop"


@final
class _LoopState:
    """The key table of one event loop, and how that loop parks and wakes a waiter.

    asyncio: a waiter awaits a bare future (the cheapest wake-up); trio: a `trio.Event`.
    """

    __slots__ = ("__weakref__", "is_asyncio", "keys", "new_signal", "wake")

    def __init__(self, new_signal: Callable[[], Any], is_asyncio: bool) -> None:
        self.keys: dict[str, Held | KeyState] = {}
        self.new_signal = new_signal
        self.is_asyncio = is_asyncio
        self.wake = _wake_future if is_asyncio else _wake_event


_NO_STATE: Final = _LoopState(lambda: None, True)
"""The cache's state before any loop was seen (never used: no loop is `None`)."""


def _rejection_outcome(error: BaseException) -> Outcome:
    if isinstance(error, LockBusy):
        return "busy"
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, LockTimeout):
        return "timeout"
    if isinstance(error, LockAborted):
        return "aborted"
    if isinstance(error, BackendUnavailable):
        return "backend_unavailable"
    if isinstance(error, LockClosed):
        return "closed"
    return "canceled"


@final
class Held:
    """A hold on one or more keys of a `KeyedLock`: use it once, with `async with`.

    Entering waits for every key (in sorted order, all or nothing); leaving releases them.
    Inside the block the attributes tell what was granted.
    """

    __slots__ = (
        "_granted_at",
        "_inherited",
        "_key",
        "_leases",
        "_limit",
        "_lock",
        "_lost",
        "_options",
        "_outcome",
        "_signal",
        "_state",
        "_task",
        "_token",
        "_tokens",
        "_waited",
        "context",
    )
    # Set by `KeyedLock.hold` (no `__init__`: `Held()` is the cheapest way to make an object).
    _lock: KeyedLock
    _key: str | tuple[str, ...]  # prefixed; several keys: a sorted tuple without duplicates
    _options: HoldOptions
    # Set on the way in.
    _task: object  # the task that entered
    _state: _LoopState | None  # the loop's table while held, then None
    _token: int
    _tokens: list[int]  # several keys: each one's token
    _waited: float
    _granted_at: float  # perf_counter() at the grant, when observers are attached
    _leases: list[BackendLease | None]  # with a backend: the engine's holds
    _inherited: BackendLease | None  # while taking a key: the lease the hold before left it
    _limit: anyio.CancelScope | None  # with `max_hold` or an engine: the scope that revokes it
    _lost: LeaseLost | None  # an engine lease lost while held
    _signal: Any  # while queued: the future or trio.Event it parks on
    _outcome: object  # while queued: None, GRANTED, or the aborting holder's exception
    context: Any
    """Whatever the caller attached for observers (the HTTP layers attach the ASGI scope)."""

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
    def shared(self) -> bool:
        """Whether this is a shared (reader's) hold."""
        return self._options.shared

    @property
    def options(self) -> HoldOptions:
        """The options this hold was asked with, the lock's defaults filled in."""
        return self._options

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
        status = "held" if self._state is not None else "not held"
        mode = " shared" if self._options.shared else ""
        return f"<Held keys={self.keys!r}{mode} {status} token={self.token}>"

    async def __aenter__(self) -> Held:
        waiting = self._try_enter()  # `_acquire`, spelled out: this is the hot path
        if waiting is not None:
            state, queue = waiting
            if queue is not None:
                await self._wait(state, self._key, queue, self._options.timeout, True)  # type: ignore[arg-type]
            else:
                await self._enter_each(state)
        if self._options.max_hold is not None:
            self._start_limit()  # a cancel scope: the block must end in the task it began in
        return self

    async def _acquire(self) -> None:
        """`__aenter__` without starting `max_hold`'s limit: for a caller that waits inside a
        task group of its own and enters the limit after leaving it (the middleware).

        When `_try_enter` cannot grant at once: the wait in the key's queue (one key), or
        taking each key (several keys, a backend)."""
        waiting = self._try_enter()
        if waiting is not None:
            state, queue = waiting
            if queue is not None:
                await self._wait(state, self._key, queue, self._options.timeout, True)  # type: ignore[arg-type]
            else:
                await self._enter_each(state)

    async def _enter_each(self, state: _LoopState) -> None:
        """Several keys, or a backend: take each key (`_acquire_all`), then report it."""
        lock = self._lock
        try:
            await self._acquire_all(state)
        except BaseException as error:
            if lock._observers and not isinstance(error, LockReentryError):
                lock._rejected(self, error)
            raise
        self._state = state
        if lock._observers:
            lock._granted(self)

    @property
    def _revocable(self) -> bool:
        """Whether a caller that runs the block in the task that took the hold should start
        `_start_limit` (the middleware does): `max_hold` set, or an engine lease to lose.
        `__aenter__` starts it only for `max_hold`, so a hold without one may still be
        released from another task."""
        return self._options.max_hold is not None or self._lock._backend is not None

    def _start_limit(self) -> None:
        """Cancel the block that holds this once the hold is `max_hold` old, or its engine
        lease is lost. Entered by the task that runs the block, right after the grant;
        `_release` leaves it."""
        max_hold = self._options.max_hold
        deadline = anyio.current_time() + max_hold if max_hold is not None else float("inf")
        limit = self._limit = anyio.CancelScope(deadline=deadline)
        limit.__enter__()
        if self._lost is not None:  # lost between the grant and now
            limit.cancel()

    def _lease_lost(self, event: LeaseLost) -> None:
        """An engine lease of this hold ended while held: revoke the hold like `max_hold`."""
        self._lost = event
        if self._limit is not None:
            self._limit.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lock._backend is not None and self._state is not None:
            expired = await self._release_through_engine(exc)
        else:
            expired = self._release(exc)
        if expired:
            lost = self._lost
            if lost is not None:
                raise HoldExpired(f"the engine lease of the hold was lost ({lost.reason})")
            raise HoldExpired(f"the hold outlived max_hold ({self._options.max_hold:g} s)")

    async def _release_through_engine(self, error: BaseException | None) -> bool:
        """`_release` for a hold with engine leases; what `_release` returns.

        A key that the in-process release hands to the caller first in this process's queue
        passes its lease on to that caller, whose engine acquire releases it in the same step
        (`HandOverBackend`): the key stays held in the engine until then, so no other process
        gets in between. The other leases are released (first, when no key is passed on).
        """
        leases = self._leases
        heads = None
        if hasattr(self._lock._backend, "acquire_after"):
            heads = self._heads(leases)
        if heads is None:
            try:
                await _release_leases(leases)
            finally:  # a native cancellation gets through the engine's release: keys go back
                expired = self._release(error)
            return expired
        unused: list[BackendLease | None] = []
        try:
            return self._release(error)  # no await since `_heads`: they were first just now
        finally:
            for lease, head in zip(leases, heads, strict=True):
                if head is not None and head._outcome is GRANTED and lease is not None:
                    lease.on_lost = None  # this block is over: nothing of it to revoke
                    head._inherited = lease  # before it runs: it was only woken
                else:
                    unused.append(lease)
            if unused:
                await _release_leases(unused)

    def _heads(self, leases: list[BackendLease | None]) -> list[Held | None] | None:
        """Per key (and its lease): the caller first in this process's queue; None: nobody."""
        state = self._state
        assert state is not None
        keys = (self._key,) if type(self._key) is str else self._key
        heads: list[Held | None] = []
        found = False
        for key, lease in zip(keys, leases, strict=True):
            entry = state.keys.get(key)
            head = None
            if lease is not None and type(entry) is KeyState and entry.queue:
                head = entry.queue[0]
                found = True
            heads.append(head)
        return heads if found else None

    def _try_enter(self) -> tuple[_LoopState, KeyState | None] | None:
        """Enter now if that is possible: None, and the hold is granted. Otherwise, with
        nothing granted, the loop's state and the queue to wait in (no queue: several keys or
        a backend, which `__aenter__` then takes one by one). Raises what entering raises at
        once (re-entry, busy, queue full). The one synchronous way in: `__aenter__` and the
        ASGI layers (which start a disconnect watcher only for requests that must wait)."""
        lock = self._lock
        try:
            loop = _running_loop()
        except RuntimeError:  # no asyncio loop in this thread: trio, or none at all
            state, self._task = lock._trio_state()
        else:
            task = self._task = _current_asyncio_task(loop)
            if task is None:
                raise RuntimeError(_NO_TASK)
            cached_loop, state = lock._cache  # one tuple: threads never see half an update
            if cached_loop is not loop:
                state = lock._asyncio_state(loop)
        key = self._key
        if type(key) is not str or lock._backend is not None or lock._closed:
            return state, None
        table = state.keys
        if key in table:
            try:
                queue = enter(table, key, self, lock._max_concurrency, state.wake)
            except (LockBusy, QueueFull) as error:
                if lock._observers:
                    lock._rejected(self, error)
                raise
            if queue is not None:
                return state, queue
        else:  # `enter`'s first rule, inline (the hot path): a key with no entry is granted
            table[key] = self
        self._token = next(lock._fence)
        self._state = state
        if lock._observers:
            lock._granted(self)
        return None

    def _release(self, error: BaseException | None) -> bool:
        """Give every key back (the in-process part of leaving): the one release path.

        `error`: the exception leaving the block, if any (`on_error="stop"` aborts the queue).
        Returns whether the hold had expired (`max_hold` cancelled its block). Synchronous, so
        the ASGI layers release without awaiting after a normal end.
        """
        state = self._state
        if state is None:
            raise RuntimeError("this hold is not held")
        self._state = None
        expired = False
        refused: BaseException | None = None
        if self._limit is not None:
            try:
                expired = self._end_limit(error)
            except BaseException as exc:  # anyio refused to close it: the keys go back first
                refused = exc
            if expired:
                error = None  # the lock's own deadline: not a failure of the holder
        key = self._key
        table = state.keys
        if error is not None and self._options.on_error == "stop":
            self._abort_waiters(table, (key,) if isinstance(key, str) else key, error)
        if table.get(key) is self:  # type: ignore[arg-type]  # `leave`'s first case, inline
            del table[key]  # type: ignore[arg-type]  # (several keys: a tuple, never in `table`)
        elif type(key) is str:
            leave(table, key, self)
        else:
            for one in key:
                leave(table, one, self)
        lock = self._lock
        if lock._observers:
            lock._released(self, error, expired)
        if refused is not None:
            raise refused
        return expired

    def _end_limit(self, error: BaseException | None) -> bool:
        """Leave the revoking scope; whether it had revoked the hold (swallowing its own
        cancellation). Its errors (left out of order, or from another task) `_release` raises
        after giving the keys back."""
        limit = self._limit
        assert limit is not None
        self._limit = None
        try:
            if error is None:
                limit.__exit__(None, None, None)
            else:
                limit.__exit__(type(error), error, error.__traceback__)
        except BaseException:
            limit.deadline = math.inf  # refused, so still open: it must not cancel what follows
            raise
        return limit.cancelled_caught

    @staticmethod
    def _abort_waiters(
        table: dict[str, Held | KeyState], keys: tuple[str, ...], error: BaseException
    ) -> None:
        """`on_error="stop"`: a failure (not a cancellation) aborts every caller queued now."""
        if isinstance(error, anyio.get_cancelled_exc_class()):
            return
        for key in keys:
            abort(table, key, error)

    async def _wait(
        self, state: _LoopState, key: str, queue: KeyState, timeout: float | None, whole: bool
    ) -> None:
        """Park in `queue` until `key` is handed over (then this hold has it) or raise.

        `whole`: `key` is the hold's only key, so this wait ends the entry: a grant draws the
        token and is reported as `_try_enter`'s is; a refusal is reported too."""
        lock = self._lock
        signal = self._signal = state.new_signal()
        self._outcome = None
        queue.queue.append(self)
        start = perf_counter()
        if lock._observers:
            lock._queued(self)
        parked = signal if state.is_asyncio else signal.wait()
        try:
            if timeout is None:
                await parked
            else:
                with anyio.move_on_after(timeout):
                    await parked
            outcome = self._outcome
            if outcome is GRANTED and (
                not state.is_asyncio or _runtime.may_be_cancelled(self._task)
            ):
                # A deadline or cancellation that fired as the key was handed over: raise it
                # (passing the key on below) rather than run the block up to its next await.
                await _runtime.checkpoint_if_cancelled()
        except BaseException as error:
            self._waited = perf_counter() - start
            if self._outcome is GRANTED:
                leave(state.keys, key, self)  # handed over as it was cancelled: pass it on
            else:
                withdraw(state.keys, key, queue, self)
            if whole and lock._observers:
                lock._rejected(self, error)
            raise
        self._waited = perf_counter() - start
        if outcome is GRANTED:
            if whole:  # what `_try_enter` does for a grant at once
                self._token = next(lock._fence)
                self._state = state
                if lock._observers:
                    lock._granted(self)
            return
        withdraw(state.keys, key, queue, self)
        if outcome is None:
            refused: KeyedLockError = _timed_out(timeout)
        else:  # `abort`: the holder's exception
            refused = LockAborted("the holder of the key failed")
            refused.__cause__ = outcome if isinstance(outcome, BaseException) else None
        if whole and lock._observers:
            lock._rejected(self, refused)
        raise refused

    async def _acquire_all(self, state: _LoopState) -> None:
        """Several keys, or a backend: take every key in order, all or nothing."""
        lock = self._lock
        backend = lock._backend
        if lock._closed:
            raise LockClosed(f"the lock {lock.name!r} is closed: it takes no new holds")
        keys = (self._key,) if type(self._key) is str else self._key
        table = state.keys
        task = self._task
        for key in keys:  # re-entry on any key first, before anything is taken
            entry = table.get(key)
            if entry is not None and (
                entry._task is task if type(entry) is Held else task in entry.holders
            ):
                raise LockReentryError(f"this task already holds the key {key!r}")
        timeout = self._options.timeout
        start = perf_counter()
        deadline = None if not timeout else start + timeout
        tokens: list[int] = []
        leases: list[BackendLease | None] = []
        waited = False
        taken = 0
        self._inherited = None
        try:
            for key in keys:
                remaining = timeout if deadline is None else max(deadline - perf_counter(), 0.0)
                queue = enter(table, key, self, lock._max_concurrency, state.wake)
                if queue is not None:
                    waited = True
                    await self._wait(state, key, queue, remaining, False)
                taken += 1
                if backend is None:
                    tokens.append(next(lock._fence))
                    continue
                waited = True
                if deadline is not None:
                    remaining = max(deadline - perf_counter(), 0.0)
                lease = await self._acquire_lease(backend, key, remaining)
                leases.append(lease)
                if lease is None:
                    tokens.append(0)
                else:
                    tokens.append(lease.token)
                    lease.on_lost = self._lease_lost
        except BaseException as error:
            if isinstance(error, LockTimeout):
                error.retry_after = timeout  # the caller's whole budget, not what was left
            with anyio.CancelScope(shield=True):
                if self._inherited is not None:  # handed a key, then cancelled before using it
                    leases.append(self._inherited)
                    self._inherited = None
                try:
                    await _release_leases(leases)
                finally:  # a native cancellation gets through the engine's release: keys go back
                    for key in keys[:taken]:
                        leave(table, key, self)
            raise
        if waited:
            self._waited = perf_counter() - start
        self._leases = leases
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
        options = self._options
        inherited = self._inherited
        try:
            if inherited is not None:  # the hold before ours passed its lease on
                self._inherited = None
                return await cast("HandOverBackend", backend).acquire_after(
                    inherited,
                    key,
                    timeout=timeout,
                    max_concurrency=lock.max_concurrency,
                    shared=options.shared,
                )
            if options.shared:
                return await backend.acquire(
                    key, timeout=timeout, max_concurrency=lock.max_concurrency, shared=True
                )
            return await backend.acquire(key, timeout=timeout, max_concurrency=lock.max_concurrency)
        except LockBusy:
            if options.timeout == 0:
                raise
            # The in-process wait used up the whole budget: that is a timeout, not "busy".
            raise _timed_out(options.timeout) from None
        except BackendUnavailable:
            if lock.on_backend_error == "closed":
                raise
            logger.warning(
                "lock backend unavailable; serving under the in-process lock only "
                "(on_backend_error='open')",
                exc_info=True,
            )
            return None


async def _release_leases(leases: list[BackendLease | None]) -> None:
    """Give engine leases back, shielded: a cancelled request must not strand a key. A native
    asyncio cancellation, which anyio's shield lets by, is raised after the last lease."""
    cancelled: BaseException | None = None
    with anyio.CancelScope(shield=True):
        for lease in reversed(leases):
            if lease is None:
                continue
            try:
                await lease.release()
            except Exception:
                logger.warning("failed to release a lock lease", exc_info=True)
            except BaseException as exc:
                cancelled = cancelled or exc
    if cancelled is not None:
        raise cancelled


class KeyedLock:
    """Callers that share a key run one at a time, in arrival order; other keys run freely.

    Options set here are defaults; `hold()` overrides `timeout`, `max_waiting`, `on_error` and
    `shared` per call.
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
        max_hold: float | None = None,
        name: str = "default",
        observers: Iterable[LockObserver] = (),
        metrics: bool = True,
        meter_provider: Any = None,
    ) -> None:
        self._defaults = HoldOptions().resolve(timeout, max_waiting, on_error, False, max_hold)
        self._shared_defaults = self._defaults._replace(shared=True)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError("max_concurrency must be an int")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not isinstance(key_prefix, str):
            raise TypeError("key_prefix must be a str")
        if on_backend_error not in ("closed", "open"):
            raise ValueError("on_backend_error must be 'closed' or 'open'")
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str")
        self._max_concurrency = max_concurrency
        self._key_prefix = key_prefix
        self._on_backend_error: OnBackendError = on_backend_error
        self._backend = backend
        self._name = name
        self._observers: tuple[LockObserver, ...] = ()
        for observer in observers:
            self.add_observer(observer)
        # `metrics=True`: attach OpenTelemetry once it listens, looked at now and when the lock
        # is first used on each event loop (an app sets its SDK up at startup, after imports).
        self._meter_provider = meter_provider
        self._metrics_pending = metrics and not _attach_metrics(self, meter_provider)
        self._closed = False
        self._fence = itertools.count(1)
        self._states: weakref.WeakKeyDictionary[object, _LoopState] = weakref.WeakKeyDictionary()
        # The event loop (asyncio loop or trio root task) seen last, and its state.
        self._cache: tuple[object, _LoopState] = (None, _NO_STATE)

    @property
    def timeout(self) -> float | None:
        """Default seconds to wait for a key: None waits forever, 0 fails at once."""
        return self._defaults.timeout

    @property
    def max_waiting(self) -> int | None:
        """Default bound on callers queued per key (holders not counted)."""
        return self._defaults.max_waiting

    @property
    def on_error(self) -> OnError:
        """Default policy when a holder's block raises: "continue" or "stop"."""
        return self._defaults.on_error

    @property
    def defaults(self) -> HoldOptions:
        """The hold options every `hold()` starts from."""
        return self._defaults

    @property
    def max_hold(self) -> float | None:
        """Default seconds a hold may stay open before it is revoked (None: unbounded)."""
        return self._defaults.max_hold

    @property
    def closed(self) -> bool:
        """Whether `drain()` or `aclose()` stopped the lock taking new holds."""
        return self._closed

    @property
    def max_concurrency(self) -> int:
        """How many exclusive holds one key may have at once (1: a mutex)."""
        return self._max_concurrency

    @property
    def key_prefix(self) -> str:
        """Namespace prepended to every key."""
        return self._key_prefix

    @property
    def name(self) -> str:
        """The lock's name in its repr, logs and metrics."""
        return self._name

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
            f"<KeyedLock {self._name!r} {engine} max_concurrency={self.max_concurrency} "
            f"timeout={self.timeout} max_waiting={self.max_waiting} on_error={self.on_error!r}>"
        )

    # -- public API -------------------------------------------------------------------------

    def hold(self, key: str, /, *more_keys: str, **options: Unpack[HoldKeywords]) -> Held:
        """Hold one or more keys for the length of an `async with` block.

        Several keys are taken in sorted order, all or nothing, so two callers asking for the
        same keys in different orders can never deadlock. Options, each `LOCK_DEFAULT` (the
        lock's own) when left out: `timeout`, `max_waiting`, `on_error`, `shared` (True: take
        them as a reader), `max_hold`; see `HoldOptions`.

        Options arrive as `**options`, not as five keyword parameters with defaults: filling
        those defaults costs more than the rest of an uncontended `hold()` (measured with
        `bench/lock_instructions.py`), and most calls pass none.
        """
        resolved = self._defaults if not options else self._resolve(options)
        held = Held()  # no `__init__`: the cheapest way to make one (hot path)
        held._lock = self
        held._options = resolved
        held._state = held._limit = held._lost = held.context = None
        if more_keys or type(key) is not str:
            held._key = self._key_set(key, more_keys)
        else:
            held._key = self._key_prefix + key if self._key_prefix else key
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
            return await _call(fn, *args, **kwargs)

    def locked(self, key: str) -> bool:
        """Whether someone holds `key` (in any mode) on the current event loop."""
        state = self._current_state()
        if state is None:
            return False
        entry = state.keys.get(self._key_prefix + key)
        return entry is not None and (type(entry) is Held or bool(entry.holders))

    def waiting(self, key: str) -> int:
        """How many callers are queued on `key` on the current event loop."""
        state = self._current_state()
        if state is None:
            return 0
        entry = state.keys.get(self._key_prefix + key)
        return len(entry.queue) if type(entry) is KeyState else 0

    def keys(self) -> list[str]:
        """The keys held or waited on, on the current event loop (without the prefix)."""
        state = self._current_state()
        if state is None:
            return []
        cut = len(self._key_prefix)
        return [key[cut:] for key in state.keys]

    def stats(self) -> LockStats:
        """Totals for the current event loop (all zero outside one)."""
        state = self._current_state()
        if state is None:
            return LockStats(0, 0, 0)
        holders = waiting = 0
        for entry in state.keys.values():
            if type(entry) is KeyState:
                holders += len(entry.holders)
                waiting += len(entry.queue)
            else:
                holders += 1
        return LockStats(len(state.keys), holders, waiting)

    def add_observer(self, observer: LockObserver) -> None:
        """Call `observer(event)` with every `LockEvent` of this lock from now on."""
        if not callable(observer):
            raise TypeError("an observer must be callable with a LockEvent")
        self._observers = (*self._observers, observer)

    def remove_observer(self, observer: LockObserver) -> None:
        """Stop telling `observer` (ValueError if it was not added)."""
        observers = list(self._observers)
        observers.remove(observer)
        self._observers = tuple(observers)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking new holds (they raise `LockClosed`) and wait until nothing is held or
        queued on the current event loop. Callers queued already keep their place.

        Raises `TimeoutError` if that takes longer than `timeout` seconds (the lock stays
        closed). For a graceful shutdown: drain, then let the server finish.
        """
        self._closed = True
        state = self._current_state()
        if state is None or not state.keys:
            return
        idle = anyio.Event()

        def watch(event: LockEvent) -> None:
            if not state.keys:
                idle.set()

        self.add_observer(watch)
        try:
            with anyio.fail_after(timeout):
                await idle.wait()
        finally:
            self.remove_observer(watch)

    async def aclose(self, timeout: float | None = None) -> None:
        """`drain(timeout)`, then close the backend's connections, if the lock has a backend.

        After `timeout` seconds the engine is closed anyway (with a warning): its holds still
        open are released there, and their in-process holders find out when they leave.
        """
        try:
            await self.drain(timeout)
        except TimeoutError:
            logger.warning("lock %r closed with holds still open (drain timed out)", self._name)
        if self._backend is not None:
            await self._backend.aclose()

    # -- internals --------------------------------------------------------------------------

    def _resolve(self, options: HoldKeywords) -> HoldOptions:
        """`hold()`'s keyword options against the lock's defaults, each checked."""
        if len(options) == 1 and options.get("shared") is True:  # `== {"shared": True}` lets 1 in
            return self._shared_defaults
        unknown = options.keys() - HoldOptions._fields
        if unknown:
            raise TypeError(
                f"hold() got unexpected keyword arguments: {', '.join(sorted(unknown))}"
            )
        return self._defaults.resolve(**options)

    def _key_set(self, key: str, more_keys: tuple[str, ...]) -> str | tuple[str, ...]:
        """Several keys: prefixed, sorted, without duplicates (one left: a plain str)."""
        for one in (key, *more_keys):
            if not isinstance(one, str):
                raise TypeError(f"keys must be str, not {type(one).__name__}")
        prefix = self._key_prefix
        unique = sorted({prefix + one for one in (key, *more_keys)})
        return unique[0] if len(unique) == 1 else tuple(unique)

    def _asyncio_state(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        """This asyncio loop's state, made on the lock's first use there; cached for the next
        `_try_enter` (where the cache hit is checked inline)."""
        state = self._states.get(loop)
        if state is None:
            state = self._new_state(loop, asyncio.Future, True)
        self._cache = (loop, state)
        return state

    def _trio_state(self) -> tuple[_LoopState, object]:
        """The running trio run's state (made on first use) and the current task."""
        found = _runtime.current_trio_run()
        if found is None:
            raise RuntimeError(_NO_TASK)
        root, task = found
        cached_root, state = self._cache
        if cached_root is root:
            return state, task
        known = self._states.get(root)
        if known is None:
            import trio  # present: `current_trio_run` found a run

            known = self._new_state(root, trio.Event, False)
        self._cache = (root, known)
        return known, task

    def _new_state(
        self, loop: object, new_signal: Callable[[], Any], is_asyncio: bool
    ) -> _LoopState:
        """The lock's first use on this event loop: its key table (and metrics, if pending)."""
        if self._metrics_pending:
            self._metrics_pending = not _attach_metrics(self, self._meter_provider)
        state = self._states[loop] = _LoopState(new_signal, is_asyncio)
        return state

    def _current_state(self) -> _LoopState | None:
        """The current event loop's table: None outside one, or before the lock's first use
        on it (for the read-only views: nothing is held there)."""
        try:
            loop: object = _running_loop()
        except RuntimeError:
            found = _runtime.current_trio_run()
            if found is None:
                return None
            loop = found[0]
        return self._states.get(loop)

    # -- the event stream ---------------------------------------------------------------------

    def _queued(self, held: Held) -> None:
        notify(self._observers, LockEvent("queued", held))

    def _granted(self, held: Held) -> None:
        held._granted_at = perf_counter()
        waited = held.waited
        queued = hasattr(held, "_signal")  # it parked in the queue (`_wait`)
        notify(self._observers, LockEvent("granted", held, "acquired", queued, waited))

    def _rejected(self, held: Held, error: BaseException) -> None:
        outcome = _rejection_outcome(error)
        queued = hasattr(held, "_signal")  # it parked in the queue (`_wait`)
        notify(
            self._observers,
            LockEvent("rejected", held, outcome, queued, held.waited, error=error),
        )

    def _released(self, held: Held, error: BaseException | None, expired: bool) -> None:
        held_for = perf_counter() - getattr(held, "_granted_at", perf_counter())
        outcome: Outcome = "expired" if expired else "normal" if error is None else "error"
        queued = hasattr(held, "_signal")  # it parked in the queue (`_wait`)
        event = LockEvent("released", held, outcome, queued, held.waited, held_for, error)
        notify(self._observers, event)

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


def _attach_metrics(lock: KeyedLock, meter_provider: Any) -> bool:
    """`metrics=True`: observe with OpenTelemetry if `opentelemetry-api` is installed and a
    provider listens (`otel.listening`). Whether to stop asking: attached, or not installed."""
    try:
        from .otel import LockMetrics, listening  # the optional extra `otel`
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("opentelemetry"):
            raise
        return True
    if not listening(meter_provider):
        return False
    lock.add_observer(LockMetrics(lock, meter_provider))
    return True


async def _call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, awaited if what it returns is awaitable (not by its signature)."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _timed_out(timeout: float | None) -> LockTimeout:
    within = "" if timeout is None else f" within {timeout:g} seconds"
    error = LockTimeout(f"the key was not granted{within}")
    error.retry_after = timeout
    return error


_default_lock = KeyedLock(name="mutex")


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
        return await _call(fn, *args)
