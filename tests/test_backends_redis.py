"""RedisBackend against a real Redis: FIFO and exclusion across processes, leases, fencing,
clean-up after timeouts and cancellation, and failing closed (or open) when Redis is gone.

Each `RedisBackend` instance is its own "process" to Redis (its own process id, connections and
wake-up channel), so several of them in one event loop contend exactly as workers do. The
core semantics run against Redis through the `make_lock` engine fixture (tests/test_lock.py);
multi-process and fault tests are in test_backends_redis_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from redis import __version__ as redis_version
from starlette.requests import Request
from starlette.responses import Response

from keyedlock_asgi import BackendUnavailable, HoldExpired, KeyedLock, LockBusy, LockTimeout
from keyedlock_asgi._responses import rejection_for
from keyedlock_asgi.backends import _redis_scripts
from keyedlock_asgi.backends.redis import LeaseLost, RedisBackend
from tests.support.engine_redis import (  # noqa: F401 (the fixtures are used by name)
    REDIS_URL,
    make_redis_backend,
    redis_namespace,
    redis_raw,
)
from tests.support.lockwatch import Timeline
from tests.support.route_guard import FORMS, answer, build_app, expected, hook_that_blocks
from tests.support.route_guard import client as route_client
from tests.support.server import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client is asyncio-only (trio: see the tests below)


async def queue_length(raw: Any, backend: RedisBackend, key: str) -> int:
    return int(await raw.zcard(backend.redis_keys(key)[1]))


async def leftovers(raw: Any, namespace: str) -> list[str]:
    """Keys of the namespace other than the counters hash (which carries a TTL)."""
    found = []
    async for name in raw.scan_iter(match=f"{{{namespace}:*"):
        text = name.decode()
        if not text.endswith(":m"):
            found.append(text)
        else:
            assert await raw.pttl(name) > 0, f"{text} does not expire"
    return found


async def test_engine_fixture_builds_redis_locks(make_lock: Callable[..., KeyedLock]) -> None:
    """The shared semantic tests get a Redis-backed lock from `make_lock` (engine="redis")."""
    lock = make_lock(timeout=5)
    assert isinstance(lock.backend, RedisBackend)
    async with lock.hold("k") as held:
        assert held.token > 0
    assert lock.stats().active_keys == 0


test_engine_fixture_builds_redis_locks = pytest.mark.parametrize("engine", ["redis"])(
    test_engine_fixture_builds_redis_locks
)


async def test_fifo_and_fencing_across_processes(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """Two processes' waiters are served in arrival order; each grant gets a larger token."""
    a, b, c = (KeyedLock(backend=make_backend()) for _ in range(3))
    backend_b = b.backend
    assert isinstance(backend_b, RedisBackend)
    log: list[tuple[str, str]] = []
    tokens: list[int] = []
    release = anyio.Event()

    async def user(lock: KeyedLock, name: str, task_status: Any) -> None:
        async with lock.hold("k") as held:
            log.append(("enter", name))
            tokens.append(held.token)
            if name == "a":
                task_status.started()
                await release.wait()
            log.append(("exit", name))

    async with anyio.create_task_group() as tg:
        await tg.start(user, a, "a")
        # Arrival order: b1, c1 (both queue in Redis), then b2, c2 (queue in their process).
        tg.start_soon(user, b, "b1", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: _eq(queue_length(raw, backend_b, "k"), 1), "b1 queued")
        tg.start_soon(user, c, "c1", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: _eq(queue_length(raw, backend_b, "k"), 2), "c1 queued")
        tg.start_soon(user, b, "b2", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: b.waiting("k") == 1, "b2 queued")
        tg.start_soon(user, c, "c2", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: c.waiting("k") == 1, "c2 queued")
        release.set()

    order = [name for event, name in log if event == "enter"]
    assert order == ["a", "b1", "c1", "b2", "c2"]
    assert log == [(event, name) for name in order for event in ("enter", "exit")]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)
    assert await leftovers(raw, namespace) == []
    for lock in (a, b, c):
        assert lock.stats().active_keys == 0


