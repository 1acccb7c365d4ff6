"""The degradation journal: original replicas of every workload the controller scaled down.

A row is written *before* the cluster is touched (in the same transaction as the event that
announces it), and deleted only *after* the workload is back at its original replicas and its
annotation is gone. So at every crash point (SIGKILL, power loss) the original count is in the
DB, in the ``edgefleet.io/original-replicas`` annotation, or both; a restarted controller
adopts annotations it has no row for and reconciles from there.

The first original wins: scaling an already scaled workload further (Yellow → Red) keeps the
row's ``original`` and only updates ``target``.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.state import StateStore

MIGRATIONS = [
    """CREATE TABLE degradation_scaled (
        kind TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        tier INTEGER NOT NULL,
        original INTEGER NOT NULL,
        target INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        since REAL NOT NULL,
        PRIMARY KEY (kind, namespace, name)
    )""",
]

Key = tuple[str, str, str]


@dataclass(frozen=True)
class Record:
    kind: str
    namespace: str
    name: str
    tier: int
    original: int
    target: int
    reason: str
    since: float

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace, self.name)


def setup(store: StateStore) -> None:
    store.migrate("degradation", MIGRATIONS)


def load(store: StateStore) -> dict[Key, Record]:
    rows = store.db.execute(
        "SELECT kind, namespace, name, tier, original, target, reason, since FROM degradation_scaled"
    ).fetchall()
    return {
        (r["kind"], r["namespace"], r["name"]): Record(
            kind=r["kind"], namespace=r["namespace"], name=r["name"], tier=int(r["tier"]),
            original=int(r["original"]), target=int(r["target"]), reason=r["reason"], since=float(r["since"]),
        )
        for r in rows
    }  # fmt: skip


def save(store: StateStore, *, key: Key, tier: int, original: int, target: int, reason: str, now: float) -> None:
    """Insert the row, or update its target and reason (the original stays the first one)."""
    kind, namespace, name = key
    with store.transaction() as db:
        db.execute(
            "INSERT INTO degradation_scaled(kind, namespace, name, tier, original, target, reason, since) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(kind, namespace, name) DO UPDATE SET "
            "target=excluded.target, reason=excluded.reason, tier=excluded.tier",
            (kind, namespace, name, tier, original, target, reason, now),
        )


def forget(store: StateStore, key: Key) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM degradation_scaled WHERE kind=? AND namespace=? AND name=?", key)
