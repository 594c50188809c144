"""PostgresBackend against a real PostgreSQL: exclusion across pools, the engine left clean after
every way a wait can end, the server-side lease, faults, transaction mode, slots, bad input.

Two `PostgresBackend` instances stand for two processes: each has its own pool and sessions, so
the server is what keeps them apart. asyncpg is asyncio-only, hence no trio run here.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator
from time import monotonic
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import BackendUnavailable, KeyedLock, LockBusy, LockTimeout
from keyedlock_asgi.backends import _pg_wire
from keyedlock_asgi.backends.postgres import LeaseLost, PostgresBackend, PostgresLease, key_id
from tests.support.engine_pgbouncer import ROUTES, routed_backend
from tests.support.engine_postgres import (
    PG_DSN,
    postgres_backend,
    postgres_backend_via,
    postgres_server_port,
    require_postgres,
)
from tests.support.loop_thread import LoopThread
from tests.support.server import free_port
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    """A plain connection that watches `pg_locks` from outside the backend."""
    require_postgres()
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    yield conn
    await conn.close()


def new_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def advisory_locks(pg: Any, namespace: str) -> list[tuple[int, int, bool]]:
    """(pid, lock id, granted) of every advisory lock held or awaited by the namespace's pools."""
    rows = await pg.fetch(
        "SELECT l.pid, (l.classid::bigint << 32) | l.objid::bigint AS id, l.granted "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND a.application_name = $1",
        f"keyedlock:{namespace}",
    )
    return [(r["pid"], r["id"], r["granted"]) for r in rows]


def pair(namespace: str, mode: str = "session", **options: Any) -> tuple[KeyedLock, KeyedLock]:
    """Two locks on separate pools, as two processes would have (`mode`: one of ROUTES)."""
    return (
        KeyedLock(backend=routed_backend(mode, namespace, **options)),
        KeyedLock(backend=routed_backend(mode, namespace, **options)),
    )


async def close(*locks: KeyedLock) -> None:
    for lock in locks:
        assert lock.stats().active_keys == 0
        await lock.aclose()


# -- keys ---------------------------------------------------------------------------------


def test_key_id_is_a_signed_64_bit_hash_of_namespace_and_key() -> None:
    ids = {key_id("app", f"user:{i}") for i in range(10_000)}
    assert len(ids) == 10_000
    assert all(-(2**63) <= i < 2**63 for i in ids)
    assert any(i < 0 for i in ids)
    assert key_id("app", "k") == key_id("app", "k")
    assert key_id("app", "k") != key_id("other", "k")
    assert key_id("a", "bc") != key_id("ab", "c")


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="mode"):
        PostgresBackend(mode="xact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat"):
        PostgresBackend(lease=1.0, heartbeat=2.0)
    with pytest.raises(ValueError, match="pool_size"):
        PostgresBackend(pool_size=0)
    with pytest.raises(ValueError, match="identifier"):
        PostgresBackend(fence_sequence="x; DROP TABLE y")


# -- exclusion and order ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ROUTES)
async def test_two_pools_never_overlap_and_tokens_increase(pg: Any, mode: str) -> None:
    namespace = new_namespace()
    locks = pair(namespace, mode=mode)
    inside: list[int] = []
    log: list[tuple[str, int, int]] = []

    async def worker(i: int) -> None:
        async with locks[i % 2].hold("hot") as held:
            inside.append(i)
            log.append(("enter", i, held.token))
            assert len(inside) == 1, inside
            await anyio.lowlevel.checkpoint()
            inside.remove(i)
            log.append(("exit", i, held.token))

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(worker, i)

    assert len(log) == 80
    for n in range(0, 80, 2):  # strictly enter/exit pairs of the same task: no overlap
        assert (log[n][0], log[n + 1][0]) == ("enter", "exit")
        assert log[n][1] == log[n + 1][1]
    tokens = [token for event, _, token in log if event == "enter"]
    assert tokens == sorted(set(tokens))
    assert len(tokens) == 40
    assert tokens[0] > 0
    assert await advisory_locks(pg, namespace) == []
    await close(*locks)


