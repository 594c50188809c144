"""FastAPI: lock per user with a dependency, per order with the decorator.

- `lock.depends(current_user)`: the key is itself a FastAPI dependency (here a header standing
  in for your auth), so it is validated and documented like any other parameter.
- `@lock.serialize(keys.path_param("order_id"))`: no `Request` parameter needed.

    python examples/fastapi_app.py            # a short in-process run
    uvicorn examples.fastapi_app:app          # serve it
"""

# --8<-- [start:readme]
from typing import Annotated

from fastapi import Depends, FastAPI, Header

from keyedlock_asgi import KeyedLock

app = FastAPI()
lock = KeyedLock(timeout=10, max_waiting=20)  # wait at most 10 s; at most 20 queued per key


async def current_user(x_user_id: Annotated[str, Header()]) -> str:
    return x_user_id  # stands in for your authentication dependency


@app.post("/checkout", dependencies=[lock.depends(current_user)])
async def checkout(user: Annotated[str, Depends(current_user)]) -> dict[str, str]:
    return await charge(user)  # one checkout per user at a time, in arrival order


# --8<-- [end:readme]


import anyio  # noqa: E402 - below the README section on purpose

from keyedlock_asgi import keys  # noqa: E402


@app.post("/orders/{order_id}/refund")
@lock.serialize(keys.path_param("order_id"))  # the decorator: no Request parameter needed
async def refund(order_id: int) -> dict[str, str]:
    return await refund_order(order_id)  # one refund per order at a time


balances: dict[str, int] = {"alice": 100, "bob": 100}
orders: list[str] = []
refunds: dict[int, int] = {}


async def charge(user: str) -> dict[str, str]:
    balance = balances[user]
    if balance < 100:
        return {"status": "insufficient funds"}
    await anyio.sleep(0.01)  # the payment provider
    balances[user] = balance - 100
    orders.append(user)
    return {"status": "paid"}


async def refund_order(order_id: int) -> dict[str, str]:
    done = refunds.get(order_id, 0)
    if done:
        return {"status": "already refunded"}
    await anyio.sleep(0.01)  # the payment provider
    refunds[order_id] = done + 1
    return {"status": "refunded"}


async def main() -> dict[str, object]:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:

        async def checkout_as(user: str) -> None:
            await client.post("/checkout", headers={"X-User-Id": user})

        async with anyio.create_task_group() as tg:
            for user in ("alice", "bob") * 10:
                tg.start_soon(checkout_as, user)
            for _ in range(10):
                tg.start_soon(client.post, "/orders/7/refund")
    result: dict[str, object] = {"orders": sorted(orders), "balances": balances, "refunds": refunds}
    print(result)
    return result


if __name__ == "__main__":
    anyio.run(main)
