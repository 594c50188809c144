"""The protected resource of the chaos tests: a SQLite log that refuses stale fencing tokens.

Every process of a chaos test (holders, the test itself) writes here. SQLite serializes the
writers (`BEGIN IMMEDIATE`), so the row ids are one total order of events across processes;
`t` is `time.monotonic()`, the same clock in every process of the machine. A write carries its
hold's fencing token and is refused when the resource already took a larger token for the key,
which is what a real resource (`UPDATE ... WHERE fence <= $token`) does.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Holder", "Resource", "Verdict", "check"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    who TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,          -- enter, write, exit, lost, note
    token INTEGER NOT NULL,
    accepted INTEGER             -- writes: 1 taken, 0 refused by the token check
);
CREATE TABLE IF NOT EXISTS fence (key TEXT PRIMARY KEY, token INTEGER NOT NULL);
"""


class Resource:
    """One process's handle on the log (open it in each process; SQLite locks the file)."""

    def __init__(self, path: Path | str) -> None:
        self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        self.db.executescript(_SCHEMA)

    def record(self, who: str, key: str, kind: str, token: int = 0) -> float:
        now = time.monotonic()
        self.db.execute(
            "INSERT INTO events (t, who, key, kind, token) VALUES (?, ?, ?, ?, ?)",
            (now, who, key, kind, token),
        )
        return now

    def write(self, who: str, key: str, token: int) -> bool:
        """The fenced write: refused if a larger token was already taken for `key`."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT token FROM fence WHERE key = ?", (key,)).fetchone()
            accepted = row is None or row[0] <= token
            if accepted:
                db.execute(
                    "INSERT INTO fence (key, token) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET token = excluded.token",
                    (key, token),
                )
            db.execute(
                "INSERT INTO events (t, who, key, kind, token, accepted) VALUES (?, ?, ?, ?, ?, ?)",
                (time.monotonic(), who, key, "write", token, int(accepted)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return accepted

    def rows(self) -> list[sqlite3.Row]:
        self.db.row_factory = sqlite3.Row
        try:
            return list(self.db.execute("SELECT * FROM events ORDER BY id"))
        finally:
            self.db.row_factory = None

    def close(self) -> None:
        self.db.close()


@dataclass
class Holder:
    """One grant, as the log saw it."""

    who: str
    key: str
    token: int
    enter: int
    """Row id of the holder's entry (recorded just after the grant)."""
    exit: int | None = None
    """Row id of its exit (recorded just before the release); None: it never left."""
    lost: bool = False
    """It was told its lease was lost (`on_lease_lost`)."""
    writes: list[tuple[int, bool]] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """Still entitled to the key for its whole interval: no lease lost, no write refused."""
        return not self.lost and all(accepted for _, accepted in self.writes)


@dataclass
class Verdict:
    holders: list[Holder]
    refused: int
    accepted: int


def check(resource: Resource) -> Verdict:
    """Assert the chaos invariants on the whole log; return what it saw.

    - every holder left (nothing stays held by a process that still runs);
    - per key, the intervals of live holders never overlap;
    - per key, tokens strictly increase in grant order, and the writes the resource took
      carry non-decreasing tokens.
    """
    holders: dict[tuple[str, int], Holder] = {}
    refused = accepted = 0
    for row in resource.rows():
        index = (row["who"], row["token"])
        kind = row["kind"]
        if kind == "enter":
            holders[index] = Holder(row["who"], row["key"], row["token"], row["id"])
        elif kind == "exit":
            holders[index].exit = row["id"]
        elif kind == "lost":
            if index in holders:
                holders[index].lost = True
        elif kind == "write":
            holders[index].writes.append((row["id"], bool(row["accepted"])))
            if row["accepted"]:
                accepted += 1
            else:
                refused += 1
    by_key: dict[str, list[Holder]] = {}
    for holder in sorted(holders.values(), key=lambda h: h.enter):
        assert holder.exit is not None, f"{holder.who} (token {holder.token}) never left"
        by_key.setdefault(holder.key, []).append(holder)
    for key, grants in by_key.items():
        tokens = [h.token for h in grants]
        assert tokens == sorted(set(tokens)), f"{key}: tokens out of order {tokens}"
        live = [h for h in grants if h.live]
        for before, after in itertools.pairwise(live):
            assert before.exit is not None
            assert after.enter > before.exit, (
                f"{key}: {after.who} (token {after.token}) entered while {before.who} "
                f"(token {before.token}) was live inside"
            )
        writes = sorted((i, h.token) for h in grants for i, ok in h.writes if ok)
        taken = [token for _, token in writes]
        assert taken == sorted(taken), f"{key}: a stale write was taken"
    return Verdict(list(holders.values()), refused, accepted)
