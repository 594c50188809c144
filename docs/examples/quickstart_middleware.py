"""Quickstart: the middleware in ten lines (docs/index.md)."""

# --8<-- [start:imports]
import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

# --8<-- [end:imports]
entered: list[str] = []  # for the test: who was inside when
gate: anyio.Event | None = None


# --8<-- [start:middleware]
async def pay(request: Request) -> JSONResponse:
    user = request.headers["x-user-id"]
    entered.append(f"{user} in")
    if gate is not None and user == "alice":
        await gate.wait()  # the test holds alice's requests here
    entered.append(f"{user} out")
    return JSONResponse({"paid": request.path_params["order_id"]})


lock = KeyedLock(timeout=10, max_waiting=20)
app = Starlette(
    routes=[Route("/orders/{order_id:int}/pay", pay, methods=["POST"])],
    middleware=[Middleware(KeyedLockMiddleware, key=keys.header("X-User-Id"), lock=lock)],
)
# --8<-- [end:middleware]
