"""The OpenTelemetry examples of docs/observability.md, and the wait chart, run for real."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.otel import Telemetry

ROOT = Path(__file__).resolve().parents[1]


async def use(lock: object) -> None:
    async with lock.hold("user:1"):  # type: ignore[attr-defined]
        pass


def test_the_prometheus_example_serves_the_series() -> None:
    from docs.examples import observability_prometheus as example

    provider, server = example.serve_metrics(port=0)  # a free loopback port
    try:
        anyio.run(use, example.checkout_lock(provider))
        text = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
        provider.shutdown()
    assert "keyedlock_lock_requests_total{" in text
    assert "keyedlock_lock_hold_duration_seconds_bucket{" in text
    assert 'keyedlock_lock_name="checkout"' in text


def test_the_otlp_example_builds_its_providers() -> None:
    """In a subprocess: it sets the global providers, which a process can set only once."""
    code = (
        "from docs.examples.observability_otlp import setup_otlp, lock_for\n"
        "from opentelemetry import metrics\n"
        "provider = setup_otlp('http://127.0.0.1:9')\n"  # nothing listens: export fails, logged
        "assert metrics.get_meter_provider() is provider\n"
        "from keyedlock_asgi import KeyedLock\n"
        "from keyedlock_asgi.otel import LockMetrics\n"
        "lock = KeyedLock(name='checkout')\n"
        "assert any(isinstance(o, LockMetrics) for o in lock._observers)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_the_otlp_example_lock_records() -> None:
    from docs.examples import observability_otlp as example

    telemetry = Telemetry()
    anyio.run(use, example.lock_for(telemetry.meter_provider))
    assert telemetry.total("keyedlock.lock.requests", keyedlock_lock_name="checkout") == 1


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is in the docs extra"
)
def test_the_wait_chart_is_drawn_from_a_real_checkout_run(tmp_path: Path) -> None:
    recorded = tmp_path / "wait.json"
    chart = tmp_path / "wait-times.png"
    run = [sys.executable, str(ROOT / "examples" / "checkout.py"), "--metrics", str(recorded)]
    done = subprocess.run(
        [*run, "--concurrency", "3,6"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    draw = [sys.executable, str(ROOT / "docs" / "wait_chart.py"), str(recorded), str(chart)]
    done = subprocess.run(draw, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
