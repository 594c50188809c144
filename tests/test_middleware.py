"""KeyedLockMiddleware: what is serialized, how long the key is held, how requests are refused."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from keyedlock_asgi import Held, KeyedLock, KeyedLockMiddleware, Rejection, keys
from tests.support.middleware import Gated, RawRequest, client
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


def gated_app(gated: Gated, lock: KeyedLock, **options: Any) -> Starlette:
    options.setdefault("key", keys.header("x-user"))
    return Starlette(
        routes=[Route("/", gated.endpoint, methods=["GET", "POST"])],
        middleware=[Middleware(KeyedLockMiddleware, lock=lock, **options)],
    )


# -- 1. what is serialized ----------------------------------------------------------------------


async def test_same_key_serialized_other_keys_in_parallel() -> None:
    lock, gated = KeyedLock(), Gated()
    app = gated_app(gated, lock)
    results: dict[str, Any] = {}
    async with client(app) as http, anyio.create_task_group() as tg:

        async def call(name: str, user: str) -> None:
            response = await http.get("/", params={"n": name}, headers={"x-user": user})
            results[name] = response.json()

        tg.start_soon(call, "a1", "alice")
        await gated.entered("a1").wait()
        tg.start_soon(call, "a2", "alice")
        await wait_until(lambda: lock.waiting("alice") == 1, "a2 queued")
        tg.start_soon(call, "b1", "bob")
        await gated.entered("b1").wait()  # bob runs while alice's first request is inside
        assert gated.names_in("in") == ["a1", "b1"]
        gated.gate("a2").set()
        gated.gate("b1").set()
        gated.gate("a1").set()
    log = gated.log
    assert log.index(("in", "a2")) > log.index(("out", "a1"))
    assert log.index(("in", "b1")) < log.index(("out", "a1"))
    assert results["a2"]["held"][0]["waited"] > 0
    assert results["a1"]["held"][0]["token"] < results["a2"]["held"][0]["token"]
    assert lock.stats().active_keys == 0


@pytest.mark.parametrize(
    ("options", "request_options"),
    [
        ({}, {}),  # no key header
        ({"methods": ["POST"]}, {"headers": {"x-user": "alice"}}),  # GET not covered
        ({"include": ["/only"]}, {"headers": {"x-user": "alice"}}),  # path not included
        ({"exclude": ["/"]}, {"headers": {"x-user": "alice"}}),  # path excluded
    ],
)
async def test_requests_not_covered_pass_straight_through(
    options: dict[str, Any], request_options: dict[str, Any]
) -> None:
    lock, gated = KeyedLock(), Gated()
    app = gated_app(gated, lock, **options)
    async with client(app) as http, anyio.create_task_group() as tg:
        for name in ("p1", "p2"):
            tg.start_soon(lambda n=name: http.get("/", params={"n": n}, **request_options))
        await gated.entered("p1").wait()
        await gated.entered("p2").wait()  # both inside at once: nothing serialized them
        assert lock.stats().active_keys == 0
        gated.gate("p1").set()
        gated.gate("p2").set()
    assert gated.calls == 2


async def test_lifespan_and_websocket_scopes_untouched() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    middleware = KeyedLockMiddleware(inner, key=keys.header("x-user"))

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        pass

    for scope in (
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        {"type": "websocket", "path": "/", "headers": [(b"x-user", b"alice")]},
    ):
        before = dict(scope)
        await middleware(scope, receive, send)
        assert seen[-1] == (scope, receive, send)
        assert scope == before


# -- 2. held until the app returns: streamed body and background task ------------------------


async def test_key_held_through_streaming_body_and_background_task() -> None:
    lock = KeyedLock()
    log: list[str] = []
    mid_stream = anyio.Event()
    finish_stream = anyio.Event()
    finish_background = anyio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        log.append("stream enter")
        yield b"first "
        mid_stream.set()
        await finish_stream.wait()
        yield b"last"
        log.append("stream exit")

    async def background() -> None:
        log.append("background start")
        await finish_background.wait()
        log.append("background done")

    async def stream(request: Request) -> Response:
        log.append("stream endpoint")
        return StreamingResponse(chunks(), background=BackgroundTask(background))

    async def plain(request: Request) -> Response:
        log.append("second request")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/stream", stream), Route("/plain", plain)],
        middleware=[Middleware(KeyedLockMiddleware, lock=lock, key=keys.header("x-user"))],
    )
    headers = {"x-user": "alice"}
    async with client(app) as http, anyio.create_task_group() as tg:
        bodies: list[bytes] = []

        async def first() -> None:
            bodies.append((await http.get("/stream", headers=headers)).content)

        tg.start_soon(first)
        await mid_stream.wait()
        tg.start_soon(lambda: http.get("/plain", headers=headers))
        await wait_until(lambda: lock.waiting("alice") == 1, "second request queued")
        finish_stream.set()
        await wait_until(lambda: "background start" in log, "background task started")
        assert lock.locked("alice")
        assert lock.waiting("alice") == 1
        finish_background.set()
    assert log == [
        "stream endpoint",
        "stream enter",
        "stream exit",
        "background start",
        "background done",
        "second request",
    ]
    assert bodies == [b"first last"]
    assert lock.stats().active_keys == 0


# -- 5. responses -------------------------------------------------------------------------------


async def hold_alice_then(
    app: Any, gated: Gated, lock: KeyedLock, **request: Any
) -> tuple[int, dict[str, str], bytes]:
    """With one alice request inside the app, send another; return its answer."""
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.get("/", params={"n": "holder"}, headers={"x-user": "alice"}))
        await gated.entered("holder").wait()
        response = await http.get("/", params={"n": "second"}, **request)
        gated.gate("holder").set()
    assert lock.stats().active_keys == 0
    return response.status_code, dict(response.headers), response.content


@pytest.mark.parametrize(
    ("options", "status", "detail_word"),
    [
        ({"timeout": 0}, 409, "in progress"),
        ({"max_waiting": 0}, 429, "waiting"),
        ({"timeout": 0.05}, 503, "Timed out"),
    ],
)
async def test_busy_responses(options: dict[str, Any], status: int, detail_word: str) -> None:
    lock, gated = KeyedLock(), Gated()
    app = gated_app(gated, lock, **options)
    code, headers, body = await hold_alice_then(app, gated, lock, headers={"x-user": "alice"})
    assert code == status
    assert headers["retry-after"] == "1"
    assert headers["content-type"] == "application/json"
    detail = json.loads(body)["detail"]
    assert detail_word in detail
    assert "alice" not in body.decode()
    assert "alice" not in str(headers)
    assert gated.names_in("in") == ["holder"]


async def test_options_default_to_the_lock() -> None:
    lock, gated = KeyedLock(timeout=0), Gated()
    code, _, _ = await hold_alice_then(
        gated_app(gated, lock), gated, lock, headers={"x-user": "alice"}
    )
    assert code == 409


async def test_on_error_stop_aborts_waiters_with_409() -> None:
    lock = KeyedLock()
    inside = anyio.Event()
    fail = anyio.Event()
    calls: list[str] = []

    async def endpoint(request: Request) -> Response:
        calls.append(request.query_params["n"])
        if request.query_params["n"] == "first":
            inside.set()
            await fail.wait()
            raise RuntimeError("payment provider down")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[
            Middleware(KeyedLockMiddleware, lock=lock, key=keys.header("x-user"), on_error="stop")
        ],
    )
    headers = {"x-user": "alice"}
    answers: dict[str, Any] = {}
    async with client(app, raise_app_exceptions=False) as http, anyio.create_task_group() as tg:

        async def call(name: str) -> None:
            answers[name] = await http.get("/", params={"n": name}, headers=headers)

        tg.start_soon(call, "first")
        await inside.wait()
        tg.start_soon(call, "second")
        await wait_until(lambda: lock.waiting("alice") == 1, "second queued")
        fail.set()
    assert answers["first"].status_code == 500
    assert answers["second"].status_code == 409
    assert "failed" in answers["second"].json()["detail"]
    assert calls == ["first"]
    assert lock.stats().active_keys == 0


async def test_missing_key_rejected_when_asked() -> None:
    lock, gated = KeyedLock(), Gated()
    app = gated_app(gated, lock, on_missing_key="reject")
    async with client(app) as http:
        response = await http.get("/", params={"n": "x"})
    assert response.status_code == 400
    assert "retry-after" not in response.headers
    assert response.json() == {"detail": "This request needs a lock key and has none."}
    assert gated.calls == 0


async def test_busy_response_renders_a_custom_answer() -> None:
    lock, gated = KeyedLock(), Gated()
    seen: list[Rejection] = []

    async def busy(scope: Any, rejection: Rejection) -> Response | None:
        seen.append(rejection)
        if rejection.reason == "busy":
            return JSONResponse(
                {"error": "slow down", "status": rejection.status},
                status_code=rejection.status,
                headers={"retry-after": "7"},
            )
        return None

    app = gated_app(gated, lock, timeout=0, busy_response=busy, on_missing_key="reject")
    code, headers, body = await hold_alice_then(app, gated, lock, headers={"x-user": "alice"})
    assert (code, headers["retry-after"], json.loads(body)) == (
        409,
        "7",
        {"error": "slow down", "status": 409},
    )
    async with client(app) as http:
        fallback = await http.get("/", params={"n": "nokey"})
    assert fallback.status_code == 400
    assert [r.reason for r in seen] == ["busy", "missing_key"]


# -- 6. disconnects while waiting, body replay, bounded buffer ---------------------------------


def raw_app(calls: list[bytes], inside: anyio.Event, release: anyio.Event) -> Any:
    """An ASGI app that records each request's full body, and keeps the first one inside."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        calls.append(body)
        if len(calls) == 1:
            inside.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_disconnect_while_waiting_leaves_queue_and_never_reaches_app() -> None:
    lock = KeyedLock()
    calls: list[bytes] = []
    inside, release = anyio.Event(), anyio.Event()
    app = KeyedLockMiddleware(raw_app(calls, inside, release), key=keys.header("x-user"), lock=lock)
    holder = RawRequest([(b"x-user", b"alice")])
    holder.push({"type": "http.request", "body": b"holder", "more_body": False})
    leaver = RawRequest([(b"x-user", b"alice")])
    leaver.push({"type": "http.request", "body": b"part", "more_body": True})
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run, app)
        await inside.wait()
        tg.start_soon(leaver.run, app)
        await wait_until(lambda: lock.waiting("alice") == 1, "leaver queued")
        await wait_until(lambda: leaver.received == 1, "leaver's body read while waiting")
        leaver.disconnect.set()
        await leaver.done.wait()
        assert lock.waiting("alice") == 0
        assert lock.locked("alice")
        release.set()
    assert calls == [b"holder"]  # the leaver never reached the app
    assert leaver.sent == []
    assert holder.status == 200
    assert lock.stats().active_keys == 0


