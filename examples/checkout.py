"""The double charge, and how KeyedLockMiddleware stops it.

A small shop: alice has a balance of 100 and an order costs 100. The checkout endpoint reads
the balance, waits for the payment provider, then debits: a read-await-write race. This script
serves the app in-process (no server, no setup) and fires 50 concurrent checkouts for alice,
first without the middleware, then with it, and prints what happened:

    python examples/checkout.py           # the demo; exits 1 if the protected run is wrong
    python examples/checkout.py --serve   # the protected app under uvicorn, to try with curl
    python examples/checkout.py --metrics wait.json   # also: record OpenTelemetry metrics of
        # protected runs at several concurrencies (needs opentelemetry-sdk), for docs/wait_chart.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

try:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("This demo needs the examples extra: pip install -e '.[examples]'")

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys

PRICE = 100
START_BALANCE = 100
CONCURRENT_CHECKOUTS = 50
PAYMENT_PROVIDER_SECONDS = 0.01


@dataclass
class Shop:
    """The shop's state: balances and orders (a database, in a real app)."""

    balances: dict[str, int] = field(default_factory=lambda: {"alice": START_BALANCE})
    orders: list[str] = field(default_factory=list)


def shop_app(shop: Shop) -> Starlette:
    """The unprotected app: correct for one request at a time, wrong for two at once."""

    async def checkout(request: Request) -> JSONResponse:
        user = request.headers["x-user-id"]
        if shop.balances.get(user, 0) < PRICE:
            return JSONResponse({"detail": "insufficient funds"}, status_code=402)
        await anyio.sleep(PAYMENT_PROVIDER_SECONDS)  # charge the card at the payment provider
        shop.balances[user] -= PRICE
        shop.orders.append(user)
        return JSONResponse({"order": len(shop.orders)}, status_code=201)

    async def balance(request: Request) -> JSONResponse:
        user = request.path_params["user"]
        return JSONResponse({"balance": shop.balances.get(user, 0)})

    return Starlette(
        routes=[
            Route("/checkout", checkout, methods=["POST"]),
            Route("/balance/{user}", balance),
        ]
    )


def protected_app(shop: Shop, lock: KeyedLock) -> ASGIApp:
    """The same app behind the middleware: one checkout per user at a time, in arrival order."""
    # --8<-- [start:protect]
    return KeyedLockMiddleware(
        shop_app(shop),
        key=keys.header("X-User-Id"),  # in production: the authenticated user id
        lock=lock,
        methods=["POST"],
        max_waiting=100,  # bound each user's queue
    )
    # --8<-- [end:protect]


class CountWaits:
    """Outermost ASGI wrapper: counts requests that arrive while the lock's key is held.

    With direct hand-off such a request queues; a request arriving to a free key does not.
    """

    def __init__(self, app: ASGIApp, lock: KeyedLock | None) -> None:
        self.app = app
        self.lock = lock
        self.waited = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.lock is not None and self.lock.stats().holders:
            self.waited += 1
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Outcome:
    label: str
    orders: int
    balance: int
    waited: int
    seconds: float
    statuses: dict[int, int]


async def run(
    protected: bool, checkouts: int = CONCURRENT_CHECKOUTS, meter_provider: Any = None
) -> Outcome:
    """Fire `checkouts` concurrent checkouts for alice at a fresh shop."""
    shop = Shop()
    lock = KeyedLock(name="checkout", meter_provider=meter_provider) if protected else None
    app = CountWaits(protected_app(shop, lock) if lock else shop_app(shop), lock)
    statuses: dict[int, int] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:

        async def checkout() -> None:
            response = await client.post("/checkout", headers={"X-User-Id": "alice"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(checkouts):
                tg.start_soon(checkout)
        seconds = time.perf_counter() - started
        final = (await client.get("/balance/alice")).json()["balance"]
    if lock is not None:
        assert lock.stats().active_keys == 0, "a key was left held"
    label = "with KeyedLockMiddleware" if protected else "without the middleware"
    return Outcome(label, len(shop.orders), final, app.waited, seconds, statuses)


def table(outcomes: list[Outcome]) -> str:
    rows = [f"{'':26}{'orders':>8}{'final balance':>15}{'waited':>8}{'time':>9}"]
    for o in outcomes:
        rows.append(f"{o.label:26}{o.orders:>8}{o.balance:>15}{o.waited:>8}{o.seconds:>8.2f}s")
    return "\n".join(rows)


def correct(outcome: Outcome) -> bool:
    """What the protected run must show: exactly one order, balance 0, nobody else charged."""
    return outcome.orders == 1 and outcome.balance == START_BALANCE - PRICE


async def main() -> int:
    print(
        f"{CONCURRENT_CHECKOUTS} concurrent checkouts for alice "
        f"(balance {START_BALANCE}, one order costs {PRICE})\n"
    )
    outcomes = [await run(protected=False), await run(protected=True)]
    print(table(outcomes))
    unprotected, protected = outcomes
    print()
    print(
        f"Without the middleware: {unprotected.orders} orders paid from one balance of "
        f"{START_BALANCE}; every request read it before any wrote it."
    )
    if not correct(protected):
        print("ERROR: the protected run should create one order and leave balance 0.")
        return 1
    print(
        "With it: one checkout at a time, 1 order, balance 0; "
        f"{protected.statuses.get(402, 0)} got 402 insufficient funds."
    )
    return 0


async def record_metrics(path: str, concurrencies: list[int]) -> int:
    """Protected runs at each concurrency, each with its own in-memory metric reader; writes
    `{"runs": [{"checkouts": n, "metrics": <the SDK's metrics JSON>}]}` to `path`."""
    from opentelemetry.sdk.metrics import MeterProvider  # only for --metrics
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    runs = []
    for checkouts in concurrencies:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        outcome = await run(protected=True, checkouts=checkouts, meter_provider=provider)
        if not correct(outcome):
            print(f"ERROR: the protected run with {checkouts} checkouts is wrong.")
            return 1
        data = reader.get_metrics_data()
        assert data is not None
        runs.append({"checkouts": checkouts, "metrics": json.loads(data.to_json())})
        provider.shutdown()
    await anyio.Path(path).write_text(json.dumps({"runs": runs}))
    print(f"metrics of {len(runs)} protected runs written to {path}")
    return 0


def serve(port: int) -> None:
    """Serve the protected app with uvicorn, for trying with curl."""
    import uvicorn

    print(
        f"Try:  for i in $(seq 5); do curl -s -X POST -H 'X-User-Id: alice' "
        f"http://127.0.0.1:{port}/checkout & done; wait\n"
        f"Then: curl http://127.0.0.1:{port}/balance/alice",
        flush=True,
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


app = protected_app(Shop(), KeyedLock())
"""The protected app with its own shop, for `uvicorn examples.checkout:app` and `--serve`."""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve the protected app")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics", metavar="OUT.json", help="record metrics to this file")
    parser.add_argument(
        "--concurrency",
        default="5,10,25,50",
        help="with --metrics: concurrent checkouts per run, comma-separated",
    )
    options = parser.parse_args()
    if options.serve:
        serve(options.port)
    elif options.metrics:
        levels = [int(level) for level in options.concurrency.split(",")]
        sys.exit(anyio.run(record_metrics, options.metrics, levels))
    else:
        sys.exit(anyio.run(main))
