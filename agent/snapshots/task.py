"""The daemon task: scheduled, catch-up, on-demand and retry snapshots, one at a time.

The loop keeps a single "due" time and what it is due for. Triggers are merged, never
queued: an on-demand request (``ctx.snapshot_now``, set by the hub's ``snapshot-now`` command
or the HTTP API) that arrives during a run causes one more run right after it, however many
requests came in. Waiting happens in short slices re-reading the clock, so a clock step
(NTP after a cold boot without RTC) moves the schedule instead of freezing it.

Failures of scheduled work are retried with exponential backoff, never later than the next
scheduled time. While the site is Red (``ctx.limp_home``) snapshots still run, because a
site in trouble is the one most likely to need one, but retries use the longest interval so
a struggling node is not hammered.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timedelta

import structlog
from apscheduler.triggers.cron import CronTrigger

from agent.context import AgentContext
from agent.snapshots import catalog, schedule, status, take, upload

log = structlog.get_logger("edgefleet.snapshots")

SLICE_SECONDS = 60.0  # longest uninterrupted wait, in clock seconds
STATUS_REFRESH_SECONDS = 60.0  # real seconds between site.snapshot age refreshes
CLOCK_STEP = timedelta(minutes=5)  # a backwards jump larger than this is a clock step, not drift


def backoff(config_initial: float, config_max: float, consecutive: int) -> float:
    """Exponential with ±10 % jitter so a fleet that failed together does not retry together."""
    base = min(config_max, config_initial * 2 ** max(0, consecutive - 1))
    return float(base * random.uniform(0.9, 1.1))


async def run(
    ctx: AgentContext,
    *,
    clock: schedule.Clock = schedule.SYSTEM_CLOCK,
    free_bytes: take.FreeBytes = take.disk_free,
) -> None:
    cfg = ctx.config.snapshots
    catalog.setup(ctx.store)
    if not cfg.enabled:
        log.info("etcd snapshots disabled by configuration")
        return
    cron = schedule.trigger(cfg.schedule, timezone=cfg.timezone)
    await take.reconcile(ctx)
    status.publish(ctx.store, cfg, now=clock.now())
    succeeded = asyncio.Event()
    uploader = asyncio.create_task(upload.run(ctx, wake=succeeded)) if cfg.upload_enabled else None
    try:
        await _loop(ctx, cron=cron, clock=clock, free_bytes=free_bytes, succeeded=succeeded)
    finally:
        if uploader is not None:
            uploader.cancel()
            await asyncio.gather(uploader, return_exceptions=True)


async def _loop(
    ctx: AgentContext,
    *,
    cron: CronTrigger,
    clock: schedule.Clock,
    free_bytes: take.FreeBytes,
    succeeded: asyncio.Event,
) -> None:
    cfg = ctx.config.snapshots
    now = clock.now()
    newest = catalog.newest_verified(ctx.store)
    missed = schedule.missed_fire(cron, now=now, last_success=newest.taken if newest else None)
    due: datetime | None
    if missed is not None:
        due, reason = now + timedelta(seconds=cfg.catchup_delay_seconds), "catch-up"
        log.info("a scheduled snapshot was missed; catching up", missed=missed.isoformat(), at=due.isoformat())
    else:
        due, reason = schedule.next_fire(cron, after=now), "scheduled"
    retries = 0
    refreshed = time.monotonic()
    last_seen = now

    while True:
        now = clock.now()
        if now < last_seen - CLOCK_STEP and reason != "catch-up":
            # The clock stepped back (NTP after a cold boot, an operator fixing it): fire times
            # computed from the old clock could be days away. Recompute from the new one.
            due = schedule.next_fire(cron, after=now) if reason == "scheduled" else now
            log.warning("wall clock stepped backwards; schedule recomputed", now=now.isoformat())
        last_seen = now
        if ctx.snapshot_now.is_set():
            ctx.snapshot_now.clear()
            if (await take.take(ctx, trigger="on-demand", free_bytes=free_bytes, now=now)).ok:
                succeeded.set()
            continue  # the pending scheduled/retry run keeps its time
        if due is not None and now >= due:
            outcome = await take.take(ctx, trigger=reason, free_bytes=free_bytes, now=now)
            refreshed = time.monotonic()
            after = clock.now()
            following = schedule.next_fire(cron, after=max(after, due))
            if outcome.ok:
                succeeded.set()
                retries = 0
                due, reason = following, "scheduled"
                continue
            retries += 1
            limit = cfg.retry_max_seconds
            delay = limit if ctx.limp_home.is_set() else backoff(cfg.retry_initial_seconds, limit, retries)
            retry_at = after + timedelta(seconds=delay)
            if following is None or retry_at < following:
                due, reason = retry_at, "retry"
                log.info("snapshot will be retried", attempt=retries + 1, in_seconds=round(delay, 1))
            else:
                due, reason = following, "scheduled"
            continue
        wait = SLICE_SECONDS if due is None else min(SLICE_SECONDS, (due - now).total_seconds())
        await clock.wait(ctx.snapshot_now, max(wait, 0.0))
        if time.monotonic() - refreshed >= STATUS_REFRESH_SECONDS:
            status.publish(ctx.store, cfg, now=clock.now())
            refreshed = time.monotonic()