async def test_body_chunks_received_while_waiting_are_replayed_in_order() -> None:
    lock = KeyedLock()
    calls: list[bytes] = []
    inside, release = anyio.Event(), anyio.Event()
    app = KeyedLockMiddleware(raw_app(calls, inside, release), key=keys.header("x-user"), lock=lock)
    holder = RawRequest([(b"x-user", b"alice")])
    holder.push({"type": "http.request", "body": b"h", "more_body": False})
    waiter = RawRequest([(b"x-user", b"alice")])
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run, app)
        await inside.wait()
        tg.start_soon(waiter.run, app)
        await wait_until(lambda: lock.waiting("alice") == 1, "waiter queued")
        for index, chunk in enumerate([b"one,", b"two,", b"three"]):
            waiter.push({"type": "http.request", "body": chunk, "more_body": index < 2})
            await wait_until(lambda i=index: waiter.received == i + 1, "chunk read while waiting")
        assert calls == [b"h"]  # all three chunks were taken in while the key was busy
        release.set()
    assert calls == [b"h", b"one,two,three"]
    assert waiter.sent[-1]["body"] == b"one,two,three"
    assert lock.stats().active_keys == 0


async def test_body_over_the_buffer_limit_gets_413_and_leaves_queue() -> None:
    lock = KeyedLock()
    calls: list[bytes] = []
    inside, release = anyio.Event(), anyio.Event()
    app = KeyedLockMiddleware(
        raw_app(calls, inside, release),
        key=keys.header("x-user"),
        lock=lock,
        max_buffered_body=10,
    )
    holder = RawRequest([(b"x-user", b"alice")])
    holder.push({"type": "http.request", "body": b"h", "more_body": False})
    big = RawRequest([(b"x-user", b"alice")])
    big.push({"type": "http.request", "body": b"x" * 6, "more_body": True})
    big.push({"type": "http.request", "body": b"x" * 6, "more_body": False})
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run, app)
        await inside.wait()
        tg.start_soon(big.run, app)
        await big.done.wait()
        assert big.status == 413
        assert "retry-after" not in dict(big.sent[0]["headers"])
        assert lock.waiting("alice") == 0
        release.set()
    assert calls == [b"h"]
    assert lock.stats().active_keys == 0