@pytest.mark.parametrize("mode", ROUTES)
async def test_busy_and_timeout_leave_nothing_queued(pg: Any, mode: str) -> None:
    namespace = new_namespace()
    a, b = pair(namespace, mode=mode)
    lock_id = key_id(namespace, "k")
    async with a.hold("k") as held:
        assert held.token > 0
        with pytest.raises(LockBusy):
            async with b.hold("k", timeout=0):
                pass
        with pytest.raises(LockTimeout):
            async with b.hold("k", timeout=0.2):
                pass
        rows = await advisory_locks(pg, namespace)
        assert [(i, granted) for _, i, granted in rows] == [(lock_id, True)]
    assert await advisory_locks(pg, namespace) == []
    async with b.hold("k", timeout=0) as later:
        assert later.token > held.token
    await close(a, b)


async def test_cancelled_waiter_leaves_the_queue(pg: Any) -> None:
    namespace = new_namespace()
    a, b = pair(namespace)

    async def wait_for_key() -> None:
        async with b.hold("k"):
            raise AssertionError("the cancelled waiter must never get the key")

    async with a.hold("k"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_key)

            async def queued() -> bool:
                return any(not granted for *_, granted in await advisory_locks(pg, namespace))

            await wait_until(queued, "b waits in the server")
            tg.cancel_scope.cancel()
        rows = await advisory_locks(pg, namespace)
        assert [granted for *_, granted in rows] == [True]
    await close(a, b)


@pytest.mark.parametrize("mode", ROUTES)
async def test_cancel_racing_the_grant_never_strands_the_key(pg: Any, mode: str) -> None:
    """The server grants b's wait, and b is cancelled before it reads the grant: the pool's
    reset (session mode) or rollback (transaction mode) must still give the key back.

    b runs on an event loop of its own, frozen while a releases, so the grant is certain to be
    made in the server (seen in `pg_locks`) and still unread when the cancellation lands.
    """
    namespace = new_namespace()
    a = KeyedLock(backend=routed_backend(mode, namespace))
    b = KeyedLock(backend=routed_backend(mode, namespace))  # used on b's loop only
    entered: list[str] = []
    other = LoopThread()

    async def waiter() -> None:
        async with b.hold("k"):
            entered.append("b")

    try:
        held = a.hold("k")
        await held.__aenter__()
        task = other.submit(waiter())

        async def b_waits() -> bool:
            return any(not granted for *_, granted in await advisory_locks(pg, namespace))

        await wait_until(b_waits, "b waits in the server")
        [b_pid] = [pid for pid, _, granted in await advisory_locks(pg, namespace) if not granted]
        with other.freeze():
            await held.__aexit__(None, None, None)

            async def granted_to_b() -> bool:
                return await advisory_locks(pg, namespace) == [
                    (b_pid, key_id(namespace, "k"), True)
                ]

            await wait_until(granted_to_b, "the server grants b")
            task.cancel()  # runs on b's loop before it reads the grant
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wrap_future(task)

        async def nothing_held() -> bool:
            return await advisory_locks(pg, namespace) == []

        await wait_until(nothing_held, "b's cleanup gives the key back")  # fails if stranded
        assert entered == []  # b never ran: it was cancelled with the grant unread
        async with a.hold("k", timeout=0):
            pass
        await other.run(b.aclose())
    finally:
        other.close()
    await close(a)


# -- failure policy -----------------------------------------------------------------------


async def test_unreachable_server_fails_closed_with_retry_after() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    lock = KeyedLock(backend=PostgresBackend.from_dsn(dsn, connect_timeout=2.0, retry_after=3.0))
    with pytest.raises(BackendUnavailable) as caught:
        async with lock.hold("k"):
            raise AssertionError("must not run without the engine")
    assert caught.value.retry_after == 3.0
    assert lock.stats().active_keys == 0
    await lock.aclose()


async def test_unreachable_server_fails_open_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    lock = KeyedLock(backend=PostgresBackend.from_dsn(dsn), on_backend_error="open")
    async with lock.hold("k") as held:
        assert held.token == 0  # not fenced: served under the in-process lock only
        assert lock.locked("k")
    assert "backend unavailable" in caplog.text
    await close(lock)


