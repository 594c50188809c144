"""Prometheus scraping a lock's metrics through OpenTelemetry's exporter (docs/observability.md)."""

from __future__ import annotations

from typing import Any

# --8<-- [start:prometheus]
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server

from keyedlock_asgi import KeyedLock


def serve_metrics(port: int = 9464) -> tuple[MeterProvider, Any]:
    """Serve /metrics on `port` for Prometheus: the provider for the locks, and the server."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return provider, server


def checkout_lock(provider: MeterProvider) -> KeyedLock:
    return KeyedLock(name="checkout", meter_provider=provider)


# At start-up:  provider, server = serve_metrics();  lock = checkout_lock(provider)
# --8<-- [end:prometheus]
