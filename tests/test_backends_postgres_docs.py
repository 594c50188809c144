"""Runs docs/examples/postgres_fencing.py (the PostgreSQL page's examples) on a real server."""

from __future__ import annotations

import pytest

from tests.support.engine_postgres import PG_DSN, require_postgres

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


async def test_fencing_example_refuses_the_stale_holder() -> None:
    require_postgres()
    from docs.examples import postgres_fencing

    assert await postgres_fencing.main(PG_DSN) == {
        "b_paid": True,
        "a_paid": False,  # the late write of the holder that lost its lease is refused
        "balance": 70,
        "a_told": True,
        "tokens_increase": True,
    }


async def test_pgbouncer_example_runs_through_pgbouncer() -> None:
    from docs.examples import postgres_pgbouncer
    from tests.support.engine_pgbouncer import pgbouncer_dsn

    assert await postgres_pgbouncer.main(pgbouncer_dsn()) == {
        "fenced": True,
        "refused": True,
        "writer_kept_out": True,
    }
