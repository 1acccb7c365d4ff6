"""The fleet store's tables (SQLAlchemy 2). Schema changes go through Alembic (hub/alembic/versions).

Timestamps are stored as timezone-aware UTC where the database can (PostgreSQL) and read back as
aware UTC everywhere (:class:`UTCDateTime`), so SQLite and PostgreSQL behave the same.
``received_at`` is always the hub's clock: a site's clock may be wrong, so staleness and ordering of
arrival never depend on it. ``ts`` is the site's own timestamp, kept for display and latency.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which has no time zones) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the fleet store; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Site(Base):
    """One row per site: its latest status (the authoritative "now" of the fleet view)."""

    __tablename__ = "sites"

    site: Mapped[str] = mapped_column(String(63), primary_key=True)
    first_seen: Mapped[datetime]
    #: Any accepted message (status, event, online, reply), hub clock.
    last_seen: Mapped[datetime]
    #: When the latest status arrived (hub clock; for a retained status replayed by the broker, the
    #: older of hub and site time, so a long-dead site does not look fresh after a hub restart).
    status_at: Mapped[datetime | None]
    status_ts: Mapped[datetime | None]
    status_seq: Mapped[int | None] = mapped_column(BigInteger)
    status_msg_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str | None] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    install_state: Mapped[str | None] = mapped_column(String(32))
    bundle_name: Mapped[str | None] = mapped_column(String(200))
    bundle_version: Mapped[str | None] = mapped_column(String(100))
    bundle_release: Mapped[int | None] = mapped_column(Integer)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    interval_seconds: Mapped[float | None] = mapped_column(Float)
    #: The latest status document exactly as sent (validated JSON text; not re-encoded on the hot path).
    status: Mapped[str | None] = mapped_column(Text)
    #: Driven by ``online`` messages only (the Last Will sets it false); None until one arrives.
    online: Mapped[bool | None] = mapped_column(Boolean)
    online_at: Mapped[datetime | None]
    stale: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    stale_since: Mapped[datetime | None]


class StatusSample(Base):
    """Status history, downsampled for retention (see hub/retention.py)."""

    __tablename__ = "status_history"
    __table_args__ = (Index("ix_status_history_site_received", "site", "received_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    site: Mapped[str] = mapped_column(String(63))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime]
    received_at: Mapped[datetime]
    #: When the batch holding this sample was written (publish → stored latency).
    stored_at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16))
    #: True when the state, install state or bundle differs from the previous sample: always retained.
    changed: Mapped[bool] = mapped_column(Boolean, default=False)
    #: A compact projection (counts, unhealthy components, bundle), not the whole status.
    summary: Mapped[dict[str, Any]]


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_site_seq", "site", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    site: Mapped[str] = mapped_column(String(63))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime]
    received_at: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(100), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    summary: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]]


class SnapshotRow(Base):
    """etcd snapshots as reported by sites (status.snapshot and snapshot.* events)."""

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("site", "taken_at", "ok", name="uq_snapshots_site_taken_ok"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(63), index=True)
    taken_at: Mapped[datetime]
    ok: Mapped[bool] = mapped_column(Boolean)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    revision: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]


class CommandRow(Base):
    """A signed command and its lifecycle: pending → published → accepted → done | failed | rejected | expired."""

    __tablename__ = "commands"
    __table_args__ = (UniqueConstraint("site", "seq", name="uq_commands_site_seq"),)

    cmd_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(63), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict[str, Any]]
    issued: Mapped[datetime]
    expires: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16), index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any] | None]
    #: The DSSE envelope exactly as published (JSON text).
    envelope: Mapped[str] = mapped_column(Text)
    published_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class CommandCounter(Base):
    """The last command sequence number per site: strictly increasing, persisted, shared by replicas."""

    __tablename__ = "command_counters"

    site: Mapped[str] = mapped_column(String(63), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)


class ReplyRow(Base):
    __tablename__ = "replies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    cmd_id: Mapped[str] = mapped_column(String(64), index=True)
    site: Mapped[str] = mapped_column(String(63))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime]
    received_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]]


class BundleRow(Base):
    """A bundle uploaded to the hub, verified against the trust root before it was offered."""

    __tablename__ = "bundles"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(100))
    release: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(300))
    uploaded_at: Mapped[datetime]
    info: Mapped[dict[str, Any]]


class HubReplica(Base):
    """Hub replicas sharing a subscription group, so survivors can adopt a dead replica's broker session."""

    __tablename__ = "hub_replicas"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    shared_group: Mapped[str] = mapped_column(String(100))
    hostname: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    #: The live replica currently draining this (dead) replica's session, if any.
    adopted_by: Mapped[str | None] = mapped_column(String(64))


def _table(cls: type[Base]) -> Table:
    return cast(Table, cls.__table__)


#: Core tables, for the bulk statements of ingest and the store's queries.
SITES = _table(Site)
STATUS_HISTORY = _table(StatusSample)
EVENTS = _table(EventRow)
SNAPSHOTS = _table(SnapshotRow)
COMMANDS = _table(CommandRow)
COMMAND_COUNTERS = _table(CommandCounter)
REPLIES = _table(ReplyRow)
BUNDLES = _table(BundleRow)
HUB_REPLICAS = _table(HubReplica)
