"""While a request queues for its key: read `receive()` to notice the client leaving.

One implementation for every HTTP layer (the middleware and the per-route forms). The watcher
buffers body chunks that arrive while the request waits and hands them to the app, in order,
once the key is granted. It buffers at most `limit` bytes (plus the chunk that crossed it): past
that it stops reading and the wait goes on; the server's flow control then holds the client
back, and the app reads the rest of the body straight from the server. No status code depends
on whether a request queued.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import anyio

from ._lock import Held
from ._types import Message, Receive

__all__ = ["DEFAULT_MAX_BUFFERED_BODY", "Watcher", "enter_watching"]

DEFAULT_MAX_BUFFERED_BODY = 1024 * 1024


class Watcher:
    """Reads one request's `receive()` while it waits; `gone` says whether the client left."""

    __slots__ = ("buffered", "gone", "limit", "messages", "receive", "stopped")

    def __init__(self, receive: Receive, limit: int = DEFAULT_MAX_BUFFERED_BODY) -> None:
        self.receive = receive
        self.limit = limit
        self.messages: deque[Message] = deque()
        self.buffered = 0
        self.stopped = False
        """Whether reading stopped at the buffer limit (the rest of the body is unread)."""
        self.gone: Literal["disconnected"] | Exception | None = None
        """`"disconnected"`, the exception the server's `receive()` raised, or None."""

    async def watch(self, cancel_scope: anyio.CancelScope) -> None:
        """Read until the client leaves (then cancel the wait) or the buffer is full."""
        receive = self.receive
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.gone = "disconnected"
                    break
                self.messages.append(message)
                self.buffered += len(message.get("body", b""))
                if self.buffered >= self.limit and message.get("more_body", False):
                    # Backpressure: leave the rest of the body with the server, keep waiting.
                    self.stopped = True
                    return
        except Exception as exc:  # the server's receive failed: give up waiting, re-raise after
            self.gone = exc
        cancel_scope.cancel()

    def replay(self) -> Receive:
        """A `receive` that returns the buffered messages first, in order, then the real ones."""
        messages = self.messages
        receive = self.receive
        if not messages:
            return receive

        async def replay() -> Message:
            if messages:
                return messages.popleft()
            return await receive()

        return replay


async def enter_watching(watcher: Watcher, held: Held) -> bool:
    """Wait for `held` while `watcher` reads the request; False when the client left first.

    A grant that comes at the very moment the client leaves (or while this task is cancelled
    from outside) is given back at once, so nothing stays held for a request that will not
    run. The exception the server's `receive()` raised comes first, then the lock's own (busy,
    timeout, ...), neither wrapped in an exception group.
    """
    entered = False
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.watch, tg.cancel_scope)
            try:
                # Without `max_hold`'s limit: a cancel scope must not be entered inside this
                # task group; the caller starts it once the group is left.
                await held._acquire()
                entered = True
            except Exception as exc:
                failure = exc
            tg.cancel_scope.cancel()
    except BaseException:
        if entered:  # cancelled from outside just as it was granted: never keep the key
            with anyio.CancelScope(shield=True):
                await held.__aexit__(None, None, None)
        raise
    gone = watcher.gone
    if gone is not None and entered:  # granted as the client left: hand the key on at once
        await held.__aexit__(None, None, None)
    if isinstance(gone, Exception):
        raise gone
    if failure is not None:
        raise failure
    return gone is None and entered
