"""Shared fixtures: every async test runs on asyncio and trio; services skip or fail clearly."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from keyedlock_asgi import KeyedLock
from tests.support.engines import ASYNCIO_ONLY, ENGINES, NO_SLOTS

REQUIRE_SERVICES = os.environ.get("KEYEDLOCK_REQUIRE_SERVICES") == "1"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each `@pytest.mark.anyio` test once per anyio backend."""
    return str(request.param)


class ServiceMissing(Exception):
    """A service the tests need did not answer, and KEYEDLOCK_REQUIRE_SERVICES=1 (CI) requires
    every one. An ordinary exception, not `pytest.fail`: raised inside a task group it fails
    the test like any error, where pytest's own outcome exception ends the whole run in an
    internal error."""


def service_missing(name: str, reason: str) -> None:
    """A test needs a service that does not answer: fail in CI, skip elsewhere."""
    message = f"{name} is not reachable ({reason})"
    if REQUIRE_SERVICES:
        raise ServiceMissing(f"{message}; KEYEDLOCK_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(f"{message}; start it to run these tests")


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    """The lock engine under test: "memory" (in-process) or a distributed backend."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the trio runs of asyncio-only engines: those combinations cannot exist."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        impossible = params.get("anyio_backend") == "trio" and params.get("engine") in ASYNCIO_ONLY
        (drop if impossible else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
async def make_lock(engine: str) -> AsyncIterator[Callable[..., KeyedLock]]:
    """Build `KeyedLock(**options)` on the engine under test; close every one afterwards."""
    made: list[KeyedLock] = []

    def factory(**options: Any) -> KeyedLock:
        if engine in NO_SLOTS and options.get("max_concurrency", 1) > 1:
            pytest.skip(NO_SLOTS[engine])
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        lock = KeyedLock(backend=ENGINES[engine](namespace), **options)
        made.append(lock)
        return lock

    yield factory
    for lock in made:
        await lock.aclose()
