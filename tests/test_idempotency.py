"""IdempotencyMiddleware in one process, on asyncio and trio: every row of API.md's table.

In-flight overlap is proved with events (the first request is parked inside the endpoint while
the duplicate is sent), never with sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from keyedlock_asgi import IdempotencyMiddleware, KeyedLock, keys
from keyedlock_asgi.stores import MemoryStore, StoredResponse
from tests.support.middleware import RawRequest, client
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio
KEY = {"Idempotency-Key": "k-1"}


class Charges:
    """An endpoint that charges once per run, parks while its gate is closed, and says how."""

    def __init__(self) -> None:
        self.runs: list[bytes] = []
        self.entered = anyio.Event()
        self.gate: anyio.Event | None = None
        self.status = 201

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        self.runs.append(body)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        response = JSONResponse({"charge": len(self.runs), "body": body.decode()}, self.status)
        response.headers["x-run"] = str(len(self.runs))
        response.set_cookie("session", f"s{len(self.runs)}")
        return response


def make_app(charges: Charges, **options: Any) -> Starlette:
    async def boom(request: Request) -> Response:
        charges.runs.append(b"boom")
        raise RuntimeError("the app failed")

    async def big(request: Request) -> Response:
        charges.runs.append(b"big")
        return Response(b"x" * 2048)

    return Starlette(
        routes=[
            Route("/charge", charges.endpoint, methods=["GET", "POST", "PUT"]),
            Route("/other", charges.endpoint, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/big", big, methods=["POST"]),
        ],
        middleware=[Middleware(IdempotencyMiddleware, **options)],
    )


async def test_first_runs_duplicate_replayed_byte_for_byte_and_not_run() -> None:
    charges = Charges()
    async with client(make_app(charges)) as http:
        first = await http.post("/charge", headers=KEY, content=b"amount=10")
        again = await http.post("/charge", headers=KEY, content=b"amount=10")
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["x-run"] == first.headers["x-run"] == "1"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert len(charges.runs) == 1


async def test_duplicate_in_flight_gets_409_with_retry_after() -> None:
    charges, lock = Charges(), KeyedLock()
    charges.gate = anyio.Event()
    app = make_app(charges, lock=lock)
    results: list[Any] = []
    async with client(app) as http, anyio.create_task_group() as tg:

        async def first() -> None:
            results.append(await http.post("/charge", headers=KEY, content=b"a"))

        tg.start_soon(first)
        await charges.entered.wait()  # the first is inside the endpoint, its key held
        with anyio.fail_after(10):  # a second run would park at the gate: fail, not hang
            duplicate = await http.post("/charge", headers=KEY, content=b"a")
        assert duplicate.status_code == 409
        assert int(duplicate.headers["retry-after"]) >= 1
        assert duplicate.headers["content-type"] == "application/json"
        assert "k-1" not in duplicate.text
        charges.gate.set()
    assert results[0].status_code == 201
    assert len(charges.runs) == 1
    assert lock.stats().active_keys == 0


@pytest.mark.parametrize(
    ("path", "body", "query"),
    [("/charge", b"amount=99", ""), ("/other", b"a", ""), ("/charge", b"a", "?x=1")],
)
async def test_same_key_different_request_gets_422(path: str, body: bytes, query: str) -> None:
    charges = Charges()
    async with client(make_app(charges)) as http:
        assert (await http.post("/charge", headers=KEY, content=b"a")).status_code == 201
        reused = await http.post(path + query, headers=KEY, content=body)
    assert reused.status_code == 422
    assert "different request" in reused.json()["detail"]
    assert len(charges.runs) == 1


async def test_5xx_is_not_stored_and_a_retry_runs_again() -> None:
    charges = Charges()
    charges.status = 503
    async with client(make_app(charges)) as http:
        assert (await http.post("/charge", headers=KEY)).status_code == 503
        charges.status = 201
        retry = await http.post("/charge", headers=KEY)
        assert retry.status_code == 201
        assert "idempotent-replayed" not in retry.headers
        replay = await http.post("/charge", headers=KEY)
    assert replay.headers["idempotent-replayed"] == "true"
    assert len(charges.runs) == 2


async def test_raising_app_stores_nothing() -> None:
    charges = Charges()
    async with client(make_app(charges), raise_app_exceptions=False) as http:
        for _ in range(2):
            assert (await http.post("/boom", headers=KEY)).status_code == 500
    assert charges.runs == [b"boom", b"boom"]


async def test_body_over_max_response_body_never_runs_twice() -> None:
    charges = Charges()
    async with client(make_app(charges, max_response_body=1024)) as http:
        first = await http.post("/big", headers=KEY)
        again = await http.post("/big", headers=KEY)
    assert first.status_code == 200
    assert len(first.content) == 2048  # the client got the whole response
    assert again.status_code == 409
    assert "not kept" in again.json()["detail"]
    assert charges.runs == [b"big"]


async def test_missing_key_passes_or_is_rejected() -> None:
    charges = Charges()
    async with client(make_app(charges)) as http:
        for _ in range(2):
            assert (await http.post("/charge")).status_code == 201
    assert len(charges.runs) == 2
    async with client(make_app(charges, on_missing_key="reject")) as http:
        missing = await http.post("/charge")
        assert missing.status_code == 400
        assert missing.json() == {"detail": "This request needs an Idempotency-Key."}
    assert len(charges.runs) == 2


@pytest.mark.parametrize("bad", ["x" * 257, "a\x00b", "tab\there"])
async def test_invalid_key_is_rejected_400(bad: str) -> None:
    charges = Charges()
    app = make_app(charges)
    request = RawRequest([(b"idempotency-key", bad.encode("latin-1"))], path="/charge")
    request.push({"type": "http.request", "body": b"", "more_body": False})
    await request.run(app)
    assert request.status == 400
    assert charges.runs == []


async def test_other_methods_pass_through_and_methods_option() -> None:
    charges = Charges()
    async with client(make_app(charges)) as http:
        for _ in range(2):
            response = await http.get("/charge", headers=KEY)
            assert "idempotent-replayed" not in response.headers
    assert len(charges.runs) == 2
    async with client(make_app(charges, methods=["PUT"])) as http:
        await http.put("/charge", headers=KEY)
        assert (await http.put("/charge", headers=KEY)).headers["idempotent-replayed"] == "true"
        await http.post("/charge", headers=KEY)
    assert len(charges.runs) == 4


async def test_set_cookie_is_stripped_from_stored_responses_unless_kept() -> None:
    charges = Charges()
    async with client(make_app(charges)) as http:
        first = await http.post("/charge", headers=KEY)
        assert first.headers["set-cookie"].startswith("session=s1")  # the first client gets it
        replay = await http.post("/charge", headers=KEY)
        assert "set-cookie" not in replay.headers
    async with client(make_app(charges, keep_set_cookie=True)) as http:
        await http.post("/charge", headers=KEY)
        replay = await http.post("/charge", headers=KEY)
        assert replay.headers["set-cookie"].startswith("session=s2")


async def test_keyed_by_user_and_header_one_user_cannot_replay_anothers() -> None:
    charges = Charges()

    class User:
        is_authenticated = True

        def __init__(self, identity: str) -> None:
            self.identity = identity

    inner = make_app(charges, key=keys.combine(keys.user(), keys.header("Idempotency-Key")))

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            scope["user"] = User(headers.get(b"x-user", b"").decode())
        await inner(scope, receive, send)

    async with client(auth) as http:
        alice = await http.post("/charge", headers={**KEY, "x-user": "alice"}, content=b"a")
        bob = await http.post("/charge", headers={**KEY, "x-user": "bob"}, content=b"a")
        alice_again = await http.post("/charge", headers={**KEY, "x-user": "alice"}, content=b"a")
    assert "idempotent-replayed" not in bob.headers
    assert bob.json()["charge"] == 2
    assert alice_again.content == alice.content
    assert len(charges.runs) == 2


async def test_streamed_response_reaches_the_client_while_it_is_captured() -> None:
    """The app sends its second chunk only after the client received the first: a middleware
    that buffered the response would never let it finish (bounded by fail_after)."""
    first_chunk_seen = anyio.Event()

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"part1,"
            await first_chunk_seen.wait()
            yield b"part2"

        return StreamingResponse(chunks(), media_type="text/plain")

    store = MemoryStore()
    app = IdempotencyMiddleware(
        Starlette(routes=[Route("/", stream, methods=["POST"])]), store=store
    )
    request = RawRequest([(b"idempotency-key", b"s-1")])
    request.push({"type": "http.request", "body": b"", "more_body": False})
    real_send = request.send

    async def send(message: dict[str, Any]) -> None:
        await real_send(message)
        if message.get("body") == b"part1,":
            first_chunk_seen.set()

    request.send = send  # type: ignore[method-assign]
    with anyio.fail_after(10):
        await request.run(app)
    bodies = [m["body"] for m in request.sent if m["type"] == "http.response.body" and m["body"]]
    assert bodies == [b"part1,", b"part2"]
    stored = await store.get("s-1")
    assert stored is not None
    assert stored.body == b"part1,part2"


async def test_client_leaving_during_upload_runs_nothing() -> None:
    charges, store = Charges(), MemoryStore()
    app = make_app(charges, store=store)
    request = RawRequest([(b"idempotency-key", b"up-1")], path="/charge")
    request.push({"type": "http.request", "body": b"half", "more_body": True})
    async with anyio.create_task_group() as tg:
        tg.start_soon(request.run, app)
        await wait_until(lambda: request.received == 1, "first chunk read")
        request.disconnect.set()
    assert charges.runs == []
    assert request.sent == []
    assert len(store) == 0


async def test_request_body_over_limit_is_413_and_not_run() -> None:
    charges = Charges()
    async with client(make_app(charges, max_request_body=10)) as http:
        response = await http.post("/charge", headers=KEY, content=b"y" * 11)
    assert response.status_code == 413
    assert charges.runs == []


async def test_response_completed_before_the_app_raised_is_stored() -> None:
    """Side effects happened and the client got its answer: a retry must not run again."""
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        runs.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
        raise RuntimeError("a background task failed after the response")

    wrapped = IdempotencyMiddleware(app)
    for _ in range(2):
        request = RawRequest([(b"idempotency-key", b"bg-1")])
        request.push({"type": "http.request", "body": b"", "more_body": False})
        with pytest.raises(RuntimeError) if not runs else _no_raise():
            await request.run(wrapped)
    assert runs == [1]
    assert request.sent[-1]["body"] == b"done"


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class FailingStore(MemoryStore):
    async def get(self, key: str) -> StoredResponse | None:
        raise ConnectionError("store down")


async def test_store_unreadable_is_503_and_nothing_runs() -> None:
    charges = Charges()
    async with client(make_app(charges, store=FailingStore())) as http:
        response = await http.post("/charge", headers=KEY)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert charges.runs == []


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    wrapped = IdempotencyMiddleware(app)
    await wrapped({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await wrapped({"type": "websocket", "headers": []}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


def test_options_are_checked() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(ValueError, match="on_missing_key"):
        IdempotencyMiddleware(app, on_missing_key="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        IdempotencyMiddleware(app, ttl=0)


# -- MemoryStore ---------------------------------------------------------------------------


def entry(body: bytes = b"x", fingerprint: str = "f") -> StoredResponse:
    return StoredResponse(fingerprint, 200, ((b"content-type", b"text/plain"),), body)


async def test_memory_store_keeps_the_first_and_expires_by_ttl() -> None:
    store = MemoryStore()
    await store.put("a", entry(b"first"), ttl=3600)
    await store.put("a", entry(b"second"), ttl=3600)
    assert (await store.get("a")) == entry(b"first")
    await store.put("gone", entry(), ttl=1e-9)
    with anyio.fail_after(10):
        while await store.get("gone") is not None:  # noqa: ASYNC110 - the clock expires it
            await anyio.sleep(0.001)
    assert "gone" not in store._entries  # dropped on read, not just hidden


async def test_memory_store_is_bounded_in_entries_and_bytes() -> None:
    store = MemoryStore(max_entries=3, max_bytes=1000)
    for n in range(10):
        await store.put(f"k{n}", entry(), ttl=3600)
    assert len(store) == 3
    assert [await store.get(f"k{n}") is not None for n in (6, 7, 8, 9)] == [False, True, True, True]
    big = MemoryStore(max_bytes=1000)
    for n in range(10):
        await big.put(f"k{n}", entry(b"y" * 400), ttl=3600)
    assert len(big) == 2
    assert big.bytes <= 1000
    await big.put("huge", entry(b"z" * 5000), ttl=3600)  # the newest always stays
    assert len(big) == 1
    assert await big.get("huge") is not None


async def test_memory_store_drops_expired_entries_on_write() -> None:
    store = MemoryStore()
    for n in range(100):
        await store.put(f"old{n}", entry(), ttl=1e-9)
    with anyio.fail_after(10):
        while await store.get("old99") is not None:  # noqa: ASYNC110 - the clock expires it
            await anyio.sleep(0.001)
    await store.put("new", entry(), ttl=3600)
    assert len(store) == 1


def test_codec_round_trip() -> None:
    from keyedlock_asgi.stores._base import decode, encode

    for response in (
        StoredResponse("f" * 64, 201, ((b"x-a", b"\xff\x00"), (b"x-b", b"")), b"\n\x00body\n"),
        StoredResponse("f", 409, (), None),
        StoredResponse("f", 200, (), b""),
    ):
        assert decode(encode(response)) == response
    assert json.loads(encode(StoredResponse("f", 200, (), b"")).split(b"\n")[0])["s"] == 200


class StaleReadStore(MemoryStore):
    """A store whose next read is taken at once but answered only when `release` is set: the
    reader acts on what the store held before, as a slow network read would."""

    def __init__(self) -> None:
        super().__init__()
        self.parked = anyio.Event()
        self.release: anyio.Event | None = None

    async def get(self, key: str) -> StoredResponse | None:
        found = await super().get(key)
        release, self.release = self.release, None
        if release is not None:
            self.parked.set()
            await release.wait()
        return found


async def test_key_completed_between_the_first_look_and_the_lock_is_replayed() -> None:
    """B reads "nothing stored", then A runs and completes, then B takes the free key: B must
    look again under the lock and replay A's response, not run a second time."""
    charges, store = Charges(), StaleReadStore()
    app = make_app(charges, store=store)
    store.release = release = anyio.Event()
    results: dict[str, Any] = {}
    async with client(app) as http, anyio.create_task_group() as tg:

        async def post(name: str) -> None:
            results[name] = await http.post("/charge", headers=KEY, content=b"a")

        tg.start_soon(post, "b")
        await store.parked.wait()  # B's first look read an empty store
        await post("a")
        release.set()
    assert results["a"].status_code == 201
    assert results["b"].headers["idempotent-replayed"] == "true"
    assert results["b"].content == results["a"].content
    assert len(charges.runs) == 1
