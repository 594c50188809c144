"""Shared holds on PostgresBackend: readers together, writers alone, one FIFO across modes.

Each party has its own `PostgresBackend` (its own pool and sessions, as a process would), so the
server's lock manager is what is tested: `pg_locks` shows who waits, and a recorded timeline of
who was inside shows who overlapped. Parties are named `R*` (shared) or `W*` (exclusive).
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from keyedlock_asgi import LockBusy, LockTimeout
from keyedlock_asgi.backends.postgres import PostgresBackend
from tests.support.engine_pgbouncer import ROUTES, routed_backend
from tests.support.engine_postgres import PG_DSN, postgres_backend, require_postgres
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

LIMIT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    require_postgres()
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    yield conn
    await conn.close()


async def lock_rows(pg: Any, namespace: str) -> list[tuple[int, str, bool]]:
    """(pid, mode, granted) of the namespace's advisory locks, held or awaited."""
    rows = await pg.fetch(
        "SELECT l.pid, l.mode, l.granted FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND a.application_name = $1",
        f"keyedlock:{namespace}",
    )
    return [(r["pid"], r["mode"], r["granted"]) for r in rows]


def exclusive(who: object) -> bool:
    return str(who).startswith("W")


def assert_exclusion(timeline: Timeline, max_concurrency: int = 1) -> None:
    """Replay the timeline: a writer never overlaps a reader, nor more than
    `max_concurrency - 1` other writers."""
    inside: set[object] = set()
    for kind, _, who in timeline.events:
        if kind == "out":
            inside.discard(who)
            continue
        writers = [w for w in inside if exclusive(w)]
        if exclusive(who):
            assert len(writers) < max_concurrency, (who, inside)
            assert len(writers) == len(inside), (who, inside)
        else:
            assert not writers, (who, inside)
        inside.add(who)


class Party:
    """Holders on one key, each on its own backend; the test decides when each leaves."""

    def __init__(self, tg: Any, pg: Any, mode: str = "session", max_concurrency: int = 1) -> None:
        self.tg, self.pg = tg, pg
        self.namespace = f"test-{uuid.uuid4().hex[:12]}"
        self.mode, self.max_concurrency = mode, max_concurrency
        self.timeline = Timeline()
        self.tokens: dict[str, int] = {}
        self.leave: dict[str, anyio.Event] = {}
        self.ended: dict[str, anyio.Event] = {}
        self.outcome: dict[str, str] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.backends: list[PostgresBackend] = []
        self.changed = anyio.Event()  # replaced after each enter/leave

    def _record(self, kind: str, who: str) -> None:
        (self.timeline.enter if kind == "in" else self.timeline.leave)("k", who)
        self.changed.set()
        self.changed = anyio.Event()

    def start(self, who: str, timeout: float | None = None) -> None:
        backend = routed_backend(self.mode, self.namespace)
        self.backends.append(backend)
        self.leave[who], self.ended[who] = anyio.Event(), anyio.Event()
        self.scopes[who] = anyio.CancelScope()
        self.tg.start_soon(self._hold, backend, who, timeout)

    async def _hold(self, backend: PostgresBackend, who: str, timeout: float | None) -> None:
        try:
            with self.scopes[who]:
                try:
                    lease = await backend.acquire(
                        "k",
                        timeout=timeout,
                        max_concurrency=self.max_concurrency,
                        shared=not exclusive(who),
                    )
                except (LockBusy, LockTimeout) as exc:
                    self.outcome[who] = type(exc).__name__
                    return
                self.tokens[who] = lease.token
                self._record("in", who)
                try:
                    await self.leave[who].wait()
                finally:
                    self._record("out", who)
                    await lease.release()
                self.outcome[who] = "held"
            if self.scopes[who].cancelled_caught:
                self.outcome[who] = "cancelled"
        finally:
            self.ended[who].set()

    async def enqueue(self, who: str, timeout: float | None = None) -> None:
        """Start `who` and return once the server shows it waiting: arrival order is fixed."""
        before = await lock_rows(self.pg, self.namespace)
        waiting = sum(not granted for *_, granted in before)
        self.start(who, timeout)
        await self.until(lambda rows: sum(not g for *_, g in rows) == waiting + 1, f"{who} waits")

    async def until(self, condition: Any, what: str) -> None:
        """Bounded readiness wait on the server's lock table."""

        async def holds() -> bool:
            return bool(condition(await lock_rows(self.pg, self.namespace)))

        await wait_until(holds, what, limit=LIMIT)

    async def inside(self, *who: str) -> None:
        """Wait until exactly `who` are inside."""
        with anyio.fail_after(LIMIT):
            while self.inside_now() != set(who):
                await self.changed.wait()

    def inside_now(self) -> set[str]:
        inside: set[str] = set()
        for kind, _, who in self.timeline.events:
            (inside.add if kind == "in" else inside.discard)(str(who))
        return inside

    async def release(self, *who: str) -> None:
        for name in who:
            self.leave[name].set()
        with anyio.fail_after(LIMIT):
            for name in who:
                await self.ended[name].wait()

    async def waiting(self) -> int:
        return sum(not granted for *_, granted in await lock_rows(self.pg, self.namespace))

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()


