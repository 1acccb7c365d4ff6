"""The snapshot catalog: one row per verified snapshot file, in the agent's SQLite store.

The file system and the catalog can disagree after a power loss (a renamed file whose row
was never written, a row whose file was deleted by hand); :func:`reconcile` settles that at
start-up. A row is written only after the file is verified, fsynced and renamed into place,
so a row always names a complete file. Retention is a pure function over rows, so its rules
("never the newest verified") are tested without touching disk.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.state import StateStore

MODULE = "snapshots"
MIGRATIONS = [
    """CREATE TABLE snapshot_catalog (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        taken REAL NOT NULL,
        duration REAL NOT NULL,
        backend TEXT NOT NULL,
        trigger TEXT NOT NULL,
        revision INTEGER NOT NULL,
        total_keys INTEGER NOT NULL,
        etcd_hash INTEGER NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        file_sha256 TEXT NOT NULL,
        compressed INTEGER NOT NULL,
        verified INTEGER NOT NULL,
        verified_at REAL NOT NULL
    )""",
    "CREATE INDEX snapshot_catalog_taken ON snapshot_catalog(taken)",
    "ALTER TABLE snapshot_catalog ADD COLUMN uploaded_at REAL",
]


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    taken: datetime
    duration: float
    backend: str
    trigger: str
    revision: int
    total_keys: int
    etcd_hash: int
    size: int  # raw snapshot bytes
    sha256: str  # of the raw snapshot
    file_size: int
    file_sha256: str
    compressed: bool
    verified: bool
    verified_at: datetime
    uploaded_at: datetime | None = None  # copied to the hub and confirmed there


def setup(store: StateStore) -> None:
    store.migrate(MODULE, MIGRATIONS)


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        name=row["name"],
        path=Path(row["path"]),
        taken=datetime.fromtimestamp(row["taken"], UTC),
        duration=row["duration"],
        backend=row["backend"],
        trigger=row["trigger"],
        revision=row["revision"],
        total_keys=row["total_keys"],
        etcd_hash=row["etcd_hash"],
        size=row["size"],
        sha256=row["sha256"],
        file_size=row["file_size"],
        file_sha256=row["file_sha256"],
        compressed=bool(row["compressed"]),
        verified=bool(row["verified"]),
        verified_at=datetime.fromtimestamp(row["verified_at"], UTC),
        uploaded_at=datetime.fromtimestamp(row["uploaded_at"], UTC) if row["uploaded_at"] is not None else None,
    )


def add(store: StateStore, entry: Entry) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO snapshot_catalog(name, path, taken, duration, backend, trigger, revision, total_keys,"
            " etcd_hash, size, sha256, file_size, file_sha256, compressed, verified, verified_at)"
            " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.name,
                str(entry.path),
                entry.taken.timestamp(),
                entry.duration,
                entry.backend,
                entry.trigger,
                entry.revision,
                entry.total_keys,
                entry.etcd_hash,
                entry.size,
                entry.sha256,
                entry.file_size,
                entry.file_sha256,
                int(entry.compressed),
                int(entry.verified),
                entry.verified_at.timestamp(),
            ),
        )


def entries(store: StateStore) -> list[Entry]:
    """All rows, newest first."""
    rows = store.db.execute("SELECT * FROM snapshot_catalog ORDER BY taken DESC, id DESC").fetchall()
    return [_entry(r) for r in rows]


def get(store: StateStore, name: str) -> Entry | None:
    row = store.db.execute("SELECT * FROM snapshot_catalog WHERE name=?", (name,)).fetchone()
    return None if row is None else _entry(row)


def newest_verified(store: StateStore) -> Entry | None:
    return next((e for e in entries(store) if e.verified), None)


def remove(store: StateStore, name: str) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM snapshot_catalog WHERE name=?", (name,))


def mark_verified(store: StateStore, name: str, *, verified: bool, at: datetime) -> None:
    with store.transaction() as db:
        db.execute(
            "UPDATE snapshot_catalog SET verified=?, verified_at=? WHERE name=?",
            (int(verified), at.timestamp(), name),
        )


def mark_uploaded(store: StateStore, name: str, *, at: datetime) -> None:
    with store.transaction() as db:
        db.execute("UPDATE snapshot_catalog SET uploaded_at=? WHERE name=?", (at.timestamp(), name))


def expired(all_entries: list[Entry], *, keep: int | None, max_age: timedelta | None, now: datetime) -> list[Entry]:
    """The entries retention deletes.

    A snapshot stays while it is among the newest ``keep`` verified ones *and* younger than
    ``max_age`` (an unset rule keeps everything). Entries whose re-verification failed are
    worthless and always go. Whatever the rules say, the newest verified snapshot stays: a
    site whose clock jumped a year ahead, or whose snapshots have been failing for weeks,
    must not be left with nothing to restore.
    """
    ordered = sorted(all_entries, key=lambda e: e.taken, reverse=True)
    newest = next((e for e in ordered if e.verified), None)
    out: list[Entry] = []
    rank = 0
    for entry in ordered:
        if entry is newest:
            rank += 1
            continue
        if not entry.verified:
            out.append(entry)
            continue
        rank += 1
        too_many = keep is not None and rank > keep
        too_old = max_age is not None and now - entry.taken > max_age
        if too_many or too_old:
            out.append(entry)
    return out
