"""Scheduled, verified etcd snapshots that survive the node being off (see docs/runbooks/etcd-restore.md).

Public surface: :func:`run` (the daemon task) and :func:`add_commands` (``edgefleet-agent snapshot``).
"""

from __future__ import annotations

from agent.snapshots.catalog import setup
from agent.snapshots.cli import add_commands
from agent.snapshots.task import run

__all__ = ["add_commands", "run", "setup"]
