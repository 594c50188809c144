"""Per-route locking in FastAPI (docs/per-route.md): decorator and dependency."""

from __future__ import annotations

# --8<-- [start:decorator]
from fastapi import FastAPI
from pydantic import BaseModel

from keyedlock_asgi import KeyedLock, keys

lock = KeyedLock(timeout=10, max_waiting=20)
app = FastAPI()


class StockIn(BaseModel):
    quantity: int


@app.put("/products/{product_id}/stock")  # the FastAPI decorator goes above
@lock.serialize(keys.path_param("product_id"))
async def put_stock(product_id: int, body: StockIn) -> dict[str, int]:
    return {"product_id": product_id, "quantity": body.quantity}  # no Request parameter needed


# --8<-- [end:decorator]

# --8<-- [start:dependency]
from typing import Annotated  # noqa: E402

from fastapi import APIRouter, Depends, Header, HTTPException  # noqa: E402

from keyedlock_asgi import Held  # noqa: E402


@app.post("/checkout", dependencies=[lock.depends(keys.header("X-Cart-Id"))])
async def checkout() -> dict[str, str]:
    return {"status": "paid"}


def order_key(order_id: int) -> str:  # a dependency: FastAPI validates `order_id` first
    return f"order:{order_id}"


@app.post("/orders/{order_id}/pay", dependencies=[lock.depends(order_key)])
async def pay(order_id: int) -> dict[str, int]:
    return {"paid": order_id}  # /orders/abc/pay answers 422 and takes no lock


def current_user(authorization: Annotated[str, Header()]) -> str:
    if not authorization.startswith("Bearer "):
        raise HTTPException(401, "not signed in")
    return authorization.removeprefix("Bearer ")


def user_key(user: Annotated[str, Depends(current_user)]) -> str:
    return f"user:{user}"


wallet = APIRouter(prefix="/wallet", dependencies=[lock.depends(user_key, timeout=0)])


@wallet.post("/withdraw")
async def withdraw(user: Annotated[str, Depends(current_user)]) -> dict[str, str]:
    return {"user": user}


@app.post("/jobs/{job_id}/run")
async def run_job(
    job_id: str,
    held: Held | None = lock.depends(keys.path_param("job_id")),  # noqa: B008
) -> dict[str, int]:
    assert held is not None
    return {"fencing_token": held.token}  # hand it to storage that refuses stale writers


app.include_router(wallet)
# --8<-- [end:dependency]