async def test_uncontended_request_gets_the_original_receive() -> None:
    """The fast path starts no watcher: the app reads the body straight from the server."""
    receives: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        receives.append(receive)

    request = RawRequest([(b"x-user", b"alice")])
    await request.run(KeyedLockMiddleware(inner, key=keys.header("x-user")))
    assert receives == [request.receive]
    assert request.received == 0


# -- 7. bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"x" * 257, b"a\x01b", b"a\x7fb", b"\xc2\x85"],  # \xc2\x85 decodes (latin-1) to C2 + C1 85
)
async def test_invalid_keys_get_400(value: bytes) -> None:
    lock, gated = KeyedLock(), Gated()
    app = gated_app(gated, lock)
    async with client(app) as http:
        response = await http.get("/", params={"n": "x"}, headers={"x-user": value})
    assert response.status_code == 400
    assert response.json() == {"detail": "The request's lock key is invalid."}
    assert "retry-after" not in response.headers
    assert gated.calls == 0


async def test_max_key_length_option_and_non_utf8_bytes() -> None:
    lock, gated = KeyedLock(), Gated()
    app = gated_app(gated, lock, max_key_length=4)
    for name in ("a", "b"):
        gated.gate(name).set()
    async with client(app) as http:
        long = await http.get("/", params={"n": "a"}, headers={"x-user": "12345"})
        odd = await http.get("/", params={"n": "b"}, headers={"x-user": b"\xff\xfe"})
    assert long.status_code == 400
    assert odd.status_code == 200
    assert odd.json()["held"][0]["keys"] == ["\xff\xfe"]
    assert lock.stats().active_keys == 0