# -- faults and the lease -----------------------------------------------------------------


async def test_terminated_holder_connection_hands_over_and_reports_lost(pg: Any) -> None:
    namespace = new_namespace()
    events: list[str] = []
    lost: list[LeaseLost] = []
    a = KeyedLock(backend=postgres_backend(namespace, on_lease_lost=lost.append))
    b = KeyedLock(backend=postgres_backend(namespace))

    async def waiter() -> None:
        async with b.hold("k"):
            events.append("b granted")

    async with a.hold("k") as held:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)

            async def queued() -> bool:
                return any(not g for *_, g in await advisory_locks(pg, namespace))

            await wait_until(queued, "b waits")
            [holder_pid] = [pid for pid, _, g in await advisory_locks(pg, namespace) if g]
            events.append("holder terminated")
            assert await pg.fetchval("SELECT pg_terminate_backend($1)", holder_pid)
        await wait_until(lambda: bool(lost), "a is told")
    assert events == ["holder terminated", "b granted"]
    assert (lost[0].token, lost[0].key) == (held.token, "k")
    await close(a, b)


async def test_a_reused_lock_connection_still_reports_a_lost_hold(pg: Any) -> None:
    """A connection listens for its own termination once, and tells the lease holding it now
    (no lease, so no heartbeat could tell instead)."""
    namespace = new_namespace()
    lost: list[LeaseLost] = []
    backend = postgres_backend(namespace, pool_size=1, lease=None, on_lease_lost=lost.append)
    lock = KeyedLock(backend=backend)
    async with lock.hold("first"):
        [first_pid] = [pid for pid, _, granted in await advisory_locks(pg, namespace) if granted]
    async with lock.hold("second") as second:
        [pid] = [pid for pid, _, granted in await advisory_locks(pg, namespace) if granted]
        assert pid == first_pid  # the one pooled connection, held a second time
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)
        await wait_until(lambda: bool(lost), "the second hold is told")
    assert [(e.key, e.token, e.reason) for e in lost] == [
        ("second", second.token, "connection_lost")
    ]
    await close(lock)


async def test_a_native_cancellation_during_the_release_still_frees_the_key(pg: Any) -> None:
    """`Task.cancel()` (or `asyncio.timeout`) while the release awaits its unlock: anyio's
    shield does not stop a native cancellation, yet the connection goes back (its reset
    unlocks), so the key is free for another process and the pool slot for this one."""
    namespace = new_namespace()
    backend = postgres_backend(namespace, pool_size=1, lease=None)
    lease = await backend.acquire("k", timeout=None, max_concurrency=1)
    release = asyncio.create_task(lease.release())
    await asyncio.sleep(0)  # the release has sent its unlock; the answer needs another pass
    release.cancel()
    with pytest.raises(asyncio.CancelledError):
        await release
    assert release.cancelled()
    assert await advisory_locks(pg, namespace) == []
    other = KeyedLock(backend=postgres_backend(namespace), timeout=5)
    async with other.hold("k"):  # another process
        pass
    again = await backend.acquire("j", timeout=5, max_concurrency=1)  # the one pool slot
    await again.release()
    await close(other)
    await backend.aclose()