@pytest.mark.parametrize("mode", ROUTES)
async def test_readers_hold_together_and_a_writer_alone(pg: Any, mode: str) -> None:
    async with anyio.create_task_group() as tg:
        party = Party(tg, pg, mode)
        for who in ("R1", "R2", "R3"):
            party.start(who, timeout=0)  # timeout=0: granted at once or LockBusy
        await party.inside("R1", "R2", "R3")
        modes = [m for _, m, g in await lock_rows(pg, party.namespace) if g]
        assert modes == ["ShareLock"] * 3  # really pg_advisory_lock_shared
        party.start("W4", timeout=0)
        party.start("W5", timeout=0.2)
        await party.ended["W4"].wait()
        await party.ended["W5"].wait()
        assert (party.outcome["W4"], party.outcome["W5"]) == ("LockBusy", "LockTimeout")
        await party.release("R1", "R2", "R3")
        party.start("W6", timeout=0)
        await party.inside("W6")
        party.start("R7", timeout=0)
        await party.ended["R7"].wait()
        assert party.outcome["R7"] == "LockBusy"
        await party.release("W6")
    assert_exclusion(party.timeline)
    assert len(set(party.tokens.values())) == 4
    assert party.tokens["W6"] > max(party.tokens[r] for r in ("R1", "R2", "R3"))
    assert await lock_rows(pg, party.namespace) == []
    await party.aclose()


@pytest.mark.parametrize("mode", ROUTES)
async def test_arrival_order_is_kept_across_modes(pg: Any, mode: str) -> None:
    """W0 holds; R1 R2 W3 R4 R5 arrive in that order. R1+R2 run together, then W3 alone, then
    R4+R5: R4 arrived while readers held the key, yet queued behind the waiting writer."""
    async with anyio.create_task_group() as tg:
        party = Party(tg, pg, mode)
        party.start("W0")
        await party.inside("W0")
        for who in ("R1", "R2", "W3", "R4", "R5"):
            await party.enqueue(who)
        await party.release("W0")
        await party.inside("R1", "R2")
        assert await party.waiting() == 3  # W3, and R4/R5 behind it although readers hold
        await party.release("R1")
        assert await party.waiting() == 3  # R2 still holds: W3 waits
        await party.release("R2")
        await party.inside("W3")
        assert await party.waiting() == 2
        await party.release("W3")
        await party.inside("R4", "R5")
        await party.release("R4", "R5")
    assert_exclusion(party.timeline)
    runs = [{"W0"}, {"R1", "R2"}, {"W3"}, {"R4", "R5"}]
    entries = [str(w) for w in party.timeline.entries()]
    assert [set(entries[0:1]), set(entries[1:3]), set(entries[3:4]), set(entries[4:6])] == runs
    for earlier, later in itertools.pairwise(runs):  # fencing tokens follow the grants
        assert max(party.tokens[w] for w in earlier) < min(party.tokens[w] for w in later)
    assert await lock_rows(pg, party.namespace) == []
    await party.aclose()


@pytest.mark.parametrize("mode", ROUTES)
@pytest.mark.parametrize("how", ["cancelled", "timeout"])
async def test_a_shared_waiter_leaving_mid_run(pg: Any, mode: str, how: str) -> None:
    """W0 holds; R1 R2 R3 W4 wait; R2 leaves (cancelled or timed out): R1 and R3 still run
    together, W4 after them, and R2 left nothing in the server."""
    async with anyio.create_task_group() as tg:
        party = Party(tg, pg, mode)
        party.start("W0")
        await party.inside("W0")
        await party.enqueue("R1")
        await party.enqueue("R2", timeout=1.5 if how == "timeout" else None)
        await party.enqueue("R3")
        await party.enqueue("W4")
        assert not party.ended["R2"].is_set(), "R2 timed out before the queue was built"
        if how == "cancelled":
            party.scopes["R2"].cancel()
        with anyio.fail_after(LIMIT):
            await party.ended["R2"].wait()
        assert party.outcome["R2"] == ("cancelled" if how == "cancelled" else "LockTimeout")
        assert await party.waiting() == 3  # R2's wait is gone from the server
        await party.release("W0")
        await party.inside("R1", "R3")
        assert await party.waiting() == 1  # W4
        await party.release("R1", "R3")
        await party.inside("W4")
        await party.release("W4")
    assert_exclusion(party.timeline)
    assert "R2" not in party.timeline.entries()
    assert await lock_rows(pg, party.namespace) == []
    await party.aclose()


