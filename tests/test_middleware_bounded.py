"""The middleware under `max_hold` and `drain()`: a hanging app never keeps its key, and a
closing lock answers 503 with Retry-After (asyncio and trio, recorded order)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from keyedlock_asgi import HoldExpired, KeyedLock, KeyedLockMiddleware, keys
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

Message = dict[str, Any]


def scope_for(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": [(b"x-user", b"u1")]}


def receiver() -> Any:
    """A server's `receive`: the (empty) body once, then nothing until the client leaves."""
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


async def call(app: Any, path: str) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope_for(path), receiver(), send)
    return sent


def status_and_headers(sent: list[Message]) -> tuple[int, dict[bytes, bytes]]:
    start = sent[0]
    return start["status"], dict(start["headers"])


async def test_an_app_hanging_before_its_response_gets_503_and_the_key_moves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = KeyedLock()
    order: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hang":
            order.append("hang in")
            try:
                await anyio.sleep_forever()
            finally:
                order.append("hang unwound")
        order.append("next in")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = KeyedLockMiddleware(app, key=keys.header("x-user"), lock=lock, max_hold=0.2)
    results: dict[str, list[Message]] = {}

    async def run(path: str) -> None:
        results[path] = await call(wrapped, path)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "/hang")
        await wait_until(lambda: lock.locked("u1"), "lock.locked('u1')")
        tg.start_soon(run, "/next")
        await wait_until(lambda: lock.waiting("u1") == 1, "lock.waiting('u1') == 1")
    status, headers = status_and_headers(results["/hang"])
    assert status == 503
    assert int(headers[b"retry-after"]) >= 1
    assert status_and_headers(results["/next"])[0] == 200
    assert order == ["hang in", "hang unwound", "next in"]  # never two inside
    assert "max_hold" in caplog.text
    assert lock.stats().active_keys == 0


async def test_an_app_hanging_after_its_response_started_is_cut_off() -> None:
    lock = KeyedLock()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await anyio.sleep_forever()  # a stream that never ends

    wrapped = KeyedLockMiddleware(app, key=keys.header("x-user"), lock=lock, max_hold=0.1)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(HoldExpired):  # the server closes the connection
        await wrapped(scope_for("/stream"), receiver(), send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert lock.stats().active_keys == 0


async def test_a_draining_lock_answers_503_with_retry_after() -> None:
    lock = KeyedLock()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = KeyedLockMiddleware(app, key=keys.header("x-user"), lock=lock)
    assert status_and_headers(await call(wrapped, "/"))[0] == 200
    await lock.drain()
    status, headers = status_and_headers(await call(wrapped, "/"))
    assert status == 503
    assert headers[b"retry-after"] == b"1"
