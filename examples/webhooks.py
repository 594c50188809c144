"""Webhooks: process each delivery once, and answer every retry from the store.

Senders retry webhooks they think failed: while the first delivery is still being processed
(their timeout was shorter than our work), or later (our answer got lost). Keyed by the
`Webhook-Id` header, `IdempotencyMiddleware` runs the first delivery; a retry that arrives
during processing gets 409 at once (with `Retry-After`), and one that arrives afterwards gets
the stored response, byte for byte, with `Idempotent-Replayed: true`: the handler does not run
again. A delivery whose handler failed (a 5xx) is not stored, so the sender's retry runs it.
Different ids run in parallel.

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

from keyedlock_asgi import IdempotencyMiddleware, KeyedLock, keys
from keyedlock_asgi.stores import MemoryStore

Handler = Callable[[dict[str, Any]], Awaitable[None]]


async def fulfil(event: dict[str, Any]) -> None:
    await anyio.sleep(0.05)  # e.g. ship the order


def webhook_app(handle: Handler = fulfil) -> tuple[ASGIApp, list[dict[str, Any]]]:
    """The app and the list of events it handled (each handled once)."""
    handled: list[dict[str, Any]] = []

    async def receive_webhook(request: Request) -> JSONResponse:
        event = await request.json()
        await handle(event)
        handled.append(event)
        return JSONResponse({"status": "processed", "handled": len(handled)})

    app = Starlette(routes=[Route("/webhooks", receive_webhook, methods=["POST"])])
    # --8<-- [start:middleware]
    protected = IdempotencyMiddleware(
        app,
        key=keys.header("Webhook-Id"),  # one sender: its delivery id is the key
        store=MemoryStore(),  # RedisStore / PostgresStore with several workers
        lock=KeyedLock(key_prefix="webhook:"),  # and a lock on the same engine
        methods=["POST"],
        ttl=3 * 24 * 3600,  # longer than the sender retries
        on_missing_key="reject",  # a delivery without an id: 400
    )
    # --8<-- [end:middleware]
    return protected, handled


async def main() -> None:
    started, finish = anyio.Event(), anyio.Event()

    async def slow_fulfil(event: dict[str, Any]) -> None:
        started.set()
        await finish.wait()

    app, handled = webhook_app(slow_fulfil)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:

        async def deliver(label: str) -> None:
            response = await client.post(
                "/webhooks", headers={"Webhook-Id": "evt_1"}, json={"type": "order.paid"}
            )
            retry = response.headers.get("retry-after")
            replayed = response.headers.get("idempotent-replayed")
            print(
                f"{label:28} {response.status_code} {response.json()}  "
                f"retry-after={retry} replayed={replayed}"
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver, "first delivery")
            await started.wait()
            await deliver("retry while processing")
            finish.set()
        await deliver("retry after processing")
    print(f"handled {len(handled)} time(s)")


if __name__ == "__main__":
    anyio.run(main)
