"""Per-route forms over a real socket: a queued request whose client leaves never runs.

One uvicorn process serves every form: the Starlette decorator (a Starlette app mounted in the
FastAPI one), the decorator on a FastAPI path operation, `lock.depends` in `dependencies=[...]`
with the body left to the endpoint, and `lock.depends` on an endpoint whose body FastAPI reads
before the dependency runs (then only `http.disconnect` is left to watch). For each: a holder
holds the key, a second client sends its request and closes the connection while queued, the
holder is released; the second request's endpoint ran 0 times, and a third request that queued
with a body reads it whole.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyedlock_asgi import KeyedLock
from tests.support.middleware import RawRequest
from tests.support.server import uvicorn_server
from tests.support.waiting import wait_until

# -- the app uvicorn serves (imported by the server process) -----------------------------------

FORMS = {
    "starlette-decorator": "/s/dec",
    "fastapi-decorator": "/f/dec",
    "fastapi-depends": "/f/dep",
    "fastapi-depends-body-param": "/f/body",
}

lock = KeyedLock()
calls: Counter[str] = Counter()
inside: set[str] = set()
gates: dict[str, anyio.Event] = {}


def gate(form: str) -> anyio.Event:
    return gates.setdefault(form, anyio.Event())


async def run(form: str, name: str, body: bytes) -> dict[str, Any]:
    """Every endpoint: count the call; the holder waits for its gate; answer the body's hash."""
    calls[f"{form}:{name}"] += 1
    if name == "holder":
        inside.add(form)
        await gate(form).wait()
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@lock.serialize("starlette-decorator")
async def starlette_endpoint(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(await run("starlette-decorator", request.query_params["n"], body))


class Payload(BaseModel):
    data: str


app = FastAPI()
app.mount("/s", Starlette(routes=[Route("/dec", starlette_endpoint, methods=["POST"])]))


@app.post("/f/dec")
@lock.serialize("fastapi-decorator")
async def fastapi_decorated(request: Request, n: str) -> dict[str, Any]:
    return await run("fastapi-decorator", n, await request.body())


@app.post("/f/dep", dependencies=[lock.depends("fastapi-depends")])
async def fastapi_depends(request: Request, n: str) -> dict[str, Any]:
    return await run("fastapi-depends", n, await request.body())


@app.post("/f/body", dependencies=[lock.depends("fastapi-depends-body-param")])
async def fastapi_body_param(payload: Payload, n: str) -> dict[str, Any]:
    return await run("fastapi-depends-body-param", n, payload.data.encode())


@app.post("/release/{form}")
async def release(form: str) -> dict[str, str]:
    gate(form).set()
    return {}


@app.get("/state/{form}")
async def state(form: str) -> dict[str, Any]:
    return {
        "inside": form in inside,
        "waiting": lock.waiting(form),
        "calls": {k.split(":", 1)[1]: v for k, v in calls.items() if k.startswith(f"{form}:")},
        "active_keys": lock.stats().active_keys,
    }


# -- the test -----------------------------------------------------------------------------------


JSON = "application/json"


def body_for(form: str, size: int) -> tuple[bytes, bytes]:
    """(what to send, what the endpoint reads): a JSON payload for the body-param form."""
    data = b"x" * size
    if form == "fastapi-depends-body-param":
        return b'{"data": "' + data + b'"}', data
    return data, data


async def poll(http: httpx.AsyncClient, form: str, what: str, ready: Any) -> dict[str, Any]:
    """The server's state once `ready(state)` holds (it lives in the server process)."""

    async def found() -> dict[str, Any] | None:
        state: dict[str, Any] = (await http.get(f"/state/{form}")).json()
        return state if ready(state) else None

    result: dict[str, Any] = await wait_until(found, what, limit=30)
    return result


@pytest.fixture(scope="module")
def base_url() -> Any:
    with uvicorn_server("tests.test_route_guard_disconnect:app") as url:
        yield url


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn serves on asyncio anyway
@pytest.mark.parametrize("form", sorted(FORMS))
async def test_a_queued_request_whose_client_left_never_runs(base_url: str, form: str) -> None:
    path = FORMS[form]
    host, port = base_url.removeprefix("http://").split(":")
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        results: dict[str, httpx.Response] = {}

        async def call(name: str, body: bytes) -> None:
            results[name] = await http.post(
                path, params={"n": name}, content=body, headers={"content-type": JSON}
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "holder", body_for(form, 1)[0])
            await poll(http, form, "holder inside", lambda s: s["inside"])

            # The leaver: a whole request on a raw connection, closed while it queues.
            sent, _ = body_for(form, 5)
            leaver = await anyio.connect_tcp(host, int(port))
            await leaver.send(
                f"POST {path}?n=leaver HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: {JSON}\r\nContent-Length: {len(sent)}\r\n\r\n".encode()
                + sent
            )
            await poll(http, form, "leaver queued", lambda s: s["waiting"] == 1)
            await leaver.aclose()
            await poll(http, form, "leaver left the queue", lambda s: s["waiting"] == 0)

            # A request that queues with a body and runs reads all of it.
            runner_sent, runner_read = body_for(form, 300_000)
            tg.start_soon(call, "runner", runner_sent)
            await poll(http, form, "runner queued", lambda s: s["waiting"] == 1)
            await http.post(f"/release/{form}")
        final = await poll(http, form, "idle", lambda s: s["active_keys"] == 0)
    assert results["holder"].status_code == 200
    assert results["runner"].status_code == 200
    assert results["runner"].json() == {
        "length": len(runner_read),
        "sha256": hashlib.sha256(runner_read).hexdigest(),
    }
    assert final["calls"] == {"holder": 1, "runner": 1}  # the leaver's endpoint never ran
    assert final["waiting"] == 0


# -- the same in process, on asyncio and trio ----------------------------------------------------


@pytest.mark.anyio
async def test_in_process_a_leaver_never_runs_and_a_runner_reads_its_whole_body() -> None:
    """The Starlette decorator driven by raw ASGI messages: the leaver disconnects while queued
    (after one body chunk was read); the runner's chunks read while queued reach the endpoint
    first, in order."""
    local = KeyedLock()
    ran: list[tuple[str, bytes]] = []
    holding, release_holder = anyio.Event(), anyio.Event()

    @local.serialize("k")
    async def endpoint(request: Request) -> Response:
        name = request.query_params["n"]
        body = await request.body()
        ran.append((name, body))
        if name == "holder":
            holding.set()
            await release_holder.wait()
        return JSONResponse({"length": len(body)})

    served = Starlette(routes=[Route("/", endpoint, methods=["POST"])])

    def request(name: str) -> RawRequest:
        raw = RawRequest([])
        raw.scope["query_string"] = f"n={name}".encode()
        return raw

    holder, leaver, runner = request("holder"), request("leaver"), request("runner")
    holder.push({"type": "http.request", "body": b"h", "more_body": False})
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run, served)
        await holding.wait()
        tg.start_soon(leaver.run, served)
        await wait_until(lambda: local.waiting("k") == 1, "leaver queued")
        leaver.push({"type": "http.request", "body": b"part", "more_body": True})
        await wait_until(lambda: leaver.received == 1, "leaver's chunk read while queued")
        leaver.disconnect.set()
        await leaver.done.wait()
        assert local.waiting("k") == 0
        tg.start_soon(runner.run, served)
        await wait_until(lambda: local.waiting("k") == 1, "runner queued")
        runner.push({"type": "http.request", "body": b"one,", "more_body": True})
        runner.push({"type": "http.request", "body": b"two", "more_body": False})
        await wait_until(lambda: runner.received == 2, "runner's chunks read while queued")
        release_holder.set()
    assert ran == [("holder", b"h"), ("runner", b"one,two")]
    assert leaver.sent == []
    assert runner.status == 200
    assert local.stats().active_keys == 0


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["depends", "decorator"])
async def test_in_process_fastapi_leaver_never_runs_and_runner_reads_its_body(form: str) -> None:
    """`lock.depends` and the decorator on FastAPI, driven by raw ASGI messages: the leaver
    disconnects while queued and is answered nothing that reaches it (499 to a gone client),
    its endpoint never runs; the runner's chunks read while queued reach the endpoint."""
    local = KeyedLock()
    ran: list[tuple[str, bytes]] = []
    holding, release_holder = anyio.Event(), anyio.Event()
    served = FastAPI()

    async def work(request: Request, n: str) -> dict[str, int]:
        body = await request.body()
        ran.append((n, body))
        if n == "holder":
            holding.set()
            await release_holder.wait()
        return {"length": len(body)}

    if form == "depends":
        served.post("/", dependencies=[local.depends("k")])(work)
    else:
        served.post("/")(local.serialize("k")(work))

    def request(name: str) -> RawRequest:
        raw = RawRequest([])
        raw.scope["query_string"] = f"n={name}".encode()
        return raw

    holder, leaver, runner = request("holder"), request("leaver"), request("runner")
    holder.push({"type": "http.request", "body": b"h", "more_body": False})
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run, served)
        await holding.wait()
        tg.start_soon(leaver.run, served)
        await wait_until(lambda: local.waiting("k") == 1, "leaver queued")
        leaver.disconnect.set()
        await leaver.done.wait()
        assert local.waiting("k") == 0
        tg.start_soon(runner.run, served)
        await wait_until(lambda: local.waiting("k") == 1, "runner queued")
        runner.push({"type": "http.request", "body": b"one,", "more_body": True})
        runner.push({"type": "http.request", "body": b"two", "more_body": False})
        await wait_until(lambda: runner.received == 2, "runner's chunks read while queued")
        release_holder.set()
    assert ran == [("holder", b"h"), ("runner", b"one,two")]
    assert leaver.status == 499
    assert runner.status == 200
    assert local.stats().active_keys == 0