async def test_a_native_cancellation_while_releasing_several_keys_releases_them_all(
    pg: Any,
) -> None:
    """A hold on two keys is cancelled natively while it gives the first lease back: the
    cancellation is raised only after the second lease was given back too."""
    namespace = new_namespace()
    lock = KeyedLock(backend=postgres_backend(namespace, lease=None))
    inside, leave = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with lock.hold("a", "b"):
            inside.set()
            await leave.wait()

    task = asyncio.create_task(holder())
    await inside.wait()
    assert len(await advisory_locks(pg, namespace)) == 2
    leave.set()
    await asyncio.sleep(0)  # the holder left its block and sent the first unlock
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await advisory_locks(pg, namespace) == []
    await close(lock)


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_a_holder_cut_off_from_the_server_is_told_before_the_next_gets_in(
    pg: Any, mode: str
) -> None:
    """A network partition right after a heartbeat: the server ends the silent session a
    lease after that beat and lets the next holder in. The cut-off holder is told first (its
    next beat waits only what is left of the lease, not a whole one), so its hold is revoked
    before anyone else holds the key."""
    namespace = new_namespace()
    order: list[str] = []
    async with TcpProxy(postgres_server_port()).running() as proxy:
        a = postgres_backend_via(
            proxy.port,
            namespace,
            mode=mode,
            lease=3.0,  # a margin of 0.3 s: a loop stall shorter than that cannot reorder
            heartbeat=0.5,
            on_lease_lost=lambda event: order.append("A lost"),
        )
        b = postgres_backend(namespace, mode=mode, lease=3.0)
        held = await a.acquire("k", timeout=None, max_concurrency=1)
        [(pid, _, _)] = await advisory_locks(pg, namespace)

        async def beat_answered() -> bool:
            query = "SELECT query, state FROM pg_stat_activity WHERE pid = $1"
            row = await pg.fetchrow(query, pid)
            return row["query"] == "SELECT 1" and row["state"].startswith("idle")

        await wait_until(beat_answered, "a heartbeat answered")
        proxy.cut()
        got = await b.acquire("k", timeout=10, max_concurrency=1)
        order.append("B granted")
        assert got.token > held.token
        await got.release()
        await b.aclose()
        await held.release()  # still cut off: the pool's reset gives up after connect_timeout
        await a.aclose()
    assert order == ["A lost", "B granted"]  # unanswered, or (after a stall) expired


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_a_release_cut_off_from_the_server_returns(pg: Any, mode: str) -> None:
    """A holder releases while a network partition cuts it off: the unlock and the pool's
    reset wait at most `connect_timeout`, the loss is reported, and the server's lease frees
    the key for the next holder."""
    namespace = new_namespace()
    lost: list[str] = []
    async with TcpProxy(postgres_server_port()).running() as proxy:
        a = postgres_backend_via(
            proxy.port,
            namespace,
            mode=mode,
            lease=1.5,
            connect_timeout=0.5,
            on_lease_lost=lambda event: lost.append(event.reason),
        )
        held = await a.acquire("k", timeout=None, max_concurrency=1)
        proxy.cut()
        await held.release()  # returns: without the bound it waited as long as TCP does
        assert lost == ["unreachable"]
        b = postgres_backend(namespace, mode=mode, lease=1.5)
        got = await b.acquire("k", timeout=10, max_concurrency=1)  # once the server's lease ended
        assert got.token > held.token
        await got.release()
        await b.aclose()
        await a.aclose()


async def test_a_native_cancellation_while_undoing_a_failed_hold_releases_everything(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold on two keys times out on the second (held by another process) and gives the
    first back; a native cancellation lands during that release: the first key is still
    unlocked in PostgreSQL and both keys go back in this process."""
    namespace = new_namespace()
    lock = KeyedLock(backend=postgres_backend(namespace, lease=None))
    other = KeyedLock(backend=postgres_backend(namespace, lease=None))
    releasing = asyncio.Event()
    release = PostgresLease.release

    async def signalled_release(lease: PostgresLease) -> None:
        releasing.set()
        await release(lease)

    async def holder() -> None:
        async with lock.hold("a", "b", timeout=0.3):
            pytest.fail("b is held by the other process")

    async with other.hold("b"):
        monkeypatch.setattr(PostgresLease, "release", signalled_release)
        task = asyncio.create_task(holder())
        await releasing.wait()  # "a" is being given back after the timeout on "b"
        await asyncio.sleep(0)  # its unlock is sent; the answer needs another loop pass
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.undo()
        assert [granted for _, _, granted in await advisory_locks(pg, namespace)] == [True]
    assert not lock.locked("a")
    assert not lock.locked("b")
    await close(lock, other)


async def test_an_idle_lock_connection_the_server_closed_is_replaced(pg: Any) -> None:
    """The connection kept for the next hold was closed by the server (idle timeout, restart,
    here `pg_terminate_backend`) just before the next hold, which fails on it before the client
    noticed the close: one fresh try on a new connection takes the key.

    Session mode only: in transaction mode asyncpg's script COPY (`_pg_wire.py`) meets that
    half-closed connection with an error and leaves a future nobody reads, which asyncio logs
    (the retry works all the same). Through pgbouncer the client's connection stays open."""
    namespace = new_namespace()
    lock = KeyedLock(backend=postgres_backend(namespace, pool_size=1, lease=None))
    async with lock.hold("first") as first:
        [(pid, _, _)] = await advisory_locks(pg, namespace)
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)
    async with lock.hold("second") as second:
        [(new_pid, _, granted)] = await advisory_locks(pg, namespace)
        assert granted
        assert new_pid != pid
    assert second.token > first.token
    assert await advisory_locks(pg, namespace) == []
    await close(lock)


