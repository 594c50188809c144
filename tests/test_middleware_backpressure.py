"""Backpressure over a real socket: a 4 MiB body queued behind a holder reaches the app whole.

The middleware buffers at most `max_buffered_body` (1 MiB by default) while a request waits,
then stops reading; uvicorn's flow control holds the rest of the upload back until the app
reads it. The status never depends on whether the request queued.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from tests.support.server import uvicorn_server
from tests.support.waiting import wait_until

# -- the app uvicorn serves (imported by the server process) -----------------------------------

lock = KeyedLock()
state: dict[str, Any] = {"inside": False, "read": 0, "read_at_release": None}
events: dict[str, anyio.Event] = {}


def release_event() -> anyio.Event:
    return events.setdefault("release", anyio.Event())


async def hold(request: Request) -> Response:
    state["inside"] = True
    await release_event().wait()
    return PlainTextResponse("held")


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})


async def status(request: Request) -> Response:
    return JSONResponse({**state, "waiting": lock.waiting("big")})


async def release(request: Request) -> Response:
    state["read_at_release"] = state["read"]
    release_event().set()
    return PlainTextResponse("released")


def count_echo_body(app: Any) -> Any:
    """Outside the lock: count the body bytes the server has handed to `/echo` so far."""

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/echo":
            await app(scope, receive, send)
            return

        async def counting() -> Any:
            message = await receive()
            state["read"] += len(message.get("body", b""))
            return message

        await app(scope, counting, send)

    return counted


inner = Starlette(
    routes=[
        Route("/hold", hold, methods=["POST"]),
        Route("/echo", echo, methods=["POST"]),
        Route("/state", status),
        Route("/release", release, methods=["POST"]),
    ],
    middleware=[
        Middleware(
            KeyedLockMiddleware, lock=lock, key=keys.header("x-key"), include=["/hold", "/echo"]
        )
    ],
)
app = count_echo_body(inner)

# -- the test -----------------------------------------------------------------------------------

BODY = os.urandom(4 * 1024 * 1024)


async def poll(http: httpx.AsyncClient, what: str, ready: Any) -> dict[str, Any]:
    """The server's `/state` once `ready(state)` holds (it lives in the server process)."""

    async def found() -> dict[str, Any] | None:
        state: dict[str, Any] = (await http.get("/state")).json()
        return state if ready(state) else None

    result: dict[str, Any] = await wait_until(found, what, limit=30)
    return result


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn serves on asyncio anyway
async def test_a_4_mib_body_queued_behind_a_holder_reaches_the_app_byte_exact() -> None:
    with uvicorn_server("tests.test_middleware_backpressure:app") as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            results: dict[str, httpx.Response] = {}

            async def call(name: str, path: str, body: bytes) -> None:
                results[name] = await http.post(path, content=body, headers={"x-key": "big"})

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "holder", "/hold", b"")
                await poll(http, "holder inside", lambda s: s["inside"])
                tg.start_soon(call, "big", "/echo", BODY)
                await poll(http, "big queued", lambda s: s["waiting"] == 1)
                # The watcher has read past its 1 MiB limit: from here on it reads nothing.
                await poll(http, "1 MiB buffered", lambda s: s["read"] >= 1024 * 1024)
                await http.post("/release")
            final = (await http.get("/state")).json()
    assert results["holder"].status_code == 200
    assert results["big"].status_code == 200
    assert results["big"].json() == {
        "length": len(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(),
    }
    # While queued, the request's body was read only up to the limit (plus one chunk).
    assert 1024 * 1024 <= final["read_at_release"] < len(BODY)
    assert final["waiting"] == 0
