"""OpenTelemetry metrics and spans (`keyedlock_asgi.otel`), read back from the SDK's in-memory
reader and span exporter, on every engine and both event loops."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

import anyio
import pytest
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.routing import Route

from keyedlock_asgi import (
    BackendUnavailable,
    HoldExpired,
    KeyedLock,
    KeyedLockMiddleware,
    LockClosed,
    keys,
)
from keyedlock_asgi.otel import INSTRUMENTS, LockMetrics
from tests.support.middleware import Gated, client
from tests.support.otel import Telemetry
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

MakeLock = Callable[..., KeyedLock]
SECRET = "user-4711-secret"  # the key: it must appear in no attribute, label or span name
REQUESTS, WAIT, HOLD, HOLDERS, WAITING = INSTRUMENTS


async def drive_every_result(lock: KeyedLock, key: str) -> None:
    """One request of each result: acquired (free, then after a wait), busy, timeout,
    aborted, canceled, queue_full; and one hold that ends with an error."""
    inside, leave = anyio.Event(), anyio.Event()

    async def fail_holding() -> None:
        async with lock.hold(key, on_error="stop"):
            inside.set()
            await leave.wait()
            raise RuntimeError("holder failed")

    async def holder() -> None:
        with pytest.raises(RuntimeError):
            await fail_holding()

    async def attempt(**options: object) -> None:
        try:
            async with lock.hold(key, **options):  # type: ignore[arg-type]
                pass
        except Exception:
            pass

    scope = anyio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await attempt()

    async with lock.hold(key):
        pass
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await inside.wait()
        await attempt(timeout=0)  # busy
        await attempt(timeout=0.05)  # timeout: the holder waits on `leave`, set below
        tg.start_soon(attempt)  # aborted by the failing holder
        await wait_until(lambda: lock.waiting(key) == 1, "lock.waiting(key) == 1")
        tg.start_soon(cancelled)
        await wait_until(lambda: lock.waiting(key) == 2, "lock.waiting(key) == 2")
        scope.cancel()
        await wait_until(lambda: lock.waiting(key) == 1, "lock.waiting(key) == 1")
        await attempt(max_waiting=1)  # queue_full
        leave.set()
    inside2, leave2 = anyio.Event(), anyio.Event()

    async def holder2() -> None:
        async with lock.hold(key):
            inside2.set()
            await leave2.wait()

    async with anyio.create_task_group() as tg:  # acquired after queueing
        tg.start_soon(holder2)
        await inside2.wait()
        tg.start_soon(attempt)
        await wait_until(lambda: lock.waiting(key) == 1, "lock.waiting(key) == 1")
        leave2.set()


async def test_counts_per_result_and_both_histograms(make_lock: MakeLock, engine: str) -> None:
    telemetry = Telemetry()
    lock = telemetry.observe(make_lock(metrics=False, name="orders"))
    await drive_every_result(lock, SECRET)
    total = telemetry.total
    common = {"keyedlock_lock_name": "orders", "keyedlock_mode": "exclusive"}
    backend = "memory" if engine == "memory" else "redis" if "redis" in engine else "postgres"
    assert total(REQUESTS, keyedlock_backend=backend, **common) == 9
    counts = {
        result: total(REQUESTS, keyedlock_result=result, **common)
        for result in ("acquired", "busy", "timeout", "aborted", "canceled", "queue_full")
    }
    assert counts == {
        "acquired": 4,  # free, the failing holder, a holder, after a wait
        "busy": 1,
        "timeout": 1,
        "aborted": 1,
        "canceled": 1,
        "queue_full": 1,
    }
    for result in ("timeout", "aborted", "canceled"):  # they queued: their waits are recorded
        assert total(WAIT, keyedlock_result=result) == 1
    for result in ("busy", "queue_full"):  # turned away at once: no wait
        assert total(WAIT, keyedlock_result=result) == 0
    assert total(WAIT, keyedlock_result="acquired") == 1  # only the grant that queued
    assert total(HOLD, keyedlock_release="normal") == 3
    assert total(HOLD, keyedlock_release="error") == 1
    assert all(p.sum >= 0 and p.min >= 0 for p in telemetry.points(WAIT) + telemetry.points(HOLD))
    # idle: the up-down counters are back to zero
    assert telemetry.idle()
    assert SECRET not in telemetry.dump()


async def test_up_down_counters_while_held_and_queued(make_lock: MakeLock) -> None:
    telemetry = Telemetry()
    lock = telemetry.observe(make_lock(metrics=False))
    inside, leave = anyio.Event(), anyio.Event()

    async def holder(**options: object) -> None:
        async with lock.hold("a", **options):  # type: ignore[arg-type]
            inside.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await inside.wait()
        tg.start_soon(holder)
        tg.start_soon(holder)
        await wait_until(lambda: lock.waiting("a") == 2, "lock.waiting('a') == 2")
        assert telemetry.total(HOLDERS) == 1
        assert telemetry.total(WAITING) == 2
        leave.set()
    assert telemetry.idle()


async def test_shared_holds_carry_their_mode() -> None:
    telemetry = Telemetry()
    lock = telemetry.observe(KeyedLock(metrics=False))
    async with lock.hold("a", shared=True), lock.hold("b", shared=True):
        assert telemetry.total(HOLDERS, keyedlock_mode="shared") == 2
        assert telemetry.total(HOLDERS, keyedlock_mode="exclusive") == 0
    assert telemetry.total(HOLDERS, keyedlock_mode="shared") == 0
    assert telemetry.total(REQUESTS, keyedlock_mode="shared") == 2


async def test_a_wait_span_for_each_caller_that_queued(make_lock: MakeLock) -> None:
    telemetry = Telemetry()
    lock = telemetry.observe(make_lock(metrics=False, name="carts"))
    tracer = telemetry.tracer_provider.get_tracer("test")
    inside, leave = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with lock.hold(SECRET):
            inside.set()
            await leave.wait()

    async def waiter(timeout: float | None) -> None:
        with tracer.start_as_current_span("request"):
            try:
                async with lock.hold(SECRET, timeout=timeout):
                    pass
            except Exception:
                pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await inside.wait()
        await waiter(0.05)  # queues, then times out
        tg.start_soon(waiter, None)
        await wait_until(lambda: lock.waiting(SECRET) == 1, "lock.waiting(SECRET) == 1")
        leave.set()
    spans = {span.name: [] for span in telemetry.spans()}
    for span in telemetry.spans():
        spans[span.name].append(span)
    assert len(spans["request"]) == 2  # the holder did not queue: no wait span for it
    waits = spans["keyedlock.wait"]
    assert [w.attributes["keyedlock.result"] for w in waits] == ["timeout", "acquired"]
    for wait, request in zip(waits, spans["request"], strict=True):
        assert wait.parent is not None
        assert wait.parent.span_id == request.context.span_id  # a child of the current span
        assert wait.attributes["keyedlock.lock.name"] == "carts"
        assert wait.start_time <= wait.end_time
    assert waits[0].status.status_code == trace.StatusCode.ERROR
    assert waits[1].status.status_code == trace.StatusCode.UNSET
    assert SECRET not in telemetry.dump()


async def test_several_keys_are_one_wait() -> None:
    telemetry = Telemetry()
    lock = telemetry.observe(KeyedLock(metrics=False))
    inside = {"x": anyio.Event(), "y": anyio.Event()}
    leave = {"x": anyio.Event(), "y": anyio.Event()}

    async def holder(key: str) -> None:
        async with lock.hold(key):
            inside[key].set()
            await leave[key].wait()

    async def both() -> None:
        async with lock.hold("x", "y"):
            pass

    async with anyio.create_task_group() as tg:
        for key in ("x", "y"):
            tg.start_soon(holder, key)
            await inside[key].wait()
        tg.start_soon(both)
        await wait_until(lambda: lock.waiting("x") == 1, "lock.waiting('x') == 1")
        leave["x"].set()
        await wait_until(lambda: lock.waiting("y") == 1, "queued again, on its second key")
        assert telemetry.total(WAITING) == 1
        leave["y"].set()
    assert telemetry.idle()
    assert telemetry.total(WAIT) == 1
    assert len([s for s in telemetry.spans() if s.name == "keyedlock.wait"]) == 1


async def test_http_method_and_route_template_through_the_middleware() -> None:
    telemetry = Telemetry()
    lock = telemetry.observe(KeyedLock(metrics=False, name="http"))
    gated = Gated()
    app = KeyedLockMiddleware(
        Starlette(routes=[Route("/orders/{order_id}/pay", gated.endpoint, methods=["POST"])]),
        key=keys.path_param("order_id"),
        include=["/orders/{order_id}/pay"],
        lock=lock,
    )
    path = f"/orders/{SECRET}/pay"
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.post(path, params={"n": "first"}))
        await gated.entered("first").wait()
        tg.start_soon(lambda: http.post(path, params={"n": "second"}))
        await wait_until(lambda: lock.waiting(SECRET) == 1, "second request queued")
        gated.gate("first").set()
        gated.gate("second").set()
    route = {"http_route": "/orders/{order_id}/pay", "http_request_method": "POST"}
    assert telemetry.total(REQUESTS, keyedlock_result="acquired", **route) == 2
    assert telemetry.total(WAIT, keyedlock_result="acquired", **route) == 1
    assert telemetry.total(HOLD, keyedlock_release="normal", **route) == 2
    assert telemetry.idle()
    assert SECRET not in telemetry.dump()


def test_metrics_through_the_lock_options() -> None:
    telemetry = Telemetry()
    lock = KeyedLock(meter_provider=telemetry.meter_provider, name="wired")

    async def use() -> None:
        async with lock.hold("k"):
            pass

    anyio.run(use)
    assert telemetry.total(REQUESTS, keyedlock_lock_name="wired") == 1
    assert any(isinstance(o, LockMetrics) for o in lock._observers)
    assert not any(isinstance(o, LockMetrics) for o in KeyedLock(metrics=False)._observers)


def test_with_the_api_alone_nothing_is_attached_until_a_provider_is_set() -> None:
    """opentelemetry-api without an SDK answers with placeholders: nothing to record into, so
    nothing is attached. A global provider set later is picked up on the lock's next event
    loop. In a subprocess: a process sets its global provider only once."""
    code = (
        "import anyio\n"
        "from opentelemetry import metrics\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "from keyedlock_asgi import KeyedLock\n"
        "lock = KeyedLock(name='late')\n"
        "async def use():\n"
        "    async with lock.hold('k'):\n"
        "        pass\n"
        "anyio.run(use)\n"
        "assert lock._observers == (), lock._observers\n"
        "reader = InMemoryMetricReader()\n"
        "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
        "anyio.run(use)\n"  # a new event loop: the provider is looked up again
        "anyio.run(use, backend='trio')\n"
        "names = [m.name for r in reader.get_metrics_data().resource_metrics\n"
        "         for s in r.scope_metrics for m in s.metrics]\n"
        "assert 'keyedlock.lock.requests' in names, names\n"
        "assert len(lock._observers) == 1, lock._observers\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_global_tracer_provider_alone_attaches_the_observer() -> None:
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "from keyedlock_asgi import KeyedLock\n"
        "from keyedlock_asgi.otel import LockMetrics\n"
        "assert isinstance(KeyedLock()._observers[0], LockMetrics)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_without_opentelemetry_nothing_is_attached_and_nothing_fails() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # as if it were not installed
        "import anyio\n"
        "from keyedlock_asgi import KeyedLock\n"
        "lock = KeyedLock()\n"
        "assert lock._observers == (), lock._observers\n"
        "async def use():\n"
        "    async with lock.hold('k'):\n"
        "        pass\n"
        "anyio.run(use)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


async def test_rejections_carry_the_route_when_a_route_layer_took_the_key() -> None:
    """The middleware turns a request away before routing (no `http.route`); a route guard
    runs after the router, so its rejections carry the template."""
    telemetry = Telemetry()
    lock = telemetry.observe(KeyedLock(metrics=False, name="http"))
    gated = Gated()
    guarded = lock.serialize(keys.path_param("cart_id"), timeout=0)(gated.endpoint)
    routes = [
        Route("/orders/{order_id}", gated.endpoint, methods=["PUT"]),
        Route("/carts/{cart_id}", guarded, methods=["POST"]),
    ]
    app = KeyedLockMiddleware(
        Starlette(routes=routes),
        key=keys.path_param("order_id"),
        include=["/orders/{order_id}"],
        lock=lock,
        timeout=0,
    )
    async with client(app) as http, anyio.create_task_group() as tg:
        for path in (f"/orders/{SECRET}", f"/carts/{SECRET}"):
            tg.start_soon(
                lambda path=path: http.request(
                    "PUT" if "orders" in path else "POST", path, params={"n": path}
                )
            )
            with anyio.fail_after(30):  # bounded: a hang fails loudly, naming its step
                await gated.entered(path).wait()
            with anyio.fail_after(30):
                answer = await http.request(
                    "PUT" if "orders" in path else "POST", path, params={"n": "x"}
                )
            assert answer.status_code == 409
            gated.gate(path).set()
            await wait_until(lambda: not lock.locked(SECRET), "the key is free again")
    busy = {"keyedlock_result": "busy"}
    assert telemetry.total(REQUESTS, http_request_method="PUT", **busy) == 1
    [middleware_busy] = [
        p
        for p in telemetry.points(REQUESTS)
        if p.attributes["keyedlock.result"] == "busy"
        and p.attributes["http.request.method"] == "PUT"
    ]
    assert "http.route" not in middleware_busy.attributes
    assert telemetry.total(REQUESTS, http_route="/carts/{cart_id}", **busy) == 1
    assert (
        telemetry.total(REQUESTS, http_route="/orders/{order_id}", keyedlock_result="acquired") == 1
    )
    assert telemetry.idle()
    assert SECRET not in telemetry.dump()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py runs on asyncio only
async def test_backend_unavailable_is_counted() -> None:
    from keyedlock_asgi.backends.redis import RedisBackend

    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", retries=0)
    telemetry = Telemetry()
    lock = telemetry.observe(KeyedLock(metrics=False, backend=backend))
    try:
        with pytest.raises(BackendUnavailable):
            async with lock.hold(SECRET):
                pass
    finally:
        await lock.aclose()
    assert (
        telemetry.total(REQUESTS, keyedlock_result="backend_unavailable", keyedlock_backend="redis")
        == 1
    )
    assert telemetry.idle()


async def test_closed_and_expired(make_lock: MakeLock) -> None:
    """A hold asked of a drained lock is `closed`; one revoked by `max_hold` is `expired`."""
    telemetry = Telemetry()
    lock = telemetry.observe(make_lock(metrics=False))
    with pytest.raises(HoldExpired):
        async with lock.hold(SECRET, max_hold=0.05):
            await anyio.sleep_forever()  # revoked after max_hold: the bound of this wait
    await lock.drain()
    with pytest.raises(LockClosed):
        async with lock.hold(SECRET):
            pass
    assert telemetry.total(HOLD, keyedlock_release="expired") == 1
    assert telemetry.total(REQUESTS, keyedlock_result="closed") == 1
    assert telemetry.idle()