async def _eq(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_max_concurrency_across_processes(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """With max_concurrency=2, at most two holders exist across processes, and two do."""
    locks = [KeyedLock(backend=make_backend(), max_concurrency=2) for _ in range(3)]
    inside: set[str] = set()
    peak = 0
    both_in = anyio.Event()

    async def user(lock: KeyedLock, name: str) -> None:
        nonlocal peak
        async with lock.hold("k"):
            inside.add(name)
            peak = max(peak, len(inside))
            if len(inside) == 2:
                both_in.set()
            await both_in.wait()
            await anyio.lowlevel.checkpoint()
            inside.discard(name)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(user, locks[i % 3], f"u{i}")
    assert peak == 2
    assert await leftovers(raw, namespace) == []


async def test_timeout_busy_and_cancel_leave_nothing_in_redis(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    holder = KeyedLock(backend=make_backend())
    other_backend = make_backend()
    other = KeyedLock(backend=other_backend)
    async with holder.hold("k"):
        with pytest.raises(LockBusy):
            async with other.hold("k", timeout=0):
                pytest.fail("granted while held elsewhere")
        assert await queue_length(raw, other_backend, "k") == 0
        with pytest.raises(LockTimeout):
            async with other.hold("k", timeout=0.2):
                pytest.fail("granted while held elsewhere")
        assert await queue_length(raw, other_backend, "k") == 0
        async with anyio.create_task_group() as tg:

            async def cancelled_waiter() -> None:
                async with other.hold("k"):
                    pytest.fail("granted while held elsewhere")

            tg.start_soon(cancelled_waiter)
            await wait_until(lambda: _eq(queue_length(raw, other_backend, "k"), 1), "queued")
            tg.cancel_scope.cancel()
        assert await queue_length(raw, other_backend, "k") == 0
        assert other.stats().active_keys == 0
    assert await leftovers(raw, namespace) == []
    async with other.hold("k", timeout=0) as held:  # and the key is free again
        assert held.token > 0


async def test_retried_acquire_is_idempotent(
    make_backend: Callable[..., RedisBackend], raw: Any
) -> None:
    """A retried ACQUIRE whose first reply was lost returns the same grant and fence."""
    backend = make_backend()
    lease = await backend.acquire("k", timeout=None, max_concurrency=1)
    conn = lease._conn
    args = [
        lease._token_str,
        10_000,
        3_000,
        3_600_000,
        conn.channel_prefix,
        1,
        "1",
        3_000,
        conn.publish,
    ]
    again = await backend._run(conn.acquire, backend.redis_keys("k"), args, conn)
    assert again == (1, lease.token, 0)
    await lease.release()
    await lease.release()  # idempotent, and a second release frees nothing else
    assert await raw.exists(backend.redis_keys("k")[0]) == 0


async def test_lease_is_renewed_while_held(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """A holder that outlives several leases keeps the key; the waiter enters after it left."""
    lost: list[LeaseLost] = []
    # Renewals every lease/3 leave 2/3 of a lease in slack: on a loaded machine a shorter lease
    # can really expire between two late renewals.
    holder_backend = make_backend(lease=1.0, on_lease_lost=lost.append)
    holder = KeyedLock(backend=holder_backend)
    waiter = KeyedLock(backend=make_backend(lease=1.0))
    own_key = holder_backend.redis_keys("k")[0]
    log: list[str] = []

    async def wait_in_line() -> None:
        async with waiter.hold("k"):
            log.append("waiter-enter")

    async with anyio.create_task_group() as tg, holder.hold("k") as held:
        log.append("holder-enter")
        tg.start_soon(wait_in_line)
        # Watch the lease end move forward (each move a renewal) until the hold has lasted
        # longer than one lease.
        seen: list[float] = []
        with anyio.fail_after(10):  # renewals that stop would leave the end standing still
            while len(seen) < 2 or seen[-1] - seen[0] <= 1000:  # ms of server time
                score = (await raw.zrange(own_key, 0, 0, withscores=True))[0][1]
                if not seen or score > seen[-1]:
                    seen.append(score)
                await anyio.sleep(0.02)
        assert len(seen) >= 3  # at least two renewals
        assert held.token > 0
        log.append("holder-exit")
    assert log == ["holder-enter", "holder-exit", "waiter-enter"]
    assert lost == []
    assert await leftovers(raw, namespace) == []


async def test_max_hold_ends_the_lease_and_reports_it(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """Renewal stops at max_hold: the loss is reported, and the next holder's token is larger,
    so a resource checking fencing tokens can refuse the old holder's late writes."""
    lost: list[LeaseLost] = []
    got_lost = anyio.Event()

    def on_lost(event: LeaseLost) -> None:
        lost.append(event)
        got_lost.set()

    # The lease leaves renewals 2/3 of it in slack: on a loaded machine a shorter one can really
    # expire between two late renewals, which is reported as "expired", not "max_hold".
    holder = KeyedLock(backend=make_backend(lease=1.0, max_hold=1.5, on_lease_lost=on_lost))
    waiter = KeyedLock(backend=make_backend(lease=5))
    log: list[tuple[str, int]] = []

    async def wait_in_line() -> None:
        async with waiter.hold("k") as held:
            log.append(("waiter-enter", held.token))

    async with holder.hold("k") as held:
        log.append(("holder-enter", held.token))
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_in_line)
            await got_lost.wait()
        log.append(("holder-exit", held.token))
    assert [event for event, _ in log] == ["holder-enter", "waiter-enter", "holder-exit"]
    assert log[1][1] > log[0][1]
    assert len(lost) == 1
    assert lost[0].reason == "max_hold"
    assert lost[0].token == log[0][1]
    assert lost[0].held_for >= 1.49  # reported when the lease ran out at max_hold, not before
    assert await leftovers(raw, namespace) == []


async def test_a_lost_lease_revokes_a_bounded_hold(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """With `max_hold` on the hold, a lease lost first (here: renewal capped by the engine's
    own max_hold) revokes it the same way: the block is cancelled and leaving raises
    HoldExpired naming the cause. The engine hands the key on when the lease ends, which can be
    before the old block has unwound: the larger fencing token is what refuses a late write."""
    holder = KeyedLock(backend=make_backend(lease=1.0, max_hold=1.5), max_hold=60)
    waiter = KeyedLock(backend=make_backend(lease=5))
    log: list[tuple[str, int]] = []

    async def wait_in_line() -> None:
        async with waiter.hold("k") as held:
            log.append(("waiter-enter", held.token))

    async def hold_until_revoked(tg: anyio.abc.TaskGroup) -> None:
        async with holder.hold("k") as held:
            log.append(("holder-enter", held.token))
            tg.start_soon(wait_in_line)
            try:
                await anyio.sleep_forever()
            finally:
                log.append(("holder-unwound", held.token))

    async with anyio.create_task_group() as tg:
        with pytest.raises(HoldExpired, match="lease"):
            await hold_until_revoked(tg)
    assert log[0][0] == "holder-enter"
    assert {event for event, _ in log[1:]} == {"holder-unwound", "waiter-enter"}
    assert dict(log)["waiter-enter"] > dict(log)["holder-enter"]
    assert await leftovers(raw, namespace) == []


@pytest.mark.parametrize("form", FORMS)
async def test_a_lost_lease_revokes_a_per_route_hold_with_503(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str, form: str
) -> None:
    """Every per-route form revokes a hold whose engine lease is lost (here: renewal capped by
    the engine's max_hold), without `max_hold` of its own, as the middleware does: the endpoint
    is cancelled and the request answered 503 with Retry-After."""
    lock = KeyedLock(backend=make_backend(lease=0.6, max_hold=0.9))
    log: list[str] = []

    async def endpoint(request: Request) -> Response:
        log.append("enter")
        try:
            await anyio.sleep_forever()
        finally:
            log.append("unwound")
        raise AssertionError("unreachable")

    async with route_client(build_app(form, lock, endpoint)) as http:
        response = await http.post("/items/1", headers={"x-key": "k"})
    assert log == ["enter", "unwound"]
    assert answer(response) == expected(HoldExpired("lost"))
    assert await leftovers(raw, namespace) == []


@pytest.mark.parametrize("form", FORMS)
async def test_a_request_cancelled_in_its_on_acquired_hook_frees_the_redis_key(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str, form: str
) -> None:
    """An engine hold can be revoked without `max_hold` (a lost lease), so its revoking scope is
    open while `on_acquired` awaits: a request cancelled there gives the key back in the lock
    and in Redis, and the next request on the key runs."""
    lock = KeyedLock(backend=make_backend(), timeout=5)  # a stranded key fails B, not hangs
    log: list[str] = []
    acquired, in_hook = hook_that_blocks("A")

    async def endpoint(request: Request) -> Response:
        log.append(request.headers["x-name"])
        return Response("ok")

    async def post(name: str) -> Any:
        return await http.post("/items/1", headers={"x-key": "k", "x-name": name})

    app = build_app(form, lock, endpoint, on_acquired=acquired)
    async with route_client(app) as http:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "A")
            await in_hook.wait()
            tg.cancel_scope.cancel()
        assert not lock.locked("k")
        response = await post("B")
    assert response.status_code == 200
    assert log == ["B"]
    assert await leftovers(raw, namespace) == []
    await lock.aclose()


async def test_a_caller_cancelled_while_subscribing_does_not_cancel_the_next(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """A fresh backend's first caller opens the wake-up subscription; callers arriving
    meanwhile wait for it. When that first caller is cancelled (its client left), the ones
    waiting are not: one of them subscribes instead and gets its key."""
    backend = make_backend()
    first = asyncio.create_task(backend.acquire("k1", timeout=5, max_concurrency=1))
    await asyncio.sleep(0)  # `first` is opening the subscription (a connect takes a loop pass)
    second = asyncio.create_task(backend.acquire("k2", timeout=5, max_concurrency=1))
    await asyncio.sleep(0)  # `second` waits for it
    first.cancel()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    if redis_version.startswith("5.") and isinstance(outcomes[0], BackendUnavailable):
        pytest.skip(f"redis-py {redis_version} turns the cancelled connect into an error")
    assert isinstance(outcomes[0], asyncio.CancelledError)
    lease = outcomes[1]
    assert not isinstance(lease, BaseException), repr(lease)
    assert lease.token > 0
    await lease.release()
    assert await leftovers(raw, namespace) == []


async def test_holders_that_never_released_leave_no_fence_behind(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """Holders whose process died (no renewal, no RELEASE) one after another on a busy key:
    each one's own fence in the key's `:m` hash goes once its lease has ended, so the hash
    keeps only the key's last fence and ticket however often that happens."""
    backend = make_backend(lease=0.3)
    meta = backend.redis_keys("k")[3]
    for _ in range(5):
        lease = await backend.acquire("k", timeout=5, max_concurrency=1)  # after the last ended
        lease._let_go()  # the process dies: it stops renewing and never releases
    last = await backend.acquire("k", timeout=5, max_concurrency=1)
    await last.release()
    assert {field.decode() for field in await raw.hkeys(meta)} <= {"fence", "seq"}
    # One more crash, and the holders' set expires (as a minute after the lease would) before
    # anyone calls: the next call still drops the fence left behind.
    lease = await backend.acquire("k", timeout=5, max_concurrency=1)
    lease._let_go()
    await raw.delete(backend.redis_keys("k")[0])
    assert lease._token_str.encode() in await raw.hkeys(meta)
    last = await backend.acquire("k", timeout=5, max_concurrency=1)
    await last.release()
    assert {field.decode() for field in await raw.hkeys(meta)} <= {"fence", "seq"}
    assert await leftovers(raw, namespace) == []


@pytest.fixture
def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


async def test_unreachable_redis_fails_closed_fast_with_retry_after(dead_url: str) -> None:
    backend = RedisBackend.from_url(dead_url, breaker_threshold=2, breaker_cooldown=5.0)
    lock = KeyedLock(backend=backend)
    errors = []
    for _ in range(4):
        with pytest.raises(BackendUnavailable) as caught:
            async with lock.hold("k"):
                pytest.fail("served without the lock service")
        errors.append(caught.value)
        assert lock.stats().active_keys == 0
    assert all(error.retry_after is not None and error.retry_after > 0 for error in errors)
    assert "circuit open" not in str(errors[0])  # real connection attempts first...
    assert "circuit open" in str(errors[-1])  # ...then the breaker answers at once
    assert 4 <= errors[-1].retry_after <= 5.0  # type: ignore[operator]
    rejection = rejection_for(errors[-1])
    assert rejection.status == 503
    assert rejection.retry_after == 5
    await lock.aclose()


async def test_fail_open_serves_under_the_in_process_lock(
    dead_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    lock = KeyedLock(backend=RedisBackend.from_url(dead_url), on_backend_error="open")
    inside = 0
    peak = 0

    async def user() -> None:
        nonlocal inside, peak
        async with lock.hold("k") as held:
            assert held.token == 0  # not fenced
            inside += 1
            peak = max(peak, inside)
            await anyio.lowlevel.checkpoint()
            inside -= 1

    with caplog.at_level("WARNING", logger="keyedlock_asgi"):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(user)
    assert peak == 1
    assert "on_backend_error='open'" in caplog.text
    assert lock.stats().active_keys == 0
    await lock.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_construction_under_trio_is_refused() -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        RedisBackend.from_url(REDIS_URL)


@pytest.fixture
def backend_made_outside_a_loop() -> RedisBackend:
    return RedisBackend.from_url(REDIS_URL)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_use_under_trio_is_refused(backend_made_outside_a_loop: RedisBackend) -> None:
    lock = KeyedLock(backend=backend_made_outside_a_loop)
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with lock.hold("k"):
            pytest.fail("ran under trio")
    assert lock.stats().active_keys == 0


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="lease"):
        RedisBackend.from_url(REDIS_URL, lease=0)
    with pytest.raises(ValueError, match="max_hold"):
        RedisBackend.from_url(REDIS_URL, lease=10, max_hold=5)
    with pytest.raises(ValueError, match="namespace"):
        RedisBackend.from_url(REDIS_URL, namespace="")
    with pytest.raises(ValueError, match="max_connections"):
        RedisBackend.from_url(REDIS_URL, max_connections=1)


# -- direct hand-off: the RELEASE script grants the head waiter itself -----------------------


async def _conn(backend: RedisBackend) -> Any:
    """The backend's connection for this loop (its process id, scripts and parked waiters)."""
    return await backend._connection()


def _script_name(script: Any) -> str:
    for name in ("ACQUIRE", "RELEASE", "EXTEND"):
        if script.script == getattr(_redis_scripts, name):
            return name.lower()
    raise AssertionError("unknown script")


def record_scripts(
    monkeypatch: pytest.MonkeyPatch, backend: RedisBackend, log: list[tuple[str, Any]]
) -> None:
    """Log every script `backend` runs, with its token and reply."""
    run = backend._run

    async def logged(script: Any, keys: list[str], args: list[Any], conn: Any) -> Any:
        result = await run(script, keys, args, conn)
        log.append((_script_name(script), args[0], result))
        return result

    monkeypatch.setattr(backend, "_run", logged)


async def queued_tokens(raw: Any, backend: RedisBackend, key: str) -> list[str]:
    return [name.decode() for name in await raw.zrange(backend.redis_keys(key)[1], 0, -1)]


async def holders(raw: Any, backend: RedisBackend, key: str) -> dict[str, float]:
    pairs = await raw.zrange(backend.redis_keys(key)[0], 0, -1, withscores=True)
    return {name.decode(): score for name, score in pairs}


async def server_ms(raw: Any) -> float:
    seconds, micros = await raw.time()
    return float(seconds * 1000 + micros // 1000)


async def test_hand_off_needs_no_second_acquire_and_the_claim_is_renewed(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The waiter runs ACQUIRE once (to queue); the holder's RELEASE makes it the holder with a
    claim lease and tells it the fence; it then renews the claim to a full lease."""
    holder = make_backend(lease=10, heartbeat=0.1)  # claim: 3 * 0.1 + 0.5 = 0.8 s
    waiter = make_backend(lease=10, heartbeat=0.1)
    scripts: list[tuple[str, Any]] = []
    record_scripts(monkeypatch, waiter, scripts)
    first = await holder.acquire("k", timeout=None, max_concurrency=1)
    wait = waiter.acquire("k", timeout=None, max_concurrency=1)
    async with anyio.create_task_group() as tg:
        got: list[Any] = []

        async def take() -> None:
            got.append(await wait)

        tg.start_soon(take)
        await wait_until(lambda: _eq(queue_length(raw, waiter, "k"), 1), "queued")
        (token,) = await queued_tokens(raw, waiter, "k")
        await first.release()
        granted = await holders(raw, waiter, "k")  # set by the holder's RELEASE itself
        now = await server_ms(raw)
        assert list(granted) == [token]
        assert granted[token] <= now + holder._claim_ms == now + 800  # a claim, not 10 s
        fence = int(await raw.hget(waiter.redis_keys("k")[3], token))
    (lease,) = got
    assert lease.token == fence > first.token
    acquires = [(tok, result[0]) for name, tok, result in scripts if name == "acquire"]
    assert acquires == [(token, 0)]  # that one call queued; the grant came by message
    # The claim is renewed to a full lease well before it ends.
    await wait_until(
        lambda: _renewed(raw, waiter, token, 10_000 - waiter._claim_ms), "claim renewed"
    )
    assert {name for name, _, _ in scripts[1:]} == {"extend"}
    assert not lease.lost
    await lease.release()
    assert await leftovers(raw, namespace) == []


async def _renewed(raw: Any, backend: RedisBackend, token: str, beyond_ms: float) -> bool:
    ends = (await holders(raw, backend, "k")).get(token)
    return ends is not None and ends - await server_ms(raw) > beyond_ms


async def test_lost_hand_off_message_is_found_by_the_fallback(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grant message never reaches the waiter: its fallback ACQUIRE finds the key already
    its own, with the fence of that same grant (not a new one)."""
    holder = make_backend()
    waiter = make_backend(heartbeat=0.1)
    conn = await _conn(waiter)
    events: list[tuple[str, str]] = []

    def drop(message: str) -> None:
        events.append(("dropped", message))

    monkeypatch.setattr(conn, "wake", drop)
    scripts: list[tuple[str, Any]] = []
    record_scripts(monkeypatch, waiter, scripts)
    first = await holder.acquire("k", timeout=None, max_concurrency=1)
    async with anyio.create_task_group() as tg:
        got: list[Any] = []

        async def take() -> None:
            got.append(await waiter.acquire("k", timeout=None, max_concurrency=1))
            events.append(("granted", str(got[0].token)))

        tg.start_soon(take)
        await wait_until(lambda: _eq(queue_length(raw, waiter, "k"), 1), "queued")
        (token,) = await queued_tokens(raw, waiter, "k")
        await first.release()
    (lease,) = got
    fence = str(lease.token)
    assert events == [("dropped", f"{token} {fence} {holder._claim_ms}"), ("granted", fence)]
    assert scripts[0][2][0] == 0  # queued
    assert scripts[-1] == ("acquire", token, (1, lease.token, 0))  # "already ours"
    assert not lease.lost
    await lease.release()
    assert await leftovers(raw, namespace) == []


async def test_hand_off_to_a_waiter_cancelled_at_that_moment_is_passed_on(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The waiter is cancelled just as its grant arrives: its give-up RELEASE frees the grant
    (reply 1) and hands the key to the next waiter, in another process."""
    holder, middle, last = make_backend(), make_backend(), make_backend()
    conn = await _conn(middle)
    scripts: list[tuple[str, Any]] = []
    record_scripts(monkeypatch, middle, scripts)
    events: list[str] = []
    handed: list[int] = []
    scope = anyio.CancelScope()
    wake = conn.wake

    def cancel_then_wake(message: str) -> None:
        events.append("grant arrives; cancelled")
        handed.append(int(message.split()[1]))
        scope.cancel()
        wake(message)

    monkeypatch.setattr(conn, "wake", cancel_then_wake)
    first = await holder.acquire("k", timeout=None, max_concurrency=1)
    async with anyio.create_task_group() as tg:

        async def cancelled() -> None:
            with scope:
                await middle.acquire("k", timeout=None, max_concurrency=1)
                events.append("middle entered")
            events.append("middle gone")

        async def next_in_line() -> None:
            lease = await last.acquire("k", timeout=None, max_concurrency=1)
            events.append("last entered")
            tokens.append(lease.token)
            await lease.release()

        tokens: list[int] = []
        tg.start_soon(cancelled)
        await wait_until(lambda: _eq(queue_length(raw, middle, "k"), 1), "middle queued")
        (middle_token,) = await queued_tokens(raw, middle, "k")
        tg.start_soon(next_in_line)
        await wait_until(lambda: _eq(queue_length(raw, middle, "k"), 2), "last queued")
        await first.release()
    # (The last waiter's message may be read before the middle's RELEASE reply.)
    assert events[0] == "grant arrives; cancelled"
    assert sorted(events[1:]) == ["last entered", "middle gone"]
    assert [name for name, _, _ in scripts] == ["acquire", "release"]
    assert scripts[-1] == ("release", middle_token, 1)  # it released the grant it was handed
    assert first.token < handed[0] < tokens[0]
    assert await leftovers(raw, namespace) == []


async def test_hand_off_racing_a_waiter_timeout_is_passed_on(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The waiter times out, and the key is handed to it just before its give-up RELEASE runs:
    that RELEASE frees the grant and the next waiter gets the key."""
    holder, middle, last = make_backend(), make_backend(), make_backend()
    events: list[str] = []
    run = middle._run
    first = await holder.acquire("k", timeout=None, max_concurrency=1)

    async def hand_off_first(script: Any, keys: list[str], args: list[Any], conn: Any) -> Any:
        if _script_name(script) == "release":  # the timed-out waiter gives up
            await first.release()
            events.append(f"handed to middle: {list(await holders(raw, middle, 'k'))}")
            result = await run(script, keys, args, conn)
            events.append(f"middle gave up: {result}")
            return result
        return await run(script, keys, args, conn)

    async with anyio.create_task_group() as tg:

        async def next_in_line() -> None:
            lease = await last.acquire("k", timeout=None, max_concurrency=1)
            events.append("last entered")
            await lease.release()

        async def times_out() -> None:
            with pytest.raises(LockTimeout):
                await middle.acquire("k", timeout=0.3, max_concurrency=1)
            events.append("middle timed out")

        monkeypatch.setattr(middle, "_run", hand_off_first)
        tg.start_soon(times_out)
        await wait_until(lambda: _eq(queue_length(raw, middle, "k"), 1), "middle queued")
        (middle_token,) = await queued_tokens(raw, middle, "k")
        tg.start_soon(next_in_line)
        await wait_until(lambda: _eq(queue_length(raw, middle, "k"), 2), "last queued")
    assert events[0] == f"handed to middle: {[middle_token]}"
    # (The last waiter's message may be read before the middle's RELEASE reply.)
    assert sorted(events[1:]) == ["last entered", "middle gave up: 1", "middle timed out"]
    assert events.index("middle gave up: 1") < events.index("middle timed out")
    assert await leftovers(raw, namespace) == []


async def test_hand_off_to_a_dead_waiter_ends_with_its_claim(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """A waiter queued and then its process died (nobody reads its channel, nobody asks
    again): the key is handed to it with a claim lease, not a full lease, and the next waiter
    gets the key when that claim ends, with a larger fence."""
    holder = make_backend(lease=10, heartbeat=0.1)
    survivor = make_backend(lease=10, heartbeat=0.1)
    conn = await _conn(holder)
    keys = holder.redis_keys("k")
    first = await holder.acquire("k", timeout=None, max_concurrency=1)
    dead = "deadprocess00000|1"
    # It had just proved itself alive (for a minute): only the claim can end its hold.
    args = [
        dead,
        10_000,
        60_000,
        3_600_000,
        conn.channel_prefix,
        1,
        "1",
        holder._claim_ms,
        conn.publish,
    ]
    assert (await holder._run(conn.acquire, keys, args, conn))[0] == 0  # queued
    async with anyio.create_task_group() as tg:
        got: list[tuple[Any, float]] = []

        async def next_in_line() -> None:
            lease = await survivor.acquire("k", timeout=None, max_concurrency=1)
            got.append((lease, await server_ms(raw)))

        tg.start_soon(next_in_line)
        await wait_until(lambda: _eq(queue_length(raw, holder, "k"), 2), "survivor queued")
        await first.release()
        claimed = await holders(raw, holder, "k")
        released_by = await server_ms(raw)
        dead_fence = int(await raw.hget(keys[3], dead))
    assert list(claimed) == [dead]
    assert claimed[dead] <= released_by + holder._claim_ms  # a claim (0.8 s), not 10 s
    ((lease, entered_at),) = got
    assert entered_at >= claimed[dead]  # never while the claim stood
    assert lease.token > dead_fence > first.token
    assert dead not in await holders(raw, holder, "k")
    await lease.release()
    assert await leftovers(raw, namespace) == []


async def test_a_late_hand_off_message_for_an_ended_claim_is_ignored(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B is handed the key, but the message is held back; B's claim ends and C is handed the
    key. When B's message finally arrives, B must not take it: C holds the key. B gets its
    own grant, with a larger fence, once C releases."""
    holder, b_side, c_side = make_backend(), make_backend(), make_backend()
    b_conn = await _conn(b_side)
    held_back: list[str] = []
    deliver = b_conn.wake
    monkeypatch.setattr(b_conn, "wake", held_back.append)
    b_scripts: list[tuple[str, Any]] = []
    record_scripts(monkeypatch, b_side, b_scripts)
    first = await holder.acquire("k", timeout=None, max_concurrency=1)
    got: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:

        async def take(name: str, backend: RedisBackend) -> None:
            got[name] = await backend.acquire("k", timeout=None, max_concurrency=1)

        tg.start_soon(take, "b", b_side)
        await wait_until(lambda: _eq(queue_length(raw, b_side, "k"), 1), "B queued")
        (b_token,) = await queued_tokens(raw, b_side, "k")
        tg.start_soon(take, "c", c_side)
        await wait_until(lambda: _eq(queue_length(raw, b_side, "k"), 2), "C queued")
        await first.release()  # hands B a claim; its message is held back
        await wait_until(lambda: bool(held_back), "B's grant message sent")
        # B's claim ends (as if B stalled past it): then B asks again, which prunes it and
        # hands the key to C.
        own = b_side.redis_keys("k")[0]
        await raw.zadd(own, {b_token: await server_ms(raw) - 1})
        asked = len(b_scripts)
        b_conn.wake_all()
        await wait_until(lambda: "c" in got, "C handed the key")
        await wait_until(lambda: len(b_scripts) > asked, "B asked again")
        # Now the late message for B's ended claim arrives.
        asked = len(b_scripts)
        monkeypatch.setattr(b_conn, "wake", deliver)
        deliver(held_back[0])
        await wait_until(lambda: len(b_scripts) > asked, "B asked again after it")
        assert "b" not in got  # C holds the key: B still waits
        (only_holder,) = await holders(raw, b_side, "k")
        assert only_holder != b_token
        await got["c"].release()
    assert got["b"].token > got["c"].token > first.token
    assert not got["b"].lost
    await got["b"].release()
    assert await leftovers(raw, namespace) == []


# -- in-process hand-off: the lease goes to the next caller of the same process -------------


def record_acquires(
    monkeypatch: pytest.MonkeyPatch, backend: RedisBackend, log: list[tuple[str, str, str, Any]]
) -> None:
    """Log every script `backend` runs: its name, token, the ended hold's token it carries
    (ACQUIRE's last argument), and its reply."""
    run = backend._run

    async def logged(script: Any, keys: list[str], args: list[Any], conn: Any) -> Any:
        name = _script_name(script)
        result = await run(script, keys, args, conn)
        log.append((name, args[0], args[9] if name == "acquire" else "", result))
        return result

    monkeypatch.setattr(backend, "_run", logged)


async def test_in_process_hand_off_is_one_acquire_that_releases_the_hold_before(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a1 leaves with a2 (same process) and c1 (another process, first in Redis) waiting:
    a2's one ACQUIRE releases a1's lease, which hands the key to c1, and queues a2; c1 leaves
    the same way to c2. No RELEASE runs for a1 or c1; arrival order holds across processes;
    tokens rise; Redis never has two holders, nor one other than who is inside."""
    a_side, c_side = make_backend(), make_backend()
    a, c = KeyedLock(backend=a_side), KeyedLock(backend=c_side)
    scripts: list[tuple[str, str, str, Any]] = []
    record_acquires(monkeypatch, a_side, scripts)
    record_acquires(monkeypatch, c_side, scripts)
    timeline = Timeline()
    tokens: dict[str, int] = {}
    redis_tokens: dict[str, str] = {}
    leave = anyio.Event()

    async def user(lock: KeyedLock, name: str, task_status: Any) -> None:
        async with lock.hold("k") as held:
            timeline.enter("k", name)
            tokens[name] = held.token
            redis_tokens[name] = held._leases[0]._token_str  # type: ignore[union-attr]
            task_status.started()
            if name == "a1":
                await leave.wait()
            assert list(await holders(raw, a_side, "k")) == [redis_tokens[name]]
            timeline.leave("k", name)

    async with anyio.create_task_group() as tg:
        await tg.start(user, a, "a1")
        tg.start_soon(user, c, "c1", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: _eq(queue_length(raw, a_side, "k"), 1), "c1 queued")
        tg.start_soon(user, a, "a2", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: a.waiting("k") == 1, "a2 queued in its process")
        tg.start_soon(user, c, "c2", anyio.TASK_STATUS_IGNORED)
        await wait_until(lambda: c.waiting("k") == 1, "c2 queued in its process")
        leave.set()
    assert timeline.entries() == ["a1", "c1", "a2", "c2"]
    assert timeline.most["k"] == 1
    assert [tokens[name] for name in ("a1", "c1", "a2", "c2")] == sorted(set(tokens.values()))
    a1, c1, a2, c2 = (redis_tokens[name] for name in ("a1", "c1", "a2", "c2"))
    acquires = [(token, passed) for name, token, passed, _ in scripts if name == "acquire"]
    assert acquires == [(a1, ""), (c1, ""), (a2, a1), (c2, c1)]
    releases = [(token, result) for name, token, _, result in scripts if name == "release"]
    assert releases == [(a2, 1), (c2, 1)]  # nobody of their process waited
    assert await leftovers(raw, namespace) == []


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_successor_cancelled_during_its_acquire_leaves_nothing_held(
    make_backend: Callable[..., RedisBackend],
    raw: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """The caller handed the key in-process is cancelled while the ACQUIRE that releases the
    ended hold's lease is on its way: `before` it ran in Redis, or `after` it ran (and granted
    the key) but before its reply is used. Either way its give-up releases both tokens, so
    another process gets the key at once, with a larger token."""
    side = make_backend()
    lock = KeyedLock(backend=side)
    other = KeyedLock(backend=make_backend())
    run = side._run
    doomed = anyio.CancelScope()
    scripts: list[tuple[str, Any]] = []

    async def racing(script: Any, keys: list[str], args: list[Any], conn: Any) -> Any:
        if _script_name(script) == "acquire" and args[9]:
            if when == "after":
                scripts.append(("acquire", await run(script, keys, args, conn)))
            doomed.cancel()
            await anyio.lowlevel.checkpoint()  # the cancellation lands here
        result = await run(script, keys, args, conn)
        scripts.append((_script_name(script), result))
        return result

    async def successor() -> None:
        with doomed:
            async with lock.hold("k"):
                pytest.fail("entered although cancelled before its grant was known")

    async with anyio.create_task_group() as tg, lock.hold("k") as first:
        tg.start_soon(successor)
        await wait_until(lambda: lock.waiting("k") == 1, "successor queued")
        monkeypatch.setattr(side, "_run", racing)
    assert doomed.cancelled_caught
    # Its give-up releases its own token, then the ended hold's: one of them was still held.
    if when == "before":
        assert scripts == [("release", 0), ("release", 1)]
    else:
        assert [name for name, _ in scripts] == ["acquire", "release", "release"]
        assert scripts[0][1][0] == 1  # it had been granted the key
        assert scripts[1:] == [("release", 1), ("release", 0)]
    assert lock.stats().active_keys == 0
    async with other.hold("k", timeout=0) as held:
        assert held.token > first.token
    assert await leftovers(raw, namespace) == []


async def test_a_lost_lease_passed_on_revokes_only_its_own_block(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """The holder's lease is lost (its entry gone from Redis): its block is revoked and leaving
    raises HoldExpired. The lease still travels to the caller next in line, whose ACQUIRE finds
    it gone and takes a fresh grant: that block runs to its end, its own lease intact, and the
    loss is reported once, for the holder's token only."""
    lost: list[LeaseLost] = []
    backend = make_backend(on_lease_lost=lost.append)
    lock = KeyedLock(backend=backend, max_hold=60)  # a revocable hold
    timeline = Timeline()
    entered = anyio.Event()
    got: dict[str, Any] = {}

    async def hold_until_revoked() -> None:
        async with lock.hold("k") as held:
            timeline.enter("k", "holder")
            got["holder"] = held
            entered.set()
            try:
                await anyio.sleep_forever()
            finally:
                timeline.leave("k", "holder")

    async def holder() -> None:
        with pytest.raises(HoldExpired, match="lease"):
            await hold_until_revoked()

    async def successor() -> None:
        async with lock.hold("k") as held:
            timeline.enter("k", "successor")
            got["successor"] = held
            await anyio.lowlevel.checkpoint()
            timeline.leave("k", "successor")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await entered.wait()
        tg.start_soon(successor)
        await wait_until(lambda: lock.waiting("k") == 1, "successor queued")
        lease = got["holder"]._leases[0]
        await raw.zrem(backend.redis_keys("k")[0], lease._token_str)  # as if it had expired
        await lease._renew()  # the next renewal finds it gone
    assert timeline.entries() == ["holder", "successor"]
    assert timeline.most["k"] == 1
    assert [event.token for event in lost] == [got["holder"].token]
    assert got["successor"].token > got["holder"].token
    assert not got["successor"]._leases[0].lost
    assert await leftovers(raw, namespace) == []


async def test_a_successor_timing_out_behind_another_process_leaves_only_that_holder(
    make_backend: Callable[..., RedisBackend], raw: Any, namespace: str
) -> None:
    """a1 leaves to a2 (same process) while c1 (another process) waits in Redis: a2's ACQUIRE
    releases a1 and hands the key to c1, then a2 waits in Redis and runs out of time there.
    It leaves the queue: Redis then knows c1 only, and a has nothing held or queued."""
    a_side, c_side = make_backend(), make_backend()
    a, c = KeyedLock(backend=a_side), KeyedLock(backend=c_side)
    c_inside = anyio.Event()
    c_leave = anyio.Event()

    async def c1() -> None:
        async with c.hold("k"):
            c_inside.set()
            await c_leave.wait()

    async def a2() -> None:
        with pytest.raises(LockTimeout):
            async with a.hold("k", timeout=0.5):
                pytest.fail("granted while another process held the key")

    async with anyio.create_task_group() as tg:
        async with a.hold("k"):
            tg.start_soon(c1)
            await wait_until(lambda: _eq(queue_length(raw, a_side, "k"), 1), "c1 queued")
            tg.start_soon(a2)
            await wait_until(lambda: a.waiting("k") == 1, "a2 queued in its process")
        await c_inside.wait()
        await wait_until(lambda: a.stats().active_keys == 0, "a2 timed out")
        assert await queue_length(raw, a_side, "k") == 0
        (only,) = await holders(raw, a_side, "k")
        assert only.startswith(await _proc_id(c_side))
        c_leave.set()
    assert await leftovers(raw, namespace) == []


async def _proc_id(backend: RedisBackend) -> str:
    return str((await _conn(backend)).proc_id)
