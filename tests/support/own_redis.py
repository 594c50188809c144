"""A private redis-server on a free loopback port that a test may kill and restart.

The shared Redis on 6379 is never stopped or reconfigured by tests; restart and kill tests
use one of these instead (no persistence: a restart forgets every key).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import anyio
import pytest

from tests.support.engine_redis import ping
from tests.support.server import free_port

__all__ = ["OwnRedis", "own_redis"]


class OwnRedis:
    """A private redis-server on a free port that a test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        with anyio.fail_after(15):
            while ping("127.0.0.1", self.port, 0.2) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    try:
        server = OwnRedis()
        server.start()
    except FileNotFoundError:
        from tests.conftest import service_missing

        service_missing("redis-server", "the executable is not on PATH")
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()
