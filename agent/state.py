"""The agent's local state: one SQLite database in WAL mode under ``state_dir``.

Why SQLite: it is transactional across power loss (``synchronous=FULL`` + WAL), needs no
server on a small node, and every module's state (install journal, inventory, outbox,
snapshot catalog, degradation records) can change in one transaction when it must.

Each module owns its tables and declares them as an ordered list of migration statements
through :meth:`StateStore.migrate`; the applied count per module is recorded, so adding a
statement at the end of a module's list is how its schema evolves.

The store is used from the event loop thread. SQLite calls here are short (small rows, local
disk), so they run inline; anything heavy belongs in a thread with its own connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DB_NAME = "agent.db"


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (module TEXT PRIMARY KEY, applied INTEGER NOT NULL)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    @classmethod
    def open(cls, state_dir: Path) -> StateStore:
        return cls(state_dir / DB_NAME)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; nested calls join the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.db
                finally:
                    self._depth -= 1
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.db
            except BaseException:
                self._depth = 0
                self.db.execute("ROLLBACK")
                raise
            self._depth = 0
            self.db.execute("COMMIT")

    def migrate(self, module: str, statements: Sequence[str]) -> None:
        """Apply the statements of ``module`` not applied yet, each in its own transaction."""
        with self.transaction() as db:
            row = db.execute("SELECT applied FROM schema_migrations WHERE module=?", (module,)).fetchone()
            applied = int(row["applied"]) if row else 0
            for index in range(applied, len(statements)):
                db.execute(statements[index])
            db.execute(
                "INSERT INTO schema_migrations(module, applied) VALUES(?, ?) "
                "ON CONFLICT(module) DO UPDATE SET applied=excluded.applied",
                (module, max(applied, len(statements))),
            )

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def put(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value, sort_keys=True, default=str)),
            )

    def next_counter(self, key: str) -> int:
        """Increment and return a persisted counter (e.g. the per-site message sequence)."""
        with self.transaction():
            value = int(self.get(key, 0)) + 1
            self.put(key, value)
            return value
