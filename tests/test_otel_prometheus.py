"""Prometheus: OpenTelemetry's exporter serves what `LockMetrics` records, scraped over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import anyio.lowlevel
import httpx
import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from keyedlock_asgi import KeyedLock

SECRET = "user-4711-secret"


@pytest.fixture
def scrape_url() -> Iterator[tuple[str, MeterProvider]]:
    """The exporter on a registry of our own, served on a free loopback port."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader])
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics", provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        provider.shutdown()


def drive(lock: KeyedLock) -> None:
    """One request that waits, one turned away, all on one key."""

    async def main() -> None:
        inside, leave = anyio.Event(), anyio.Event()

        async def holder() -> None:
            async with lock.hold(SECRET):
                inside.set()
                await leave.wait()

        async def waiter() -> None:
            async with lock.hold(SECRET):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await inside.wait()
            tg.start_soon(waiter)
            while lock.waiting(SECRET) != 1:
                await anyio.lowlevel.checkpoint()
            with pytest.raises(Exception, match="held"):
                async with lock.hold(SECRET, timeout=0):
                    pass
            leave.set()

    anyio.run(main)


def test_a_real_scrape_has_the_histograms_and_counters(
    scrape_url: tuple[str, MeterProvider],
) -> None:
    url, provider = scrape_url
    drive(KeyedLock(meter_provider=provider, name="checkout"))
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200
    text = answer.text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    common = {
        "keyedlock_lock_name": "checkout",
        "keyedlock_backend": "memory",
        "keyedlock_mode": "exclusive",
    }

    def value(name: str, **labels: str) -> float:
        wanted = {**common, **labels}
        found = [
            v
            for (n, items), v in samples.items()
            if n == name and wanted.items() <= dict(items).items()
        ]
        assert found, f"no {name} series with {wanted} in:\n{text}"
        return sum(found)

    assert value("keyedlock_lock_requests_total", keyedlock_result="acquired") == 2
    assert value("keyedlock_lock_requests_total", keyedlock_result="busy") == 1
    assert value("keyedlock_lock_wait_duration_seconds_count", keyedlock_result="acquired") == 1
    assert (
        value("keyedlock_lock_wait_duration_seconds_bucket", keyedlock_result="acquired", le="+Inf")
        == 1
    )
    assert value("keyedlock_lock_hold_duration_seconds_count", keyedlock_release="normal") == 2
    assert value("keyedlock_lock_holders") == 0
    assert value("keyedlock_lock_waiting") == 0
    assert SECRET not in text
