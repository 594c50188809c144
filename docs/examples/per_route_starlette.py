"""Per-route locking in Starlette (docs/per-route.md): the decorator and route middleware."""

from __future__ import annotations

import anyio

entered: list[str] = []  # for the test: who was inside when
gate: anyio.Event | None = None


# --8<-- [start:starlette]
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys  # noqa: E402

lock = KeyedLock(timeout=10, max_waiting=20)


@lock.serialize(keys.path_param("order_id"))  # one payment per order at a time
async def pay(request: Request) -> JSONResponse:
    order_id = request.path_params["order_id"]
    entered.append(f"{order_id} in")
    if gate is not None:
        await gate.wait()  # the test holds the first payment here
    entered.append(f"{order_id} out")
    return JSONResponse({"paid": order_id})


@lock.serialize(keys.path_param("export_id"), timeout=0)  # busy? answer 409 at once
async def export(request: Request) -> StreamingResponse:
    async def rows():  # the key is held until the last row has been sent
        for n in range(3):
            yield f"row {n}\n"

    return StreamingResponse(rows(), media_type="text/plain")


async def refund(request: Request) -> JSONResponse:
    return JSONResponse({"refunded": request.path_params["order_id"]})


app = Starlette(
    routes=[
        Route("/orders/{order_id:int}/pay", pay, methods=["POST"]),
        Route("/exports/{export_id}", export),
        Route(  # route middleware runs after routing, so it sees the path parameters
            "/orders/{order_id:int}/refund",
            refund,
            methods=["POST"],
            middleware=[
                Middleware(KeyedLockMiddleware, lock=lock, key=keys.path_param("order_id"))
            ],
        ),
    ]
)
# --8<-- [end:starlette]
