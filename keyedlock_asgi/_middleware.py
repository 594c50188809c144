"""`KeyedLockMiddleware`: serialize same-key HTTP requests in any ASGI app (pure ASGI).

The middleware object holds configuration only; per-request state lives in locals and, for a
request that has to queue, in a `Watcher` (`_watcher.py`). The uncontended path takes the key
without yielding to the event loop and starts no task; only a request that must wait gets a
watcher that reads `receive()` (buffering body chunks up to a limit, spotting a disconnect)
while it queues.
`__call__` itself is a plain function: a request that is not locked gets the wrapped app's own
awaitable, with no coroutine of ours in between.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from time import perf_counter
from types import FunctionType
from typing import Any, Literal, NoReturn, TypeAlias

from . import keys as _keys
from ._errors import HoldExpired, KeyedLockError, LockReentryError
from ._hooks import OnAcquired, OnRejected, OnReleased
from ._http_options import http_options
from ._lock import Held, KeyedLock
from ._options import LOCK_DEFAULT, LockDefault, OnError
from ._responses import (
    INVALID_KEY,
    MISSING_KEY,
    Rejection,
    ResponseStart,
    log_revoked,
    rejection_for,
    send_rejection,
)
from ._runtime import mark_coroutine_function
from ._scope import SCOPE_KEY, held_by_outer_layer, record, unrecord
from ._templates import RouteFilter
from ._types import ASGIApp, Message, Receive, Scope, Send
from ._watcher import DEFAULT_MAX_BUFFERED_BODY, Watcher, enter_watching

__all__ = ["BusyResponse", "KeyedLockMiddleware"]


BusyResponse: TypeAlias = Callable[[Scope, Rejection], "ASGIApp | Awaitable[ASGIApp | None] | None"]
"""`busy_response(scope, rejection)`: an ASGI app (a Starlette `Response` works) that answers the
rejected request, or None for the default JSON answer."""


async def _raise(error: BaseException) -> NoReturn:
    """Raise `error` when awaited: the plain `__call__` defers what it raised to the await."""
    raise error


class KeyedLockMiddleware:
    """Requests that give the same key run one at a time, in arrival order; others pass.

    The key is held until the wrapped app returns: the whole response sent, background tasks
    done. See `docs/middleware.md` for every option and the responses.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        key: _keys.KeyExtractor,
        lock: KeyedLock | None = None,
        methods: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        timeout: float | LockDefault | None = LOCK_DEFAULT,
        max_waiting: int | LockDefault | None = LOCK_DEFAULT,
        on_error: OnError | LockDefault = LOCK_DEFAULT,
        max_hold: float | LockDefault | None = LOCK_DEFAULT,
        shared_methods: Iterable[str] | None = None,
        on_missing_key: Literal["pass", "reject"] = "pass",
        max_key_length: int = _keys.DEFAULT_MAX_KEY_LENGTH,
        max_buffered_body: int = DEFAULT_MAX_BUFFERED_BODY,
        busy_response: BusyResponse | None = None,
        server_timing: bool = False,
        on_acquired: OnAcquired | None = None,
        on_released: OnReleased | None = None,
        on_rejected: OnRejected | None = None,
    ) -> None:
        if not callable(key):
            raise TypeError("key must be a key extractor: a callable taking the ASGI scope")
        if lock is None:
            lock = KeyedLock()
        if isinstance(methods, str):
            raise TypeError("methods takes a list of method names, not one str")
        _check_positive_int("max_buffered_body", max_buffered_body, minimum=0)
        if busy_response is not None and not callable(busy_response):
            raise TypeError("busy_response must be callable")
        self.options = options = http_options(
            lock,
            timeout=timeout,
            max_waiting=max_waiting,
            on_error=on_error,
            max_hold=max_hold,
            shared_methods=shared_methods,
            on_missing_key=on_missing_key,
            max_key_length=max_key_length,
            on_acquired=on_acquired,
            on_released=on_released,
            on_rejected=on_rejected,
        )
        self.app = app
        self.key = key
        self._extract = _direct_callable(key)
        self.lock = lock
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self.max_buffered_body = max_buffered_body
        self.busy_response = busy_response
        self.server_timing = server_timing
        self.hooks = hooks = options.hooks
        self._max_key_length = options.max_key_length
        self._hold_options = options.exclusive if options.shared_methods is None else None
        self._plain = (
            not server_timing
            and hooks.on_acquired is None
            and hooks.on_released is None
            and options.exclusive.max_hold is None
        )
        routes = RouteFilter(include, exclude)
        self._routes = routes if routes.active else None
        self._filtered = self.methods is not None or self._routes is not None
        self._reject_missing = options.on_missing_key == "reject"
        # keys.header() itself (not a subclass) in the default setup: __call__ scans inline.
        self._header: bytes | None = (
            key._name
            if type(key) is _keys._Header and not self._filtered and not self._reject_missing
            else None
        )
        # What servers inspect (`app.__call__`) is a true coroutine function on every Python;
        # calling the instance still runs the class's plain `__call__` (special method lookup
        # skips the instance dict).
        setattr(self, "__call__", self._call_as_coroutine)  # noqa: B010 - see above

    async def _call_as_coroutine(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`self.__call__`, for readers of the attribute: the same request, awaited here."""
        await type(self).__call__(self, scope, receive, send)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """A plain `def` that returns the awaitable to run: a request we do not lock gets the
        app's own, with no coroutine of ours in between. Anything raised here is raised when
        the result is awaited, as from an `async def`."""
        try:
            if scope["type"] == "http":
                header = self._header
                if header is None:
                    return self._dispatch(scope, receive, send)
                # keys.header(), no filter, missing key passes: the scan every request pays,
                # done here rather than through the extractor.
                for field, value in scope["headers"]:
                    if field == header:
                        key = value.decode("latin-1")
                        if key:
                            return self._serve(key, scope, receive, send)
                        break
            app = self.app  # an attribute read, not a method lookup that fails first
            return app(scope, receive, send)
        except BaseException as exc:
            return _raise(exc)

    __call__ = mark_coroutine_function(__call__)

    def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """`__call__` for an HTTP request in every other configuration."""
        if self._filtered and not self._covers(scope):
            app = self.app
            return app(scope, receive, send)
        extract = self._extract
        found = extract(scope)
        if type(found) is str and found:
            return self._serve(found, scope, receive, send)
        if found is not None and found != "":
            return self._settle_then_serve(found, scope, receive, send)
        if self._reject_missing:
            return self._reject(scope, receive, send, MISSING_KEY)
        app = self.app
        return app(scope, receive, send)

    def _covers(self, scope: Scope) -> bool:
        """Whether `methods`/`include`/`exclude` select this request (noting template params)."""
        if self.methods is not None and scope["method"] not in self.methods:
            return False
        if self._routes is not None:
            params = self._routes.match(scope)
            if params is None:
                return False
            if params:
                scope[_keys.TEMPLATE_PARAMS] = params
        return True

    async def _settle_then_serve(
        self, pending: _keys.KeyResult, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """An async extractor (or a `str` subclass): settle the key, then serve as usual."""
        key = await _keys._settle_any(pending)
        if key:
            await self._serve(key, scope, receive, send)
        elif self._reject_missing:
            await self._reject(scope, receive, send, MISSING_KEY)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A request with a key: hold it while the app runs."""
        limit = self._max_key_length
        if (len(key) > limit or not key.isprintable()) and not _keys._key_is_valid(key, limit):
            await self._reject(scope, receive, send, INVALID_KEY)
            return
        app = self.app
        lock = self.lock
        if SCOPE_KEY in scope and held_by_outer_layer(scope, lock, key) is not None:
            await app(scope, receive, send)
            return
        options = self._hold_options or self.options.hold_options(scope)
        held = lock.hold(key)  # then this request's options and its scope for observers
        held._options = options
        held.context = scope
        try:
            granted = held._try_enter() is None
        except LockReentryError:
            raise
        except KeyedLockError as exc:
            await self._reject(scope, receive, send, rejection_for(exc))
            return
        if not granted:  # it must queue (or talk to a backend): with a disconnect watcher
            await self._wait_then_run(held, scope, receive, send)
        elif self._plain:
            # The fast path, inline: the key was free, no hook, no header to add.
            records, ours = record(scope, held)
            try:
                await app(scope, receive, send)
            except BaseException as exc:
                try:
                    held._release(exc)
                finally:
                    unrecord(scope, records, held, ours)
                raise
            held._release(None)  # first: nothing the app did to the scope can keep the key
            unrecord(scope, records, held, ours)
        else:
            await self._run(held, scope, receive, send)

    async def _run(self, held: Held, scope: Scope, receive: Receive, send: Send) -> None:
        """Call the app holding the key; release when it returns (or raises).

        With `max_hold` (or an engine lease lost while held), the app is cancelled: answered
        503 if its response had not started, cut off (the exception reaches the server) if it
        had.
        """
        records, ours = record(scope, held)
        hooks = self.hooks
        started = perf_counter() if hooks.on_released is not None else 0.0
        response = ResponseStart(send) if held._revocable else None
        error: BaseException | None = None
        try:
            try:
                if response is not None:
                    held._start_limit()
                if hooks.on_acquired is not None:
                    await hooks.acquired(scope, held)
                app_send = send if response is None else response.send
                if self.server_timing:
                    app_send = _with_server_timing(app_send, held.waited)
                await self.app(scope, receive, app_send)
            except BaseException as exc:
                error = exc
            try:  # release first: nothing the app did to the scope can keep the key held
                if error is None:
                    await held.__aexit__(None, None, None)
                else:
                    await held.__aexit__(type(error), error, error.__traceback__)
            finally:
                if held in records:
                    records.remove(held)
        except HoldExpired as expired:
            cut_off = response is None or response.started
            log_revoked(expired, cut_off)
            if cut_off:
                raise
            await send_rejection(send, rejection_for(expired))
        else:
            if error is not None:
                raise error
        finally:
            if hooks.on_released is not None:
                await hooks.released(scope, held, perf_counter() - started)
            unrecord(scope, records, held, ours)  # the entry stays for the hook to read

    async def _wait_then_run(self, held: Held, scope: Scope, receive: Receive, send: Send) -> None:
        """Queue for the key while a watcher reads `receive()`; run the app once granted."""
        watcher = Watcher(receive, self.max_buffered_body)
        try:
            granted = await enter_watching(watcher, held)  # `max_hold` starts in `_run`
        except LockReentryError:
            raise
        except KeyedLockError as exc:
            if watcher.gone is None:
                await self._reject(scope, watcher.replay(), send, rejection_for(exc))
            return
        if not granted:
            return  # disconnected: the client is gone, the app never sees this request
        await self._run(held, scope, watcher.replay(), send)

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, rejection: Rejection
    ) -> None:
        """Answer without running the app: the user's `busy_response`, or the JSON default."""
        await self.hooks.rejected(scope, rejection)
        if self.busy_response is not None:
            answer = self.busy_response(scope, rejection)
            if inspect.isawaitable(answer):
                answer = await answer
            if answer is not None:
                await answer(scope, receive, send)
                return
        await send_rejection(send, rejection)


def _with_server_timing(send: Send, waited: float) -> Send:
    """Add `Server-Timing: keyedlock;dur=<ms waited>` to the response start."""
    value = f"keyedlock;dur={waited * 1000:.3f}".encode("ascii")

    async def timed_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"server-timing", value)]
            message = {**message, "headers": headers}
        await send(message)

    return timed_send


def _direct_callable(function: _keys.KeyExtractor) -> _keys.KeyExtractor:
    """An object whose class defines `__call__` in Python (every extractor of `keys`): its
    bound method, which the interpreter calls faster than the object itself."""
    if isinstance(inspect.getattr_static(function, "__call__", None), FunctionType):
        method: _keys.KeyExtractor = function.__call__  # type: ignore[operator]
        return method
    return function


def _check_positive_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}")
