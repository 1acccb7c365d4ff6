"""Scheduled, verified etcd snapshots that survive the node being off (see docs/runbooks/etcd-restore.md).

Public surface: :func:`run` (the daemon task) and :func:`add_commands` (``edgefleet-agent snapshot``).

Importing this package is cheap on purpose: the daemon imports it whether snapshots are enabled
or not, and the scheduler (APScheduler, tzlocal), the uploader (urllib.request, email) and the
snapshot pipeline load only when a snapshot task really runs or a ``snapshot`` command is used.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from agent.snapshots.catalog import setup

if TYPE_CHECKING:
    from agent.context import AgentContext

__all__ = ["add_commands", "run", "setup"]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.snapshots import cli

    cli.add_commands(subparsers)


async def run(ctx: AgentContext) -> None:
    """The daemon task (:func:`agent.snapshots.task.run`); with snapshots disabled it only sets up
    the catalog and says so, without loading the scheduler."""
    if not ctx.config.snapshots.enabled:
        import structlog

        setup(ctx.store)
        structlog.get_logger("edgefleet.snapshots").info("etcd snapshots disabled by configuration")
        return
    from agent.snapshots import task

    await task.run(ctx)
