"""`IdempotencyMiddleware`: a retried request gets the first one's response, never a second run.

A key found completed in the store is answered from it at once (entries never change once
written). Otherwise the middleware holds the key in a `KeyedLock` with `timeout=0` (a duplicate
in flight gets 409 + Retry-After at once) and looks again before running: the second look, the
run and the store write of one key never interleave with another request's, across workers.
A worker that dies mid-run leaves nothing stored: its lease ends and the retry runs once.
The response is captured as it is sent, never delaying the client.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Literal

import anyio

from ._errors import KeyedLockError
from ._lock import KeyedLock
from ._responses import (
    BODY_TOO_LARGE,
    INVALID_IDEMPOTENCY_KEY,
    KEY_REUSED,
    MISSING_IDEMPOTENCY_KEY,
    NOT_KEPT,
    STORE_UNAVAILABLE,
    rejection_for,
    send_rejection,
)
from ._types import ASGIApp, Message, Receive, Scope, Send
from .keys import DEFAULT_MAX_KEY_LENGTH, KeyExtractor, _key_is_valid, _resolve_key, header
from .stores import IdempotencyStore, MemoryStore, StoredResponse

__all__ = ["IdempotencyMiddleware", "fingerprint"]

logger = logging.getLogger("keyedlock_asgi.idempotency")

OnMissingKey = Literal["pass", "reject"]
REPLAYED = (b"idempotent-replayed", b"true")
LOCK_PREFIX = "idempotency:"


def fingerprint(scope: Scope, body: bytes) -> str:
    """Hex SHA-256 of the request's method, path, query string and the SHA-256 of its body."""
    digest = hashlib.sha256()
    for part in (
        scope["method"].encode("latin-1"),
        scope.get("root_path", "").encode("utf-8", "surrogateescape"),
        scope["path"].encode("utf-8", "surrogateescape"),
        scope.get("query_string", b""),
        hashlib.sha256(body).digest(),
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class _Capture:
    """Forwards the app's messages untouched, keeping a copy of the response as it goes."""

    __slots__ = ("body", "complete", "headers", "keepable", "max_body", "send", "status", "strip")

    def __init__(self, send: Send, max_body: int, strip: frozenset[bytes]) -> None:
        self.send = send
        self.max_body = max_body
        self.strip = strip
        self.status: int | None = None
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.body = bytearray()
        self.complete = False
        self.keepable = True

    async def __call__(self, message: Message) -> None:
        # Copy first: a response the client never got (it left) is still the app's answer.
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = tuple(
                (bytes(name), bytes(value))
                for name, value in message.get("headers", ())
                if bytes(name).lower() not in self.strip
            )
            if message.get("trailers"):
                self.keepable = False
        elif kind == "http.response.body":
            if self.keepable:
                self.body += message.get("body", b"")
                if len(self.body) > self.max_body:
                    self.keepable = False
                    self.body = bytearray()
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.pathsend":
            self.keepable, self.complete = False, True
        else:  # zero-copy send, trailers, ...: not replayable byte for byte
            self.keepable = False
        await self.send(message)

    def stored(self, request_fingerprint: str) -> StoredResponse | None:
        """What to keep: None unless a complete response below 500 was produced."""
        if self.status is None or not self.complete or self.status >= 500:
            return None
        body = bytes(self.body) if self.keepable else None
        return StoredResponse(request_fingerprint, self.status, self.headers, body)


class IdempotencyMiddleware:
    """Pure ASGI: the first request with a key runs and its response is stored; a retry gets
    the stored response (`Idempotent-Replayed: true`) and the app does not run.

    Give `lock` an engine backend and `store` a shared store to hold across workers.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        key: KeyExtractor | None = None,
        store: IdempotencyStore | None = None,
        lock: KeyedLock | None = None,
        methods: Iterable[str] = ("POST", "PATCH"),
        ttl: float = 86_400,
        max_response_body: int = 1 << 20,
        max_request_body: int = 1 << 20,
        on_missing_key: OnMissingKey = "pass",
        keep_set_cookie: bool = False,
        max_key_length: int = DEFAULT_MAX_KEY_LENGTH,
    ) -> None:
        if on_missing_key not in ("pass", "reject"):
            raise ValueError("on_missing_key must be 'pass' or 'reject'")
        if not ttl > 0:
            raise ValueError("ttl must be > 0 seconds")
        if max_response_body < 0 or max_request_body < 0 or max_key_length < 1:
            raise ValueError("max_response_body, max_request_body and max_key_length: >= 0, >= 1")
        self.app = app
        self.key = key if key is not None else header("Idempotency-Key")
        self.store: IdempotencyStore = store if store is not None else MemoryStore()
        self.lock = lock if lock is not None else KeyedLock()
        self.methods = frozenset(method.upper() for method in methods)
        self.ttl = float(ttl)
        self.max_response_body = max_response_body
        self.max_request_body = max_request_body
        self.on_missing_key: OnMissingKey = on_missing_key
        self.keep_set_cookie = keep_set_cookie
        self.max_key_length = max_key_length
        self._strip = frozenset() if keep_set_cookie else frozenset({b"set-cookie"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        key = await _resolve_key(self.key, scope)
        if key is None:
            if self.on_missing_key == "reject":
                await send_rejection(send, MISSING_IDEMPOTENCY_KEY)
            else:
                await self.app(scope, receive, send)
            return
        if not _key_is_valid(key, self.max_key_length):
            await send_rejection(send, INVALID_IDEMPOTENCY_KEY)
            return
        # The whole body first: the fingerprint needs it, and a slow upload holds no key.
        body = await self._read_body(receive)
        if body is None:
            return  # the client left
        if len(body) > self.max_request_body:
            await send_rejection(send, BODY_TOO_LARGE)
            return
        request_fingerprint = fingerprint(scope, body)
        # A completed key is answered without the lock (entries never change once written), so
        # duplicates after completion are replayed concurrently, never refused as in flight.
        if await self._answered_from_store(send, key, request_fingerprint):
            return
        entered = False
        try:
            async with self.lock.hold(LOCK_PREFIX + key, timeout=0):
                entered = True
                # Again, holding the key: it may have completed since the first look.
                if await self._answered_from_store(send, key, request_fingerprint):
                    return
                await self._run(scope, _replay_body(body, receive), send, key, request_fingerprint)
        except KeyedLockError as exc:
            if entered:
                raise  # raised after the run (a lost lease): the response is already out
            await send_rejection(send, rejection_for(exc))

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks += message.get("body", b"")
            if len(chunks) > self.max_request_body or not message.get("more_body", False):
                return bytes(chunks)

    async def _answered_from_store(self, send: Send, key: str, request_fingerprint: str) -> bool:
        """Answer from the store if `key` completed (replay, 422 or 409); False if it did not.
        An unreadable store is answered 503: running without it could run a request twice."""
        try:
            found = await self.store.get(key)
        except Exception:
            logger.warning("idempotency store read failed", exc_info=True)
            await send_rejection(send, STORE_UNAVAILABLE)
            return True
        if found is None:
            return False
        if found.fingerprint != request_fingerprint:
            await send_rejection(send, KEY_REUSED)
        elif found.body is None:
            await send_rejection(send, NOT_KEPT)
        else:
            await _replay(send, found)
        return True

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, key: str, request_fingerprint: str
    ) -> None:
        """Holding the key, nothing stored: run the app, keeping its response as it is sent."""
        capture = _Capture(send, self.max_response_body, self._strip)
        try:
            await self.app(scope, receive, capture)
        finally:
            stored = capture.stored(request_fingerprint)
            if stored is not None:
                await self._keep(key, stored)

    async def _keep(self, key: str, stored: StoredResponse) -> None:
        # Shielded: once the app answered, a cancellation must not turn a retry into a second
        # run. The store's own timeouts bound the write (redis-py's socket_timeout, asyncpg's
        # command_timeout).
        with anyio.CancelScope(shield=True):
            try:
                await self.store.put(key, stored, self.ttl)
            except Exception:
                logger.error(
                    "idempotency store write failed: a retry will run again", exc_info=True
                )


def _replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read already, then the real channel."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _replay(send: Send, stored: StoredResponse) -> None:
    headers = [*stored.headers, REPLAYED]
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": stored.body or b"", "more_body": False})
