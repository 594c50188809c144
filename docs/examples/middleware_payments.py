"""One charge per order at a time: the middleware on a Starlette app, keyed by path param."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, Rejection, keys

lock = KeyedLock(timeout=5.0, max_waiting=20)
charges: dict[int, int] = {}


async def pay(request: Request) -> JSONResponse:
    order_id = request.path_params["order_id"]
    held = request.scope["keyedlock"][-1]  # what the middleware holds for this request
    charges[order_id] = charges.get(order_id, 0) + 1
    return JSONResponse({"order": order_id, "charges": charges[order_id], "token": held.token})


def log_rejection(scope: dict[str, object], rejection: Rejection) -> None:
    print(f"rejected {scope['path']}: {rejection.reason} ({rejection.status})")


app = Starlette(
    routes=[Route("/orders/{order_id:int}/pay", pay, methods=["POST"])],
    middleware=[
        Middleware(
            KeyedLockMiddleware,
            lock=lock,
            key=keys.path_param("order_id"),  # read before routing, from the template below
            include=["/orders/{order_id:int}/pay"],
            methods=["POST"],
            server_timing=True,
            on_rejected=log_rejection,
        )
    ],
)
