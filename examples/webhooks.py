"""Webhooks: process each delivery once, even when the sender retries while we still work.

Senders retry webhooks they think failed, sometimes while the first delivery is still being
processed. Keyed by the `Webhook-Id` header with `timeout=0`, a duplicate that arrives during
processing is answered 409 at once (with `Retry-After`); one that arrives afterwards finds the
id in the processed set and gets 200 without doing the work again. Different ids run in parallel.

    python examples/webhooks.py
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

Handler = Callable[[dict[str, Any]], Awaitable[None]]


async def fulfil(event: dict[str, Any]) -> None:
    await anyio.sleep(0.05)  # e.g. ship the order


def webhook_app(handle: Handler = fulfil) -> tuple[ASGIApp, set[str]]:
    processed: set[str] = set()  # a table with a unique key, in a real app

    async def receive_webhook(request: Request) -> JSONResponse:
        webhook_id = request.headers["webhook-id"]
        if webhook_id in processed:
            return JSONResponse({"status": "already processed"})
        await handle(await request.json())
        processed.add(webhook_id)
        return JSONResponse({"status": "processed"})

    app = Starlette(routes=[Route("/webhooks", receive_webhook, methods=["POST"])])
    # --8<-- [start:middleware]
    protected = KeyedLockMiddleware(
        app,
        key=keys.header("Webhook-Id"),
        lock=KeyedLock(key_prefix="webhook:"),
        include=["/webhooks"],
        timeout=0,  # a duplicate in flight: 409 + Retry-After at once, never a second run
        on_missing_key="reject",  # a delivery without an id: 400
    )
    # --8<-- [end:middleware]
    return protected, processed


async def main() -> None:
    started, finish = anyio.Event(), anyio.Event()

    async def slow_fulfil(event: dict[str, Any]) -> None:
        started.set()
        await finish.wait()

    app, _ = webhook_app(slow_fulfil)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:

        async def deliver(label: str) -> None:
            response = await client.post(
                "/webhooks", headers={"Webhook-Id": "evt_1"}, json={"type": "order.paid"}
            )
            retry = response.headers.get("retry-after")
            print(f"{label:28} {response.status_code} {response.json()}  retry-after={retry}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver, "first delivery")
            await started.wait()
            await deliver("retry while processing")
            finish.set()
        await deliver("retry after processing")


if __name__ == "__main__":
    anyio.run(main)
