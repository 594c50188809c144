"""OpenTelemetry metrics and the `keyedlock.wait` span, read off the lock's event stream.

`LockMetrics` is an observer (`_events`): the lock's grant and release paths do not know it
exists, and a lock without it pays nothing. `KeyedLock(metrics=True)` (the default) attaches
one when `opentelemetry-api` is installed (extra `keyedlock_asgi[otel]`); this is the only
module that imports it.

A granted request is counted when it gives its keys back, not when it gets them: the
middleware takes the key before the router runs, so the route template (`scope["route"]`,
set by Starlette's router) is only known once the app has run. Rejections are counted at
once, with the route when a route layer (decorator, dependency) took the key. The key is
never an attribute: a metric series per key would grow without bound and leak user data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics, trace

from ._events import LockEvent

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import Attributes

    from ._lock import Held, KeyedLock

__all__ = ["INSTRUMENTS", "LockMetrics", "listening"]

INSTRUMENTS: Final = (
    "keyedlock.lock.requests",
    "keyedlock.lock.wait.duration",
    "keyedlock.lock.hold.duration",
    "keyedlock.lock.holders",
    "keyedlock.lock.waiting",
)
"""The instrument names `LockMetrics` records (API.md, "Observability")."""

_SCOPE = "keyedlock_asgi"

# Bucket bounds in seconds for both histograms: lock waits and holds run from microseconds
# (an uncontended hand-over) to the seconds of a slow request; OpenTelemetry's default
# bounds (0 to 10 000) suit milliseconds, not seconds.
_BUCKETS: Final = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def listening(meter_provider: MeterProvider | None = None) -> bool:
    """Whether recording would reach anything: a meter provider passed, or a global meter or
    tracer provider set by an SDK.

    With opentelemetry-api alone the global providers are its placeholders (no-op providers,
    and proxies waiting for a real one): recording through them costs microseconds per hold
    and reaches nothing, so `KeyedLock(metrics=True)` attaches only once this is true.
    """
    if meter_provider is not None:
        return True
    return not (
        _placeholder(metrics.get_meter_provider()) and _placeholder(trace.get_tracer_provider())
    )


def _placeholder(provider: object) -> bool:
    """A provider defined by opentelemetry-api itself: a no-op, or a proxy without a delegate."""
    return type(provider).__module__.startswith(("opentelemetry.metrics", "opentelemetry.trace"))


def backend_name(lock: KeyedLock) -> str:
    """`memory` without a backend; else the backend's class name without `Backend`, lowered
    (`RedisBackend` -> `redis`, `PostgresBackend` -> `postgres`)."""
    backend = lock.backend
    if backend is None:
        return "memory"
    name = type(backend).__name__
    return (name[: -len("Backend")] if name.endswith("Backend") else name).lower()


def http_attributes(context: Any) -> dict[str, str]:
    """`http.request.method` and `http.route` of an ASGI scope; nothing for anything else.

    The route is the template of the route Starlette matched (`scope["route"].path`), never
    the request path (which carries ids, and often the key).
    """
    if type(context) is not dict or context.get("type") not in ("http", "websocket"):
        return {}
    found: dict[str, str] = {}
    method = context.get("method")
    if isinstance(method, str):
        found["http.request.method"] = method
    template = getattr(context.get("route"), "path", None)
    if isinstance(template, str):
        found["http.route"] = template
    return found


class LockMetrics:
    """The five instruments of one lock and its `keyedlock.wait` spans: a `LockObserver`.

    Add it with `lock.add_observer(LockMetrics(lock))`, or let `KeyedLock(metrics=True)` do so.
    Holds are tracked by `id()` only between their first and last event (queued to granted or
    rejected; granted to released), so nothing outlives a hold.
    """

    def __init__(
        self,
        lock: KeyedLock,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._requests = meter.create_counter(
            "keyedlock.lock.requests",
            unit="{request}",
            description="Requests for keys, by result.",
        )
        self._wait = meter.create_histogram(
            "keyedlock.lock.wait.duration",
            unit="s",
            description="Time requests that queued spent waiting for their keys.",
            explicit_bucket_boundaries_advisory=_BUCKETS,
        )
        self._hold = meter.create_histogram(
            "keyedlock.lock.hold.duration",
            unit="s",
            description="Time keys were held, by how the hold ended.",
            explicit_bucket_boundaries_advisory=_BUCKETS,
        )
        self._holders = meter.create_up_down_counter(
            "keyedlock.lock.holders", unit="{hold}", description="Holds granted, not released."
        )
        self._waiting = meter.create_up_down_counter(
            "keyedlock.lock.waiting", unit="{request}", description="Requests queued for keys."
        )
        base = {"keyedlock.lock.name": lock.name, "keyedlock.backend": backend_name(lock)}
        self._modes = (
            {**base, "keyedlock.mode": "exclusive"},
            {**base, "keyedlock.mode": "shared"},
        )
        # Attributes with a result or a release, made once per mode for holds without context
        self._tagged: dict[tuple[bool, str, str], dict[str, str]] = {}
        # id(held) -> (attributes of its +1 on `waiting`, its span): between queued and the end
        self._queued: dict[int, tuple[Attributes, Span]] = {}
        # id(held) -> attributes of its +1 on `holders`: between granted and released
        self._held: dict[int, Attributes] = {}

    def _attributes(self, held: Held) -> dict[str, str]:
        attributes = self._modes[held.shared]
        context = held.context
        if context is None:
            return attributes
        return {**attributes, **http_attributes(context)}

    def _with(self, held: Held, name: str, value: str) -> dict[str, str]:
        """The hold's attributes plus one more (cached when the hold has no context)."""
        if held.context is not None:
            return {**self._attributes(held), name: value}
        shared = held.shared
        found = self._tagged.get((shared, name, value))
        if found is None:
            found = self._tagged[shared, name, value] = {**self._modes[shared], name: value}
        return found

    def __call__(self, event: LockEvent) -> None:
        held = event.held
        kind = event.kind
        if kind == "released":
            self._holders.add(-1, self._held.pop(id(held)))
            acquired = self._with(held, "keyedlock.result", "acquired")
            self._requests.add(1, acquired)
            if event.queued:
                self._wait.record(event.waited, acquired)
            release = self._with(held, "keyedlock.release", event.outcome or "normal")
            self._hold.record(event.held_for, release)
        elif kind == "granted":
            self._stop_waiting(held, "acquired")
            attributes = self._attributes(held)
            self._held[id(held)] = attributes
            self._holders.add(1, attributes)
        elif kind == "queued":
            if id(held) in self._queued:  # several keys: the next key queued; still one wait
                return
            attributes = self._attributes(held)
            span = self._tracer.start_span("keyedlock.wait", attributes=attributes)
            self._queued[id(held)] = (attributes, span)
            self._waiting.add(1, attributes)
        else:  # rejected
            self._stop_waiting(held, event.outcome)
            result = self._with(held, "keyedlock.result", event.outcome or "canceled")
            self._requests.add(1, result)
            if event.queued:
                self._wait.record(event.waited, result)

    def _stop_waiting(self, held: Held, result: str | None) -> None:
        """End the wait of a hold that queued: its `waiting` -1 and its span."""
        entry = self._queued.pop(id(held), None)
        if entry is None:
            return
        attributes, span = entry
        self._waiting.add(-1, attributes)
        if result is not None:
            span.set_attribute("keyedlock.result", result)
            if result != "acquired":
                span.set_status(trace.StatusCode.ERROR, result)
        span.end()
