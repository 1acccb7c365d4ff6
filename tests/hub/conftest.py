"""Fixtures of the hub tests (helpers live in hub_harness.py)."""

from hub_harness import broker, db_url, pg_url

__all__ = ["broker", "db_url", "pg_url"]
