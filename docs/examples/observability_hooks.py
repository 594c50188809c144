"""Wiring the hooks to counters and a log: one line each."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyedlock_asgi import Held, KeyedLock, KeyedLockMiddleware, Rejection, keys

log = logging.getLogger("shop.locks")
metrics: Counter[str] = Counter()


def acquired(scope: Any, held: Held) -> None:
    metrics["acquired"] += 1
    if held.waited > 1.0:
        log.warning("waited %.1f s for a lock on %s", held.waited, scope["path"])


def released(scope: Any, held: Held, held_for: float) -> None:
    metrics["released"] += 1


def rejected(scope: Any, rejection: Rejection) -> None:
    metrics[f"rejected.{rejection.reason}"] += 1


async def endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/", endpoint, methods=["POST"])],
    middleware=[
        Middleware(
            KeyedLockMiddleware,
            lock=KeyedLock(timeout=0),
            key=keys.header("X-User-Id"),
            on_missing_key="reject",
            on_acquired=acquired,
            on_released=released,
            on_rejected=rejected,
        )
    ],
)
