"""Runs every file of docs/examples/ written for the docs' own pages and checks what it claims."""

from __future__ import annotations

import pytest

from docs.examples import quickstart_lock, semantics

pytestmark = pytest.mark.anyio


async def test_quickstart_lock_serializes_one_users_payments() -> None:
    quickstart_lock.balances["alice"] = 100
    assert await quickstart_lock.main() == 0  # ten read-await-write payments of 10: no lost update
    assert quickstart_lock.lock.stats().active_keys == 0


async def test_fifo_serves_in_arrival_order() -> None:
    assert await semantics.fifo() == [0, 1, 2, 3, 4]


async def test_limits_busy_timeout_queue_full() -> None:
    assert await semantics.limits() == {
        "fail fast": "LockBusy",
        "bounded wait": "LockTimeout",
        "left behind by the timeout": 0,
        "queue full": "QueueFull",
        "first in line": "granted",
    }


async def test_max_concurrency_two_holders_per_key() -> None:
    assert await semantics.at_most_two() == (2, 0)


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    assert await semantics.cancelled_waiter() == (0, False)


async def test_opposite_transfers_do_not_deadlock_and_keep_the_total() -> None:
    balances, keys = await semantics.transfers()
    assert balances == {"A": 100, "B": 100}  # ten each way
    assert keys == {("account:A", "account:B")}


async def test_reentry_raises() -> None:
    assert await semantics.reentry() == "LockReentryError"


async def test_the_uncontended_path_does_not_yield() -> None:
    assert await semantics.uncontended_does_not_yield() == 0


async def test_the_ledger_refuses_a_stale_fencing_token() -> None:
    assert await semantics.late_writer() == (True, False, ["refund"])


def test_one_lock_serves_successive_event_loops() -> None:
    assert semantics.two_loops() == [True, True]
    assert semantics.shared.stats().active_keys == 0


async def test_quickstart_middleware_one_request_per_user_at_a_time() -> None:
    import anyio
    import httpx

    from docs.examples import quickstart_middleware as quick

    quick.entered.clear()
    quick.gate = anyio.Event()
    transport = httpx.ASGITransport(app=quick.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def pay(user: str, order: int) -> int:
            response = await client.post(f"/orders/{order}/pay", headers={"X-User-Id": user})
            return response.status_code

        async with anyio.create_task_group() as tg:
            tg.start_soon(pay, "alice", 1)
            while quick.entered != ["alice in"]:
                await anyio.lowlevel.checkpoint()
            tg.start_soon(pay, "alice", 2)
            while quick.lock.waiting("alice") != 1:  # alice's second request queues
                await anyio.lowlevel.checkpoint()
            bob = await client.post("/orders/3/pay", headers={"X-User-Id": "bob"}, timeout=5)
            assert bob.status_code == 200  # bob is not blocked: his request went in and out
            assert quick.entered == ["alice in", "bob in", "bob out"]
            quick.gate.set()
    assert quick.entered == ["alice in", "bob in", "bob out", "alice out", "alice in", "alice out"]
    assert quick.lock.stats().active_keys == 0


async def test_security_keys_by_authenticated_user_with_a_bounded_queue() -> None:
    import anyio
    import httpx

    from docs.examples import security_keys as sec

    sec.gate = anyio.Event()
    statuses: list[int] = []
    transport = httpx.ASGITransport(app=sec.app)
    alice = {"Authorization": "Bearer token-alice"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        anonymous = await client.post("/withdraw")
        assert anonymous.status_code == 400  # no authenticated user, no key: refused

        async def withdraw() -> None:
            statuses.append((await client.post("/withdraw", headers=alice)).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(withdraw)  # holds "withdraw:alice" until the gate opens
            for queued in range(1, 6):
                tg.start_soon(withdraw)
                while sec.lock.waiting("alice") != queued:
                    await anyio.lowlevel.checkpoint()
            sixth_waiter = await client.post("/withdraw", headers=alice)
            assert sixth_waiter.status_code == 429
            assert int(sixth_waiter.headers["retry-after"]) >= 1
            bob = await client.post("/withdraw", headers={"Authorization": "Bearer token-bob"})
            assert bob.status_code == 200  # bob has his own key: served while alice's queue waits
            sec.gate.set()
    assert statuses == [200] * 6
    assert sec.lock.stats().active_keys == 0


async def test_readers_share_and_the_writer_comes_after() -> None:
    log = await semantics.readers_and_writers()
    assert sorted(log[:2]) == ["reader 1 in", "reader 2 in"]
    assert sorted(log[2:4]) == ["reader 1 out", "reader 2 out"]
    assert log[4:] == ["writer in"]


async def test_introspection_keys_stats_and_name() -> None:
    seen = await semantics.introspection()
    assert seen["keys"] == ["order:7", "user:1"]
    assert (seen["stats"].active_keys, seen["stats"].holders) == (2, 2)
    assert seen["idle"] == []
    assert seen["repr starts"] == "'checkout'"


async def test_the_observer_example_counts_outcomes() -> None:
    from docs.examples import observability_events

    observability_events.outcomes.counts.clear()  # the module's lock serves both event loops
    counts = await observability_events.main()
    assert counts == {
        ("acquired", "exclusive"): 1,
        ("busy", "exclusive"): 1,
        ("acquired", "shared"): 1,
    }


async def test_max_hold_revokes_a_stuck_holder() -> None:
    assert await semantics.bounded_hold() == ["stuck in", "stuck revoked", "next in"]


def test_the_shutdown_example_drains_on_lifespan_exit() -> None:
    import importlib

    from starlette.testclient import TestClient

    example = importlib.import_module("docs.examples.shutdown")
    with TestClient(example.app) as client:
        answer = client.post("/checkout", headers={"X-User-Id": "u1"})
        assert answer.json() == {"charged": "u1"}
    assert example.lock.closed  # the lifespan shutdown drained it
    with TestClient(example.app) as client:
        late = client.post("/checkout", headers={"X-User-Id": "u1"})
    assert late.status_code == 503
    assert late.headers["retry-after"] == "1"
