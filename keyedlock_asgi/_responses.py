"""The HTTP answer for each reason a request is not served: one table, shared by every layer."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from ._errors import (
    BackendUnavailable,
    HoldExpired,
    KeyedLockError,
    LockAborted,
    LockBusy,
    LockClosed,
    LockTimeout,
    QueueFull,
)
from ._types import Message, Send

__all__ = ["ResponseStart", "Rejection", "log_revoked", "rejection_for", "send_rejection"]

logger = logging.getLogger("keyedlock_asgi")


@dataclass(frozen=True)
class Rejection:
    """Why a request was not served and how to tell the client. Never carries the key."""

    reason: str
    """Machine-readable: busy, aborted, queue_full, timeout, backend_unavailable, closed,
    expired, missing_key, invalid_key, body_too_large; for idempotent requests also
    key_reused, not_kept, store_unavailable."""
    status: int
    detail: str
    retry_after: int | None
    """Whole seconds, at least 1; None when retrying cannot help."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Raw ASGI headers for the response (with its JSON body)."""
        body = self.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode("ascii")))
        return headers

    def body(self) -> bytes:
        return json.dumps({"detail": self.detail}).encode("utf-8")


_BY_ERROR: dict[type[KeyedLockError], tuple[str, int, str]] = {
    LockBusy: ("busy", 409, "Another request with the same key is in progress."),
    LockAborted: ("aborted", 409, "A request with the same key failed; this one was aborted."),
    QueueFull: ("queue_full", 429, "Too many requests with the same key are waiting."),
    LockTimeout: ("timeout", 503, "Timed out waiting for a request with the same key."),
    BackendUnavailable: ("backend_unavailable", 503, "The lock service is unavailable."),
    LockClosed: ("closed", 503, "The server is shutting down; try again."),
    HoldExpired: ("expired", 503, "The request held its lock for too long and was stopped."),
}

MISSING_KEY = Rejection("missing_key", 400, "This request needs a lock key and has none.", None)
INVALID_KEY = Rejection("invalid_key", 400, "The request's lock key is invalid.", None)
BODY_TOO_LARGE = Rejection(  # IdempotencyMiddleware's max_request_body; never a queued request
    "body_too_large", 413, "The request body is too large.", None
)

# Idempotent requests (IdempotencyMiddleware); a duplicate still in flight gets LockBusy's 409.
MISSING_IDEMPOTENCY_KEY = Rejection(
    "missing_key", 400, "This request needs an Idempotency-Key.", None
)
INVALID_IDEMPOTENCY_KEY = Rejection("invalid_key", 400, "The Idempotency-Key is invalid.", None)
KEY_REUSED = Rejection(
    "key_reused", 422, "This Idempotency-Key was already used for a different request.", None
)
NOT_KEPT = Rejection(
    "not_kept",
    409,
    "A request with this Idempotency-Key was already processed; its response was not kept.",
    None,
)
STORE_UNAVAILABLE = Rejection("store_unavailable", 503, "The idempotency store is unavailable.", 1)


def retry_after_seconds(hint: float | None) -> int:
    """`Retry-After` in whole seconds, at least 1."""
    if hint is None or not math.isfinite(hint):
        return 1
    return max(1, math.ceil(hint))


def rejection_for(error: KeyedLockError) -> Rejection:
    """The answer for a lock error (a subclass maps like its nearest listed base)."""
    for cls in type(error).__mro__:
        found = _BY_ERROR.get(cls)
        if found is not None:
            reason, status, detail = found
            return Rejection(reason, status, detail, retry_after_seconds(error.retry_after))
    raise TypeError(f"no HTTP answer for {type(error).__name__}")


async def send_rejection(send: Send, rejection: Rejection) -> None:
    """Send the whole response for `rejection` through an ASGI `send`."""
    await send(
        {"type": "http.response.start", "status": rejection.status, "headers": rejection.headers()}
    )
    await send({"type": "http.response.body", "body": rejection.body(), "more_body": False})


class ResponseStart:
    """An ASGI `send` that notes whether the response has started (its headers went out): a
    revoked hold is answered 503 before that, and cut off after."""

    __slots__ = ("_send", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def log_revoked(expired: HoldExpired, cut_off: bool | None) -> None:
    """The warning every HTTP layer logs for a hold revoked under a running request.
    `cut_off`: whether the response had started (None: the layer cannot tell)."""
    logger.warning(
        "a request's hold was revoked (%s) and the request cancelled%s",
        expired,
        _CUT_OFF[cut_off],
    )


_CUT_OFF = {
    True: "; response cut off",
    False: "",
    None: "; answered 503, or cut off if its response had started",
}
