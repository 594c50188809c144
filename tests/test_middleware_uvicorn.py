"""End to end: a real uvicorn on 127.0.0.1, 100 same-key and 100 different-key requests."""

from __future__ import annotations

import itertools
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

# -- the app uvicorn serves (imported by the server process) -----------------------------------

lock = KeyedLock()
events: list[tuple[int, str, str]] = []
clock = itertools.count()


async def work(request: Request) -> Response:
    key = request.headers["x-key"]
    events.append((next(clock), "in", key))
    await anyio.sleep(0.002)  # let other requests in, if the lock would allow them
    events.append((next(clock), "out", key))
    return PlainTextResponse("done")


async def log(request: Request) -> Response:
    return JSONResponse({"events": events, "active_keys": lock.stats().active_keys})


app = Starlette(
    routes=[Route("/work", work, methods=["POST"]), Route("/log", log)],
    middleware=[
        Middleware(KeyedLockMiddleware, lock=lock, key=keys.header("x-key"), include=["/work"])
    ],
)

# -- the test -----------------------------------------------------------------------------------


def intervals(recorded: list[list[Any]]) -> dict[str, list[tuple[int, int]]]:
    """Per key, the (entry, exit) clock ticks of each request, in entry order."""
    opened: dict[str, list[int]] = {}
    closed: dict[str, list[tuple[int, int]]] = {}
    for tick, kind, key in recorded:
        if kind == "in":
            opened.setdefault(key, []).append(tick)
        else:
            closed.setdefault(key, []).append((opened[key].pop(0), tick))
    return closed


@pytest.mark.anyio
# uvicorn serves on asyncio whatever the client runs on: a trio client would test nothing more.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_same_key_never_overlaps_different_keys_do() -> None:
    # A long keep-alive: on a busy machine the run can outlast uvicorn's 5 s default, and a
    # pooled connection closed by the server just as it is reused is not what we test here.
    keep_alive = ("--timeout-keep-alive", "120")
    with uvicorn_server("tests.test_middleware_uvicorn:app", extra_args=keep_alive) as base_url:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:
            statuses: list[int] = []

            async def call(key: str) -> None:
                response = await http.post("/work", headers={"x-key": key})
                statuses.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for index in range(100):
                    tg.start_soon(call, "same")
                    tg.start_soon(call, f"other-{index}")
            recorded = (await http.get("/log")).json()
    assert statuses == [200] * 200
    assert recorded["active_keys"] == 0
    spans = intervals(recorded["events"])
    same = sorted(spans["same"])
    assert len(same) == 100
    for (_, exit_tick), (next_entry, _) in itertools.pairwise(same):
        assert next_entry > exit_tick  # each same-key request entered after the previous left
    others = sorted(span for key, found in spans.items() if key != "same" for span in found)
    assert len(others) == 100
    overlapping = sum(
        1 for (_, exit_a), (entry_b, _) in itertools.pairwise(others) if entry_b < exit_a
    )
    assert overlapping > 0  # different keys were inside at the same time
