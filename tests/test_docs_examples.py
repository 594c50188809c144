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
    pytest.importorskip("trio")
    assert semantics.two_loops() == [True, True]
    assert semantics.shared.stats().active_keys == 0
