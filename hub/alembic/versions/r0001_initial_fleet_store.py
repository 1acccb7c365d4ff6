"""Initial fleet store: sites, status history, events, snapshots, commands, replies, bundles.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 05:32:04.073438
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundles",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("release", sa.Integer(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.String(length=300), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256"),
    )
    op.create_table(
        "command_counters",
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("site"),
    )
    op.create_table(
        "commands",
        sa.Column("cmd_id", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("issued", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("cmd_id"),
        sa.UniqueConstraint("site", "seq", name="uq_commands_site_seq"),
    )
    op.create_index(op.f("ix_commands_site"), "commands", ["site"], unique=False)
    op.create_index(op.f("ix_commands_state"), "commands", ["state"], unique=False)
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("msg_id", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("msg_id"),
    )
    op.create_index("ix_events_site_seq", "events", ["site", "seq"], unique=False)
    op.create_index(op.f("ix_events_type"), "events", ["type"], unique=False)
    op.create_table(
        "replies",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("msg_id", sa.String(length=64), nullable=False),
        sa.Column("cmd_id", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("msg_id"),
    )
    op.create_index(op.f("ix_replies_cmd_id"), "replies", ["cmd_id"], unique=False)
    op.create_table(
        "sites",
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_ts", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_seq", sa.BigInteger(), nullable=True),
        sa.Column("status_msg_id", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=True),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("install_state", sa.String(length=32), nullable=True),
        sa.Column("bundle_name", sa.String(length=200), nullable=True),
        sa.Column("bundle_version", sa.String(length=100), nullable=True),
        sa.Column("bundle_release", sa.Integer(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("interval_seconds", sa.Float(), nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=True),
        sa.Column("online_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stale", sa.Boolean(), nullable=False),
        sa.Column("stale_since", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("site"),
    )
    op.create_index(op.f("ix_sites_stale"), "sites", ["stale"], unique=False)
    op.create_index(op.f("ix_sites_state"), "sites", ["state"], unique=False)
    op.create_table(
        "snapshots",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("site", "taken_at", "ok", name="uq_snapshots_site_taken_ok"),
    )
    op.create_index(op.f("ix_snapshots_site"), "snapshots", ["site"], unique=False)
    op.create_table(
        "status_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("msg_id", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("msg_id"),
    )
    op.create_index("ix_status_history_site_received", "status_history", ["site", "received_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_status_history_site_received", table_name="status_history")
    op.drop_table("status_history")
    op.drop_index(op.f("ix_snapshots_site"), table_name="snapshots")
    op.drop_table("snapshots")
    op.drop_index(op.f("ix_sites_state"), table_name="sites")
    op.drop_index(op.f("ix_sites_stale"), table_name="sites")
    op.drop_table("sites")
    op.drop_index(op.f("ix_replies_cmd_id"), table_name="replies")
    op.drop_table("replies")
    op.drop_index(op.f("ix_events_type"), table_name="events")
    op.drop_index("ix_events_site_seq", table_name="events")
    op.drop_table("events")
    op.drop_index(op.f("ix_commands_state"), table_name="commands")
    op.drop_index(op.f("ix_commands_site"), table_name="commands")
    op.drop_table("commands")
    op.drop_table("command_counters")
    op.drop_table("bundles")
