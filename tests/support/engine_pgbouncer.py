"""pgbouncer in transaction pooling in front of the test database, for the PostgreSQL suites.

One pgbouncer per test session, on a free loopback port, with its own ini and userlist in a
temporary directory (auth_type=trust, like the test server). It starts on first use (the
`pgbouncer` engine of tests/support/engines.py, or the fixture of the pgbouncer tests), and is
killed when the test process exits. Missing pgbouncer: skip, or fail under
KEYEDLOCK_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from keyedlock_asgi.backends.postgres import PostgresBackend
from tests.support.engine_postgres import PG_DSN, postgres_backend, require_postgres
from tests.support.server import free_port, wait_until_listening

START_LIMIT = 15.0
"""Seconds pgbouncer may take to listen before the tests fail."""


@functools.cache
def _start() -> tuple[str | None, str]:
    """(DSN through pgbouncer, "") once it listens, or (None, why not)."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if binary is None:
        return None, "pgbouncer is not installed (apt-get install pgbouncer)"
    upstream = urlsplit(PG_DSN)
    user = upstream.username or "postgres"
    database = upstream.path.lstrip("/") or "test"
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="keyedlock-pgbouncer-"))
    (workdir / "userlist.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{database} = host={upstream.hostname or '127.0.0.1'} port={upstream.port or 5432} "
        f"dbname={database}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'userlist.txt'}\n"
        "pool_mode = transaction\nmax_client_conn = 2000\ndefault_pool_size = 20\n"
        f"admin_users = {user}\nlogfile = {workdir / 'pgbouncer.log'}\n"
    )
    command = [binary]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        shutil.chown(workdir, "postgres")
        for name in ("userlist.txt", "pgbouncer.ini"):
            shutil.chown(workdir / name, "postgres")
        command += ["-u", "postgres"]
    proc = subprocess.Popen(
        [*command, str(workdir / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(stop)
    try:
        wait_until_listening(port, proc, START_LIMIT)  # type: ignore[arg-type]
    except Exception as exc:
        log = workdir / "pgbouncer.log"
        tail = log.read_text()[-500:] if log.exists() else ""
        return None, f"pgbouncer did not start ({exc}): {tail}"
    return f"postgresql://{user}@127.0.0.1:{port}/{database}", ""


def pgbouncer_dsn() -> str:
    """The DSN through pgbouncer (transaction pooling); skips or fails when it cannot run."""
    require_postgres()
    dsn, why = _start()
    if dsn is None:
        from tests.conftest import service_missing

        service_missing("pgbouncer", why)
        raise AssertionError("unreachable")  # service_missing skips or fails
    return dsn


def pgbouncer_backend(namespace: str, **options: object) -> PostgresBackend:
    """A transaction-mode backend through pgbouncer under a namespace of its own."""
    return PostgresBackend.from_dsn(
        pgbouncer_dsn(), namespace=namespace, mode="transaction", **options
    )


def pgbouncer_engine(namespace: str) -> PostgresBackend:
    """The engine factory the core semantic tests use."""
    return pgbouncer_backend(namespace)


ROUTES = ("session", "transaction", "pgbouncer")
"""How a test reaches PostgreSQL: directly in either mode, or through pgbouncer in transaction
mode (the only mode that works through transaction pooling)."""


def routed_backend(route: str, namespace: str, **options: object) -> PostgresBackend:
    """A backend for one of ROUTES."""
    if route == "pgbouncer":
        return pgbouncer_backend(namespace, **options)
    return postgres_backend(namespace, mode=route, **options)  # type: ignore[arg-type]