@pytest.mark.parametrize("mode", ROUTES)
async def test_a_failing_lock_statement_is_backend_unavailable(pg: Any, mode: str) -> None:
    """A server error in the lock statement (here: the fence sequence was dropped) reaches the
    caller as `BackendUnavailable` (503 with Retry-After, or the fail-open fallback), not as
    a driver exception, and leaves nothing held."""
    namespace = new_namespace()
    sequence = f"fence_{uuid.uuid4().hex[:12]}"
    lock = KeyedLock(backend=routed_backend(mode, namespace, fence_sequence=sequence))
    async with lock.hold("k"):
        pass
    await pg.execute(f"DROP SEQUENCE {sequence}")
    with pytest.raises(BackendUnavailable, match="does not exist"):
        async with lock.hold("k"):
            pytest.fail("granted without a fencing token")
    assert await advisory_locks(pg, namespace) == []
    assert lock.stats().active_keys == 0
    await close(lock)


@pytest.mark.parametrize("mode", ROUTES)
async def test_frozen_holder_loses_the_key_after_the_lease(pg: Any, mode: str) -> None:
    """A holder whose event loop is stuck sends no heartbeat: the server ends its session
    after `lease`, the next holder gets a larger token, and the holder is told once it wakes."""
    namespace = new_namespace()
    lease = 1.0
    lost: list[LeaseLost] = []
    frozen = LoopThread()
    a = KeyedLock(
        backend=routed_backend(mode, namespace, lease=lease, on_lease_lost=lost.append)
    )  # used on the frozen loop only
    b = KeyedLock(backend=routed_backend(mode, namespace, lease=lease))
    try:
        held = a.hold("k")

        async def take() -> tuple[int, float]:
            await held.__aenter__()
            return held.token, monotonic()

        token, a_granted = await frozen.run(take())
        with frozen.freeze():  # the holder stops talking to the server
            async with b.hold("k") as later:
                b_granted = monotonic()
            assert lost == []  # frozen: it cannot know yet
        assert later.token > token
        await wait_until(lambda: bool(lost), "a is told once its loop runs again")
        assert b_granted - a_granted >= lease - 0.05  # the server waited out the lease
        assert lost[0].token == token
        await frozen.run(held.__aexit__(None, None, None))
        await frozen.run(a.aclose())
    finally:
        frozen.close()
    await close(b)


@pytest.mark.parametrize("mode", ["session", "pgbouncer"])
async def test_live_holder_keeps_the_key_past_the_lease(pg: Any, mode: str) -> None:
    """The heartbeat (a timer until the hold outlives one interval, then a task) keeps a
    working holder's session or transaction: no one else gets in meanwhile."""
    namespace = new_namespace()
    lost: list[LeaseLost] = []
    a = KeyedLock(backend=routed_backend(mode, namespace, lease=0.6, on_lease_lost=lost.append))
    b = KeyedLock(backend=routed_backend(mode, namespace, lease=0.6))
    async with a.hold("k"):
        await anyio.sleep(1.5)  # the work outlasts the lease twice over
        with pytest.raises(LockBusy):
            async with b.hold("k", timeout=0):
                pass
    assert lost == []
    await close(a, b)


# -- transaction mode ---------------------------------------------------------------------


