"""Inventory: reservations of one product run one at a time; other products run in parallel.

The key is the `product_id` path parameter. The middleware runs before routing, so it reads the
parameter from its own route template (`include`); with the `int` converter, `/products/007`
and `/products/7` are the same product and share the key "7".

    python examples/inventory.py
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys


async def check_warehouse(product_id: int) -> None:
    await anyio.sleep(0.01)  # ask the warehouse system


class Inventory:
    """Stock per product, and for the demo: how many reservations were inside at once."""

    def __init__(self, stock: dict[int, int]) -> None:
        self.stock = stock
        self.inside: dict[int, int] = {}
        self.peak: dict[int, int] = {}


def inventory_app(
    inventory: Inventory, warehouse: Callable[[int], Awaitable[None]] = check_warehouse
) -> ASGIApp:
    async def reserve(request: Request) -> JSONResponse:
        product_id: int = request.path_params["product_id"]
        inventory.inside[product_id] = inventory.inside.get(product_id, 0) + 1
        inventory.peak[product_id] = max(
            inventory.peak.get(product_id, 0), inventory.inside[product_id]
        )
        try:
            left = inventory.stock.get(product_id, 0)
            if left == 0:
                return JSONResponse({"detail": "out of stock"}, status_code=409)
            await warehouse(product_id)
            inventory.stock[product_id] = left - 1
            return JSONResponse({"left": left - 1}, status_code=201)
        finally:
            inventory.inside[product_id] -= 1

    app = Starlette(routes=[Route("/products/{product_id:int}/reserve", reserve, methods=["POST"])])
    # --8<-- [start:middleware]
    return KeyedLockMiddleware(
        app,
        key=keys.path_param("product_id"),
        include=["/products/{product_id:int}/reserve"],
        lock=KeyedLock(key_prefix="product:", timeout=5.0, max_waiting=200),
    )
    # --8<-- [end:middleware]


async def main() -> Inventory:
    inventory = Inventory({1: 5, 2: 5})
    transport = httpx.ASGITransport(app=inventory_app(inventory))
    statuses: dict[int, list[int]] = {1: [], 2: []}
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:

        async def reserve(product_id: int, path: str) -> None:
            response = await client.post(path)
            statuses[product_id].append(response.status_code)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                path = "/products/1/reserve" if n % 2 else "/products/001/reserve"
                tg.start_soon(reserve, 1, path)
                tg.start_soon(reserve, 2, "/products/2/reserve")
    for product_id, codes in statuses.items():
        print(
            f"product {product_id}: {codes.count(201)} reserved, {codes.count(409)} out of stock, "
            f"stock left {inventory.stock[product_id]}, "
            f"at most {inventory.peak[product_id]} reservation inside at once"
        )
    return inventory


if __name__ == "__main__":
    anyio.run(main)
