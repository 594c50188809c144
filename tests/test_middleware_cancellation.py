"""The middleware when the request itself is cancelled or misused: no key is ever stranded."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, LockReentryError, keys
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


def http_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "method": "POST", "path": path, "root_path": "",
        "headers": [(b"x-k", b"A")], "query_string": b"",
    }  # fmt: skip


async def send(message: Any) -> None:
    pass


async def never_receives() -> dict[str, Any]:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def test_cancelled_from_outside_right_after_the_grant_releases_the_key() -> None:
    """Regression: the watcher's shutdown is a checkpoint; a cancel landing there kept the key."""
    lock = KeyedLock()
    first_in, release_first = anyio.Event(), anyio.Event()
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        if scope["path"] == "/first":
            first_in.set()
            await release_first.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = KeyedLockMiddleware(app, key=keys.header("x-k"), lock=lock)
    outer = anyio.CancelScope()
    body_sent = False

    async def second_receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"x", "more_body": False}
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            outer.cancel()  # only happens once the key was granted: the request is cancelled
            raise
        raise AssertionError("unreachable")

    async def second() -> None:
        with outer:
            await middleware(http_scope("/second"), second_receive, send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(middleware, http_scope("/first"), never_receives, send)
        await first_in.wait()
        tg.start_soon(second)
        await wait_until(lambda: lock.waiting("A") == 1, 'lock.waiting("A") == 1')
        release_first.set()
    assert outer.cancel_called
    assert calls == ["/first"]
    assert lock.stats().active_keys == 0


class _Lease:
    token = 1

    async def release(self) -> None:
        pass


class _AlwaysGrants:
    """The smallest engine: enough to send every request down the waiting path."""

    async def acquire(self, key: str, *, timeout: float | None, max_concurrency: int) -> _Lease:
        return _Lease()

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("with_backend", [False, True], ids=["in-process", "backend"])
async def test_reentry_surfaces_as_itself_on_every_path(with_backend: bool) -> None:
    lock = KeyedLock(backend=_AlwaysGrants()) if with_backend else KeyedLock()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("must not run")

    middleware = KeyedLockMiddleware(app, key=keys.header("x-k"), lock=lock)
    async with lock.hold("A"):  # this task already holds A (e.g. calling a sub-app)
        with pytest.raises(LockReentryError):
            await middleware(http_scope("/"), never_receives, send)
    assert lock.stats().active_keys == 0
