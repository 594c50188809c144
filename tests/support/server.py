"""Run a real uvicorn server on 127.0.0.1 in a subprocess, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, proc: subprocess.Popen[bytes], limit: float = 30.0) -> None:
    """Block until the server accepts connections (a readiness probe, not a test assertion)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        try:  # pause briefly, and notice at once if the server died
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"server exited early with code {proc.returncode}")
    raise RuntimeError(f"server on port {port} did not start within {limit} s")


@contextlib.contextmanager
def uvicorn_server(
    app: str,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Serve `module:attr` with uvicorn; yield its base URL; stop it (and its workers) after.

    The repository root is on PYTHONPATH, so `app` may live under `tests/` or `examples/`.
    """
    port = free_port()
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [environ.get("PYTHONPATH")])]
    )
    environ.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
        *extra_args,
    ]
    proc = subprocess.Popen(cmd, env=environ, cwd=REPO_ROOT, start_new_session=True)
    try:
        wait_until_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def uvicorn_servers(
    app: str, count: int, *, env: Mapping[str, str] | None = None
) -> Iterator[list[str]]:
    """`count` one-process uvicorn servers of the same app, each on its own port: the client
    picks the process for every request (round robin). Under `--workers N` the kernel and the
    servers' accept loops pick, and one process often takes every connection of a burst."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(uvicorn_server(app, env=env)) for _ in range(count)]