async def test_extractor_that_raises_is_a_500_through_the_app_and_leaves_no_key() -> None:
    lock = KeyedLock()
    calls: list[str] = []

    def broken(scope: Any) -> str:
        raise ValueError("extractor bug")

    async def endpoint(request: Request) -> Response:
        calls.append("in")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(KeyedLockMiddleware, lock=lock, key=broken)],
    )
    async with client(app, raise_app_exceptions=False) as http:
        response = await http.get("/")
    assert response.status_code == 500
    assert calls == []
    assert lock.stats().active_keys == 0
    with pytest.raises(ValueError, match="extractor bug"):
        async with client(app) as http:
            await http.get("/")


async def test_app_exception_releases_the_key() -> None:
    lock = KeyedLock()

    async def endpoint(request: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(KeyedLockMiddleware, lock=lock, key=keys.header("x-user"))],
    )
    async with client(app, raise_app_exceptions=False) as http:
        responses = [await http.get("/", headers={"x-user": "a"}) for _ in range(2)]
    assert [r.status_code for r in responses] == [500, 500]
    assert lock.stats().active_keys == 0


async def test_flood_of_one_key_is_capped_and_other_keys_are_not_slowed() -> None:
    lock = KeyedLock()
    release_hot = anyio.Event()
    completed: list[tuple[str, int]] = []
    entered: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        user = dict(scope["headers"])[b"x-user"].decode()
        entered.append(user)
        if user == "hot":
            await release_hot.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = KeyedLockMiddleware(inner, key=keys.header("x-user"), lock=lock, max_waiting=100)
    statuses: dict[int, int] = {}
    peak_waiting = 0

    async def one(user: str, label: str) -> None:
        nonlocal peak_waiting
        request = RawRequest([(b"x-user", user.encode())])
        request.push({"type": "http.request", "body": b"", "more_body": False})
        await request.run(app)
        status = request.status
        assert status is not None
        statuses[status] = statuses.get(status, 0) + 1
        peak_waiting = max(peak_waiting, lock.waiting("hot"))
        completed.append((label, status))

    async with anyio.create_task_group() as tg:
        for index in range(10_000):
            tg.start_soon(one, "hot", f"hot{index}")
        await wait_until(lambda: statuses.get(429, 0) == 9_899, "the overflow answered 429")
        assert lock.waiting("hot") == 100
        assert lock.stats().active_keys == 1  # the hot key's state only, bounded
        for index in range(50):
            tg.start_soon(one, f"cold{index}", f"cold{index}")
        await wait_until(lambda: statuses.get(200, 0) == 50, "every cold request served")
        # All 50 cold requests completed while the hot key was still held, its queue full:
        # none of them waited behind it.
        assert sorted(label for label, status in completed if status == 200) == sorted(
            f"cold{index}" for index in range(50)
        )
        assert lock.waiting("hot") == 100
        release_hot.set()
    assert statuses == {429: 9_899, 200: 101 + 50}
    assert peak_waiting <= 100
    assert entered.count("hot") == 101
    assert lock.stats().active_keys == 0


