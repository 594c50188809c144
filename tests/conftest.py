"""Shared fixtures: every async test runs on asyncio and trio; services skip or fail clearly."""

from __future__ import annotations

import os

import pytest

REQUIRE_SERVICES = os.environ.get("KEYEDLOCK_REQUIRE_SERVICES") == "1"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each `@pytest.mark.anyio` test once per anyio backend."""
    return str(request.param)


def service_missing(name: str, reason: str) -> None:
    """A test needs a service that does not answer: fail in CI, skip elsewhere."""
    message = f"{name} is not reachable ({reason})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; KEYEDLOCK_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(f"{message}; start it to run these tests")
