"""Periodic hub housekeeping: staleness, command expiry and retries, status-history retention.

Every step is an idempotent conditional update, so several replicas can run it at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import structlog

from hub import commands
from hub.context import HubContext
from hub.notify import Change

log = structlog.get_logger("edgefleet.hub.sweeper")


async def sweep_once(ctx: HubContext) -> None:
    store = ctx.store
    changes = await asyncio.to_thread(store.sweep_stale, factor=ctx.config.staleness_factor)
    if changes:
        went_stale = [s for s, stale in changes if stale]
        recovered = [s for s, stale in changes if not stale]
        if went_stale:
            log.warning("sites stale", count=len(went_stale), sites=went_stale[:20])
        if recovered:
            log.info("sites reporting again", count=len(recovered), sites=recovered[:20])
        for site, stale in changes:
            ctx.notifier.publish(Change(kind="site", site=site, detail={"stale": stale}))
    summary = await asyncio.to_thread(store.fleet_summary)
    ctx.metrics.stale_sites.set(summary["stale"])
    expired = await asyncio.to_thread(store.expire_commands)
    for cmd_id in expired:
        ctx.metrics.commands.labels(name="any", outcome="expired").inc()
        ctx.notifier.publish(Change(kind="command", ref=cmd_id, detail={"state": "expired"}))
    await commands.publish_pending(ctx)


async def downsample_once(ctx: HubContext) -> int:
    h = ctx.config.history
    deleted = await asyncio.to_thread(
        ctx.store.downsample_history,
        full_resolution=timedelta(hours=h.full_resolution_hours),
        bucket=timedelta(minutes=h.bucket_minutes),
        retention=timedelta(days=h.retention_days),
    )
    if deleted:
        log.info("status history downsampled", deleted=deleted)
    return deleted


async def run(ctx: HubContext) -> None:
    last_downsample = time.monotonic()
    while True:
        try:
            await sweep_once(ctx)
            if time.monotonic() - last_downsample >= ctx.config.history.sweep_interval_seconds:
                last_downsample = time.monotonic()
                await downsample_once(ctx)
        except Exception as exc:  # the database may be briefly unavailable; try again next round
            log.error("sweep failed", error=str(exc)[:300])
        await asyncio.sleep(ctx.config.staleness_check_seconds)