# -- 8. observability ---------------------------------------------------------------------


async def test_scope_entry_server_timing_and_hooks() -> None:
    lock, gated = KeyedLock(key_prefix="shop:"), Gated()
    events: list[tuple[Any, ...]] = []

    def on_acquired(scope: Any, held: Held) -> None:
        assert scope["keyedlock"][-1] is held
        events.append(("acquired", held.keys, held.token))

    async def on_released(scope: Any, held: Held, held_for: float) -> None:
        assert held not in scope["keyedlock"]
        events.append(("released", held.keys, held_for >= 0))

    def on_rejected(scope: Any, rejection: Rejection) -> None:
        events.append(("rejected", rejection.reason, rejection.status))

    app = gated_app(
        gated,
        lock,
        server_timing=True,
        on_acquired=on_acquired,
        on_released=on_released,
        on_rejected=on_rejected,
        max_waiting=1,
    )
    answers: dict[str, Any] = {}
    async with client(app) as http, anyio.create_task_group() as tg:

        async def call(name: str) -> None:
            answers[name] = await http.get("/", params={"n": name}, headers={"x-user": "alice"})

        tg.start_soon(call, "first")
        await gated.entered("first").wait()
        tg.start_soon(call, "second")
        await wait_until(lambda: lock.waiting("alice") == 1, "second queued")
        await call("third")  # queue full
        gated.gate("second").set()
        gated.gate("first").set()
    first, second = answers["first"], answers["second"]
    assert answers["third"].status_code == 429
    assert "server-timing" not in answers["third"].headers
    assert first.json()["held"] == [{"keys": ["alice"], "waited": 0.0, "token": 1}]
    waited = second.json()["held"][0]["waited"]
    assert waited > 0
    assert second.json()["held"][0]["token"] == 2
    assert first.headers["server-timing"] == "keyedlock;dur=0.000"
    assert second.headers["server-timing"] == f"keyedlock;dur={waited * 1000:.3f}"
    assert events == [
        ("acquired", ("alice",), 1),
        ("rejected", "queue_full", 429),
        ("released", ("alice",), True),
        ("acquired", ("alice",), 2),
        ("released", ("alice",), True),
    ]
    assert lock.stats().active_keys == 0


