"""Helpers for the middleware tests: a gated Starlette endpoint and a raw ASGI harness."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse


class Gated:
    """An endpoint that logs entry/exit and waits, while inside, until its gate is opened."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.inside: dict[str, anyio.Event] = {}
        self.gates: dict[str, anyio.Event] = {}
        self.calls = 0

    def gate(self, name: str) -> anyio.Event:
        return self.gates.setdefault(name, anyio.Event())

    def entered(self, name: str) -> anyio.Event:
        return self.inside.setdefault(name, anyio.Event())

    def names_in(self, kind: str) -> list[str]:
        return [name for event, name in self.log if event == kind]

    async def endpoint(self, request: Request) -> JSONResponse:
        name = request.query_params["n"]
        self.calls += 1
        body = await request.body()
        self.log.append(("in", name))
        self.entered(name).set()
        await self.gate(name).wait()
        self.log.append(("out", name))
        held = request.scope.get("keyedlock", [])
        return JSONResponse(
            {
                "name": name,
                "body": body.decode("latin-1"),
                "held": [
                    {"keys": list(h.keys), "waited": h.waited, "token": h.token} for h in held
                ],
            }
        )


def client(app: Any, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, **options), base_url="http://testserver"
    )


class RawRequest:
    """Drive an ASGI app directly: scripted `receive`, recorded `send`."""

    def __init__(self, headers: list[tuple[bytes, bytes]], path: str = "/") -> None:
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
        }
        self.incoming: list[dict[str, Any]] = []
        self.received = 0
        self.more = anyio.Event()
        self.disconnect = anyio.Event()
        self.sent: list[dict[str, Any]] = []
        self.done = anyio.Event()

    def push(self, message: dict[str, Any]) -> None:
        self.incoming.append(message)
        self.more.set()

    async def receive(self) -> dict[str, Any]:
        while self.received >= len(self.incoming):
            if self.disconnect.is_set():
                return {"type": "http.disconnect"}
            self.more = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def stop_on(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_on, self.more)
                tg.start_soon(stop_on, self.disconnect)
        message = self.incoming[self.received]
        self.received += 1
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        finally:
            self.done.set()
