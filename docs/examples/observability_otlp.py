"""OpenTelemetry metrics and spans of a lock, exported over OTLP (docs/observability.md)."""

from __future__ import annotations

# --8<-- [start:otlp]
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from keyedlock_asgi import KeyedLock


def setup_otlp(endpoint: str = "http://127.0.0.1:4318") -> MeterProvider:
    """Send metrics every 10 s and spans in batches to an OpenTelemetry Collector."""
    resource = Resource.create({"service.name": "checkout"})
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"), export_interval_millis=10_000
    )
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(provider)  # the global provider: every KeyedLock uses it
    tracing = TracerProvider(resource=resource)
    tracing.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    )
    trace.set_tracer_provider(tracing)
    return provider


# At start-up, before the locks are made:
#     setup_otlp()
#     lock = KeyedLock(name="checkout")  # metrics=True by default: the global provider
# --8<-- [end:otlp]


def lock_for(provider: MeterProvider) -> KeyedLock:
    """A lock on an explicit provider (what the test uses, leaving the globals alone)."""
    return KeyedLock(name="checkout", meter_provider=provider)