async def test_hooks_that_raise_are_logged_and_leave_lock_state_clean(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock, gated = KeyedLock(), Gated()

    def broken(*args: Any) -> None:
        raise RuntimeError("metrics down")

    app = gated_app(gated, lock, on_acquired=broken, on_released=broken, on_rejected=broken)
    gated.gate("x").set()
    with caplog.at_level(logging.ERROR, logger="keyedlock_asgi"):
        async with client(app) as http:
            ok = await http.get("/", params={"n": "x"}, headers={"x-user": "alice"})
            bad = await http.get("/", params={"n": "y"}, headers={"x-user": "a\x01"})
    assert (ok.status_code, bad.status_code) == (200, 400)
    hooks = sorted(r.getMessage() for r in caplog.records)
    assert hooks == [f"keyedlock {name} hook raised; ignored" for name in hooks_names()]
    assert lock.stats().active_keys == 0


def hooks_names() -> list[str]:
    return sorted(["on_acquired", "on_released", "on_rejected"])


async def test_layer_skips_a_key_an_outer_layer_already_holds() -> None:
    lock, gated = KeyedLock(), Gated()
    inner = gated_app(gated, lock)
    outer = KeyedLockMiddleware(inner, key=keys.header("x-user"), lock=lock)
    gated.gate("x").set()
    async with client(outer) as http:
        response = await http.get("/", params={"n": "x"}, headers={"x-user": "alice"})
    assert response.status_code == 200
    assert [h["keys"] for h in response.json()["held"]] == [["alice"]]


def test_bad_options() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(TypeError, match="key extractor"):
        KeyedLockMiddleware(app, key="x-user")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of method names"):
        KeyedLockMiddleware(app, key=keys.client_ip(), methods="POST")
    with pytest.raises(ValueError, match="on_missing_key"):
        KeyedLockMiddleware(app, key=keys.client_ip(), on_missing_key="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_key_length"):
        KeyedLockMiddleware(app, key=keys.client_ip(), max_key_length=0)
    with pytest.raises(ValueError, match="timeout"):
        KeyedLockMiddleware(app, key=keys.client_ip(), timeout=-1)
    with pytest.raises(ValueError, match="unknown path converter"):
        KeyedLockMiddleware(app, key=keys.client_ip(), include=["/x/{a:bad}"])


@pytest.mark.parametrize("what", ["deleted", "replaced", "emptied"])
@pytest.mark.parametrize("server_timing", [False, True], ids=["fast-path", "full-path"])
async def test_an_app_that_changes_scope_keyedlock_cannot_keep_the_key(
    what: str, server_timing: bool
) -> None:
    """`scope["keyedlock"]` is the app's to read; whatever it does to the entry, the key is
    released when the request ends."""
    lock = KeyedLock(timeout=10)  # a stranded key fails the second request instead of hanging

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if what == "deleted":
            del scope["keyedlock"]
        elif what == "replaced":
            scope["keyedlock"] = []
        else:
            scope["keyedlock"].clear()
        await PlainTextResponse("ok")(scope, receive, send)

    wrapped = KeyedLockMiddleware(
        app, lock=lock, key=keys.header("x-user"), server_timing=server_timing
    )
    async with client(wrapped) as http:
        for _ in range(2):  # the second request would wait forever for a stranded key
            response = await http.get("/", headers={"x-user": "alice"})
            assert response.status_code == 200
    assert lock.stats().active_keys == 0
