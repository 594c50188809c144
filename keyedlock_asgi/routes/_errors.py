"""Rejections of the per-route forms as Starlette HTTP exceptions, and what the app handles.

A per-route rejection is raised as an `HTTPException` so it takes the framework's usual
exception path and the app's own handlers apply. One wrinkle: Starlette's built-in handler
renders `HTTPException` as plain text, FastAPI's as `{"detail": ...}` JSON. Where Starlette's
built-in handler would render ours, the decorator sends the same JSON response as the middleware
instead (see `renders_by_default`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware

if TYPE_CHECKING:
    from .._responses import Rejection
    from .._types import Scope
    from ._guard import Rejected

__all__ = ["LockRejected", "handler_for", "is_failure", "renders_by_default"]


class LockRejected(HTTPException):
    """A per-route lock answered this request (busy, queue full, timed out, no or bad key).

    `rejection` has the reason; `__cause__` is the lock's error, if any.
    """

    rejection: Rejection


def to_http(rejected: Rejected, cls: type[LockRejected] = LockRejected) -> LockRejected:
    """The HTTP exception for a guard's rejection, chained to the lock's error."""
    rejection = rejected.rejection
    headers = None
    if rejection.retry_after is not None:
        headers = {"Retry-After": str(rejection.retry_after)}
    exc = cls(rejection.status, rejection.detail, headers)
    exc.rejection = rejection
    exc.__cause__ = rejected.__cause__
    return exc


def handler_for(scope: Scope, exc: BaseException) -> Any:
    """The exception handler the app would use for `exc` (as Starlette looks it up), or None."""
    try:
        exception_handlers, status_handlers = scope["starlette.exception_handlers"]
    except KeyError:
        return None
    if isinstance(exc, HTTPException):
        handler = status_handlers.get(exc.status_code)
        if handler is not None:
            return handler
    for cls in type(exc).__mro__:
        if cls in exception_handlers:
            return exception_handlers[cls]
    return None


def renders_by_default(scope: Scope, exc: HTTPException) -> bool:
    """Whether nobody but Starlette's built-in plain-text handler (or no handler) would
    answer `exc`: then the guard sends its JSON answer itself."""
    handler = handler_for(scope, exc)
    if handler is None:
        return True
    return getattr(handler, "__func__", None) is ExceptionMiddleware.http_exception


def is_failure(scope: Scope, exc: BaseException) -> bool:
    """Whether an exception leaving the endpoint counts as the holder failing (for
    `on_error="stop"`). One the app turns into a response (an `HTTPException`, or anything
    with a registered handler) does not, exactly as for the middleware, which sees a response."""
    if isinstance(exc, GeneratorExit):  # a dependency closed without an error
        return False
    return not isinstance(exc, Exception) or handler_for(scope, exc) is None
