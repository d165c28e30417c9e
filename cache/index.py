"""The cache index: step key -> result (layer or none, history), kept in the store.

One SQLite database beside the blobs: transactions make every record all or
nothing (a killed build leaves no half entry), WAL lets concurrent builds
read and write it safely. A result is trusted only while its layer exists.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    key TEXT PRIMARY KEY, diff_id TEXT, created TEXT NOT NULL, created_by TEXT NOT NULL,
    stored REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS latest (identity TEXT PRIMARY KEY, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS digests (stat_key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, last_used REAL NOT NULL);
"""


@dataclass(frozen=True)
class StepResult:
    key: str
    diff_id: str | None  # None: the step made no layer (metadata, or a RUN that changed nothing)
    created: str
    created_by: str
    last_used: float = 0.0


class CacheIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- steps -------------------------------------------------------------------------

    def lookup(self, key: str) -> StepResult | None:
        row = self.db.execute("SELECT diff_id, created, created_by, last_used FROM steps WHERE key=?",
                              (key,)).fetchone()
        return StepResult(key, row[0], row[1], row[2], row[3]) if row else None

    def touch(self, keys: list[str]) -> None:
        now = time.time()
        with self.db:
            self.db.executemany("UPDATE steps SET last_used=? WHERE key=?", [(now, k) for k in keys])

    def record(self, result: StepResult, record: dict | None, identity: str | None) -> None:
        """Remember a step's result (and what it read, for --explain) in one transaction."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?)",
                            (result.key, result.diff_id, result.created, result.created_by, now, now))
            if record is not None:
                self.db.execute("INSERT OR REPLACE INTO records VALUES (?,?)", (result.key, json.dumps(record)))
            if identity is not None:
                self.db.execute("INSERT OR REPLACE INTO latest VALUES (?,?)", (identity, result.key))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def set_latest(self, identity: str, key: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO latest VALUES (?,?)", (identity, key))

    def previous_record(self, identity: str) -> dict | None:
        row = self.db.execute("SELECT r.record FROM latest l JOIN records r ON r.key = l.key WHERE l.identity=?",
                              (identity,)).fetchone()
        return json.loads(row[0]) if row else None

    def steps(self) -> list[StepResult]:
        rows = self.db.execute("SELECT key, diff_id, created, created_by, last_used FROM steps").fetchall()
        return [StepResult(*row) for row in rows]

    def forget(self, keys: list[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM steps WHERE key=?", [(k,) for k in keys])
            self.db.executemany("DELETE FROM records WHERE key=?", [(k,) for k in keys])
            self.db.executemany("DELETE FROM latest WHERE key=?", [(k,) for k in keys])

    # -- file digests ---------------------------------------------------------------------

    def load_digests(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT stat_key, sha256 FROM digests"))

    def save_digests(self, digests: dict[str, str]) -> None:
        if not digests:
            return
        now = time.time()
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO digests VALUES (?,?,?)",
                                [(k, v, now) for k, v in digests.items()])

    def prune_digests(self, older_than: float) -> int:
        with self.db:
            return self.db.execute("DELETE FROM digests WHERE last_used < ?", (older_than,)).rowcount
