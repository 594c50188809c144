"""OpenTelemetry's SDK wired to in-memory readers: what a `LockMetrics` recorded, read back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keyedlock_asgi import KeyedLock
from keyedlock_asgi.otel import LockMetrics


class Telemetry:
    """A meter provider and a tracer provider of our own (never the global ones)."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def observe(self, lock: KeyedLock) -> KeyedLock:
        """Attach a `LockMetrics` for these providers to `lock` (made with `metrics=False`)."""
        lock.add_observer(LockMetrics(lock, self.meter_provider, self.tracer_provider))
        return lock

    def points(self, name: str) -> list[Any]:
        """Every data point of the instrument `name` (empty if it recorded nothing)."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def total(self, name: str, **where: str) -> float:
        """Counters: the sum of values; histograms: the count, over points matching `where`
        (attribute names with `_` for `.`: `keyedlock_result="busy"`)."""
        wanted = {key.replace("_", "."): value for key, value in where.items()}
        total = 0.0
        for point in self.points(name):
            if _matches(point.attributes, wanted):
                total += point.value if hasattr(point, "value") else point.count
        return total

    def idle(self) -> bool:
        """Whether every series of both up-down counters is back to zero (not just their sum:
        a -1 recorded under other attributes than its +1 leaves two series off by one)."""
        points = self.points("keyedlock.lock.holders") + self.points("keyedlock.lock.waiting")
        return all(point.value == 0 for point in points)

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def dump(self) -> str:
        """Everything recorded, as text (to look for what must never be there)."""
        data = self.reader.get_metrics_data()
        metrics = data.to_json() if data is not None else ""
        return metrics + "".join(span.to_json() for span in self.spans())


def _matches(attributes: Mapping[str, Any] | None, wanted: Mapping[str, str]) -> bool:
    attributes = attributes or {}
    return all(attributes.get(key) == value for key, value in wanted.items())
