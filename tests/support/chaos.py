"""Drive the chaos tests' holder processes (`tests/support/chaos_worker.py`) from a test.

Each worker speaks JSON lines on stdout and takes commands on stdin; a test waits for a named
event with a bound (it fails loudly, never by a clock comparison), and pauses, resumes or
kills the process in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.support.server import REPO_ROOT

__all__ = ["Worker"]


class Worker:
    """One holder process; `seen` keeps every event it reported, in order."""

    def __init__(self, process: Process, who: str) -> None:
        self.process = process
        self.who = who
        assert process.stdout is not None
        self._lines = BufferedByteReceiveStream(process.stdout)
        self.seen: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, **config: Any) -> Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        process = await anyio.open_process(
            [sys.executable, "-m", "tests.support.chaos_worker", json.dumps(config)],
            cwd=REPO_ROOT,
            env=env,
            stderr=None,
            start_new_session=True,
        )
        return cls(process, config["who"])

    @property
    def pid(self) -> int:
        return self.process.pid

    async def expect(self, event: str, within: float = 60.0) -> dict[str, Any]:
        """The next `event` this worker reports (earlier events are kept in `seen`)."""
        with anyio.fail_after(within):
            while True:
                line = await self._lines.receive_until(b"\n", 1 << 16)
                found: dict[str, Any] = json.loads(line)
                self.seen.append(found)
                if found["event"] == event:
                    return found

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(command.encode() + b"\n")

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def finish(self, within: float = 30.0) -> None:
        """Wait for the process to end; kill it (and fail) if it does not."""
        try:
            with anyio.fail_after(within):
                code = await self.process.wait()
        except TimeoutError:
            self.kill()
            raise
        assert code == 0, f"worker {self.who} exited with {code}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGCONT)
            os.killpg(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Kill the process and reap it on this event loop, so that no transport of it is
        left for the garbage collector to close once the loop has ended."""
        self.kill()
        with anyio.CancelScope(shield=True):
            await self.process.aclose()
