"""The outbox: every message for the hub is written here before it is published.

A row is deleted only after the broker acknowledged it (PUBACK), so a crash, a power loss or
a weeks-long outage loses nothing. Status samples are compacted (latest wins); events are
never compacted or dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import protocol
from agent.state import StateStore

MIGRATIONS = [
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        msg_id TEXT NOT NULL UNIQUE,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL
    )""",
    "CREATE INDEX outbox_channel ON outbox(channel, id)",
]

SEQ_KEY = "protocol.seq"


@dataclass(frozen=True)
class Pending:
    id: int
    channel: protocol.Channel
    msg_id: str
    seq: int
    payload: bytes


def setup(store: StateStore) -> None:
    store.migrate("outbox", MIGRATIONS)


def next_seq(store: StateStore) -> int:
    return store.next_counter(SEQ_KEY)


def enqueue(store: StateStore, message: protocol.Message, *, channel: protocol.Channel) -> None:
    """Persist ``message`` for publishing. Status rows replace older unsent status rows."""
    with store.transaction() as db:
        if channel is protocol.Channel.STATUS:
            db.execute("DELETE FROM outbox WHERE channel=?", (channel.value,))
        db.execute(
            "INSERT OR IGNORE INTO outbox(channel, msg_id, seq, payload, created) VALUES(?, ?, ?, ?, ?)",
            (channel.value, message.msg_id, message.seq, message.to_bytes(), message.ts.timestamp()),
        )


def pending(store: StateStore, *, limit: int = 100) -> list[Pending]:
    rows = store.db.execute(
        "SELECT id, channel, msg_id, seq, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
    ).fetchall()
    return [
        Pending(id=r["id"], channel=protocol.Channel(r["channel"]), msg_id=r["msg_id"], seq=r["seq"],
                payload=bytes(r["payload"]))
        for r in rows
    ]


def ack(store: StateStore, row_id: int) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM outbox WHERE id=?", (row_id,))