async def test_transaction_mode_grants_in_the_message_that_opens_the_transaction(
    pg: Any,
) -> None:
    """One round trip per grant: BEGIN, the timeouts, the lock and its fence travel as one
    simple query, which the server shows as the holding session's last query."""
    namespace = new_namespace()
    lock = KeyedLock(backend=postgres_backend(namespace, mode="transaction", lease=20.0))
    async with lock.hold("k", timeout=5.0) as held:
        [query] = await pg.fetch(
            "SELECT query FROM pg_stat_activity "
            "WHERE application_name = $1 AND state = 'idle in transaction'",
            f"keyedlock:{namespace}",
        )
    text = query["query"]
    assert text.startswith("BEGIN; SET LOCAL lock_timeout = "), text
    assert 4000 < int(text.split("lock_timeout = ")[1].split(";")[0]) <= 5000
    assert "SET LOCAL idle_in_transaction_session_timeout = 20000;" in text
    assert f"pg_advisory_xact_lock({key_id(namespace, 'k')})" in text
    assert text.endswith(") TO STDOUT")
    assert held.token > 0
    assert await advisory_locks(pg, namespace) == []
    await close(lock)


async def test_transaction_mode_without_asyncpgs_script_call_takes_two_round_trips(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback of the one private asyncpg call (`_pg_wire`): BEGIN and the timeouts first,
    then the lock and its fence as a public `copy_from_query`; the same hold, tokens and
    release."""
    monkeypatch.setattr(_pg_wire, "_SCRIPT_OUT", "_no_such_method")
    namespace = new_namespace()
    lock = KeyedLock(backend=postgres_backend(namespace, mode="transaction", lease=20.0))
    other = KeyedLock(backend=postgres_backend(namespace, mode="transaction", lease=20.0))
    tokens = []
    for _ in range(2):
        async with lock.hold("k", timeout=5.0) as held:
            [query] = await pg.fetch(
                "SELECT query FROM pg_stat_activity "
                "WHERE application_name = $1 AND state = 'idle in transaction'",
                f"keyedlock:{namespace}",
            )
            with pytest.raises(LockBusy):
                async with other.hold("k", timeout=0):
                    pass
            tokens.append(held.token)
    text = query["query"]
    assert text.startswith("COPY (SELECT nextval("), text  # the second message of two
    assert f"pg_advisory_xact_lock({key_id(namespace, 'k')})" in text
    assert 0 < tokens[0] < tokens[1]
    assert await advisory_locks(pg, namespace) == []
    await close(lock, other)


# -- max_concurrency ----------------------------------------------------------------------


async def test_max_concurrency_slots_bound_holders_across_pools(pg: Any) -> None:
    namespace = new_namespace()
    locks = [KeyedLock(backend=postgres_backend(namespace), max_concurrency=2) for _ in range(3)]
    inside: list[int] = []
    peak = 0

    async def worker(i: int) -> None:
        nonlocal peak
        async with locks[i % 3].hold("k"):
            inside.append(i)
            peak = max(peak, len(inside))
            assert len(inside) <= 2, inside
            await anyio.sleep(0.01)
            inside.remove(i)

    async with anyio.create_task_group() as tg:
        for i in range(24):
            tg.start_soon(worker, i)
    assert peak == 2
    assert await advisory_locks(pg, namespace) == []
    await close(*locks)


async def test_max_concurrency_is_refused_in_transaction_mode() -> None:
    backend = postgres_backend(new_namespace(), mode="transaction")
    lock = KeyedLock(backend=backend, max_concurrency=2)
    with pytest.raises(ValueError, match="session"):
        async with lock.hold("k"):
            pass
    await close(lock)


# -- bad input ----------------------------------------------------------------------------


async def test_a_burst_of_distinct_keys_is_bounded_by_the_pool(pg: Any) -> None:
    """100,000 distinct keys at once: at most `pool_size` advisory locks exist at any time,
    the rest queue for a connection (here until their timeout): no "out of shared memory"."""
    namespace = new_namespace()
    pool_size = 8
    lock = KeyedLock(backend=postgres_backend(namespace, pool_size=pool_size), timeout=3.0)
    # Open every pool connection before the loop gets flooded: a connection opened under
    # 100,000 runnable tasks can miss its connect_timeout on a loaded machine.
    all_in, inside = anyio.Event(), []

    async def warm(n: int) -> None:
        async with lock.hold(f"warm-up:{n}"):
            inside.append(n)
            if len(inside) == pool_size:
                all_in.set()
            await all_in.wait()

    async with anyio.create_task_group() as tg:
        for n in range(pool_size):
            tg.start_soon(warm, n)
    outcomes: dict[str, int] = {"served": 0, "timeout": 0}
    peak = 0
    done, full = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(await advisory_locks(pg, namespace)))
            if peak >= pool_size:
                full.set()
            await asyncio.sleep(0.01)

    async def sentinel(n: int) -> None:
        """One of `pool_size` holds that start the burst (first in line, they take every
        connection at once) and last until the watcher has seen the pool full: the burst's
        own holds are too short for a watcher starved by 100,000 tasks to be sure to see it."""
        async with lock.hold(f"burst:sentinel:{n}"):
            with anyio.fail_after(30):
                await full.wait()

    async def one(i: int) -> None:
        try:
            async with lock.hold(f"burst:{i}"):
                outcomes["served"] += 1
        except LockTimeout:
            outcomes["timeout"] += 1

    watcher = asyncio.create_task(watch())
    # 100,000 live tasks make CPython's cyclic GC rescan them over and over (2/3 of the
    # run time here); it has nothing to do with the lock, so it waits until the end.
    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(
            *(sentinel(n) for n in range(pool_size)), *(one(i) for i in range(100_000))
        )
    finally:
        gc.enable()
        done.set()
        await watcher
    # Every caller was served or timed out queueing for a connection (how many of each
    # depends on the machine's speed): nothing else, no "out of shared memory". The pool was
    # full, and never more than full.
    assert outcomes["served"] + outcomes["timeout"] == 100_000
    assert peak == pool_size
    assert await advisory_locks(pg, namespace) == []
    async with lock.hold("after the burst") as held:  # no connection was lost on the way
        assert held.token > 0
    await close(lock)


# -- lifecycle ----------------------------------------------------------------------------


async def test_a_freed_connection_waits_for_the_next_hold_then_goes_back_to_asyncpg(
    pg: Any,
) -> None:
    """A clean release keeps the connection in the backend's idle stack, which the next hold
    takes (no trip through asyncpg's pool); after a while idle asyncpg's pool has it back."""
    namespace = new_namespace()
    backend = postgres_backend(namespace, mode="transaction", lease=2.0)  # idle keep 0.25 s
    lock = KeyedLock(backend=backend)
    async with lock.hold("k") as first:
        pass
    assert backend._pool is not None
    asyncpg_pool = backend._pool.task.result()
    assert asyncpg_pool.get_idle_size() == 0  # still the backend's, not asyncpg's
    async with lock.hold("k") as second:
        assert asyncpg_pool.get_size() == 1  # the same connection served the second hold
    assert second.token > first.token
    await wait_until(lambda: asyncpg_pool.get_idle_size() == 1, "asyncpg's pool has it back")
    async with lock.hold("k") as third:  # from asyncpg's pool again, reset skipped: clean
        assert asyncpg_pool.get_size() == 1
    assert third.token > second.token
    assert await advisory_locks(pg, namespace) == []
    await close(lock)


def test_one_backend_serves_successive_event_loops() -> None:
    require_postgres()
    lock = KeyedLock(backend=postgres_backend(new_namespace()))

    async def use() -> int:
        async with lock.hold("k") as held:
            return held.token

    first = asyncio.run(use())
    second = asyncio.run(use())
    assert second > first > 0
    asyncio.run(lock.aclose())


async def test_aclose_releases_open_holds(pg: Any) -> None:
    namespace = new_namespace()
    a, b = pair(namespace)
    hold = a.hold("k")
    await hold.__aenter__()
    await a.aclose(timeout=0)  # a shutdown that will not wait for the request holding it
    async with b.hold("k", timeout=0):
        pass
    await hold.__aexit__(None, None, None)  # the later release is a no-op
    await close(b)