async def test_slots_writers_together_up_to_n_readers_apart_in_order(pg: Any) -> None:
    """max_concurrency=2: W1+W2 together; R3 W4 R5 R6 arrive in order. R3 waits for both
    writers, W4 for R3, and R5+R6 (together) for W4; readers never meet a writer."""
    async with anyio.create_task_group() as tg:
        party = Party(tg, pg, "session", max_concurrency=2)
        party.start("W1", timeout=0)  # one after the other: two try-only callers can meet
        await party.inside("W1")  # at the gate, and the second is then told LockBusy
        party.start("W2", timeout=0)
        await party.inside("W1", "W2")
        for who in ("R3", "W4", "R5"):
            await party.enqueue(who)  # R3 waits on slot 1 holding the gate; W4 and R5 on it
        party.start("R6")  # behind R5 at the gate
        # R3 (holding the gate) waits on slot 1; W4, R5 and now R6 wait on the gate.
        await party.until(lambda rows: sum(not g for *_, g in rows) == 4, "R6 waits")
        await party.release("W1")

        # R3 takes slot 1 shared and waits for W2's slot 2; the rest still wait on the gate.
        def r3_on_slot_2(rows: list[tuple[int, str, bool]]) -> bool:
            granted_shared = ("ShareLock", True) in {(m, g) for _, m, g in rows}
            return granted_shared and sum(not g for *_, g in rows) == 4

        await party.until(r3_on_slot_2, "R3 holds slot 1 shared and waits for slot 2")
        assert party.inside_now() == {"W2"}
        await party.release("W2")
        await party.inside("R3")
        await party.release("R3")
        await party.inside("W4")  # W4 polls the slots; R5 and R6 still queue at the gate
        await party.release("W4")
        await party.inside("R5", "R6")
        await party.release("R5", "R6")
    assert_exclusion(party.timeline, max_concurrency=2)
    entries = [str(w) for w in party.timeline.entries()]
    assert set(entries[:2]) == {"W1", "W2"}
    assert entries[2:4] == ["R3", "W4"]
    assert set(entries[4:]) == {"R5", "R6"}
    assert await lock_rows(pg, party.namespace) == []
    await party.aclose()


@pytest.mark.parametrize(
    ("mode", "max_concurrency"),
    [("session", 1), ("transaction", 1), ("pgbouncer", 1), ("session", 2)],
)
async def test_a_mixed_crowd_never_breaks_exclusion(
    pg: Any, mode: str, max_concurrency: int
) -> None:
    """Readers and writers on 4 backends in a random order: the recorded timeline shows no
    writer with a reader and at most `max_concurrency` writers together."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    backends = [routed_backend(mode, namespace) for _ in range(4)]
    timeline = Timeline()
    tokens: list[int] = []
    rng = random.Random(15)
    names = [("R" if rng.random() < 0.6 else "W") + str(i) for i in range(48)]

    async def one(i: int, who: str) -> None:
        lease = await backends[i % 4].acquire(
            "k", timeout=None, max_concurrency=max_concurrency, shared=who.startswith("R")
        )
        timeline.enter("k", who)
        tokens.append(lease.token)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        timeline.leave("k", who)
        await lease.release()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, who in enumerate(names):
                tg.start_soon(one, i, who)
    assert_exclusion(timeline, max_concurrency)
    assert len(timeline.entries()) == 48
    assert len(set(tokens)) == 48
    assert await lock_rows(pg, namespace) == []
    for backend in backends:
        await backend.aclose()


def test_transaction_mode_refuses_slots_for_readers_too() -> None:
    require_postgres()
    backend = postgres_backend("unused", mode="transaction")

    async def take() -> None:
        await backend.acquire("k", timeout=0, max_concurrency=2, shared=True)

    with pytest.raises(ValueError, match="session"):
        anyio.run(take)
