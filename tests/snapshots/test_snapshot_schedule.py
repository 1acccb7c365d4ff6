"""The schedule: cron fire times, catch-up after power-off, on-demand, retry with backoff (real etcd)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from snapshot_helpers import MakeCtx, events

from agent import sitestatus
from agent.context import AgentContext
from agent.snapshots import catalog, devetcd, schedule, take, task

UTC = dt.UTC


def at(hour: int, minute: int = 0, second: int = 0, day: int = 2) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, minute, second, tzinfo=UTC)  # 2026-03-02 is a Monday


def test_fire_times_and_catch_up_rule():
    cron = schedule.trigger("0 */6 * * *")
    assert schedule.next_fire(cron, after=at(6)) == at(12)
    assert schedule.next_fire(cron, after=at(5, 59)) == at(6)
    assert schedule.latest_fire(cron, now=at(6)) == at(6)
    assert schedule.latest_fire(cron, now=at(11, 59)) == at(6)
    # Off from 05:00 to 13:10: 06:00 and 12:00 missed -> one catch-up standing in for 12:00.
    assert schedule.missed_fire(cron, now=at(13, 10), last_success=at(5)) == at(12)
    # A manual snapshot after the missed fire counts.
    assert schedule.missed_fire(cron, now=at(13, 10), last_success=at(12, 30)) is None
    # A first start on a new site: take one.
    assert schedule.missed_fire(cron, now=at(13, 10), last_success=None) == at(12)
    # Fifty days off: still exactly one fire time to catch up.
    assert schedule.missed_fire(cron, now=at(13, 10, day=28), last_success=at(5)) == at(12, day=28)
    # Clock was wrong at the last success (in the future now): no catch-up, schedule continues.
    assert schedule.missed_fire(cron, now=at(13), last_success=at(13, day=20)) is None


def test_max_age_follows_the_schedule_and_time_zone():
    assert schedule.max_age(schedule.trigger("0 */6 * * *"), now=at(1)) == dt.timedelta(hours=12)
    # Weekdays at 03:00: the weekend gap (Fri -> Mon, 72 h) dominates.
    assert schedule.max_age(schedule.trigger("0 3 * * 1-5"), now=at(1)) == dt.timedelta(hours=144)
    berlin = schedule.trigger("0 3 * * *", timezone="Europe/Berlin")
    assert schedule.next_fire(berlin, after=at(0)) == at(2)  # 03:00 CET is 02:00 UTC


def test_accelerated_clock():
    clock = schedule.Clock(start=at(10), speed=3600)
    assert clock.real_seconds(3600) == 1
    assert at(10) <= clock.now() < at(11)


async def _until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _triggers(ctx: AgentContext) -> list[str]:
    return [e.trigger for e in reversed(catalog.entries(ctx.store))]


async def _run_for(ctx: AgentContext, clock: schedule.Clock, seconds: float) -> None:
    runner = asyncio.create_task(task.run(ctx, clock=clock))
    await asyncio.sleep(seconds)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_scheduled_snapshots_fire_on_the_cron_clock(etcd: devetcd.Node, make_ctx: MakeCtx):
    ctx = make_ctx(etcd.url, schedule="* * * * *", catchup_delay_seconds=0)
    start = at(10, 0, 50)
    assert (await take.take(ctx, trigger="manual", now=start)).ok  # so nothing is missed at start
    clock = schedule.Clock(start=start, speed=20)
    runner = asyncio.create_task(task.run(ctx, clock=clock))
    try:
        await _until(lambda: _triggers(ctx).count("scheduled") >= 2, timeout=20, what="two scheduled runs")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    entries = list(reversed(catalog.entries(ctx.store)))
    assert [e.trigger for e in entries[:3]] == ["manual", "scheduled", "scheduled"]
    for entry, fire in zip(entries[1:3], (at(10, 1), at(10, 2)), strict=True):
        assert fire <= entry.taken < fire + dt.timedelta(seconds=30), (entry.taken, fire)


async def test_power_off_spanning_scheduled_times_gives_exactly_one_catch_up(etcd, make_ctx):
    ctx = make_ctx(etcd.url, schedule="0 * * * *", catchup_delay_seconds=30)
    assert (await take.take(ctx, trigger="manual", now=at(9, 30))).ok
    # Running through 10:00: the scheduled run happens; then the power goes off.
    runner = asyncio.create_task(task.run(ctx, clock=schedule.Clock(start=at(9, 59, 40), speed=60)))
    try:
        await _until(lambda: "scheduled" in _triggers(ctx), timeout=10, what="the 10:00 run")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert _triggers(ctx) == ["manual", "scheduled"]
    # Power back at 13:20: 11:00, 12:00 and 13:00 were missed. Run for 180 clock seconds.
    await _run_for(ctx, schedule.Clock(start=at(13, 20), speed=60), 3.0)
    assert _triggers(ctx) == ["manual", "scheduled", "catch-up"]
    newest = catalog.entries(ctx.store)[0]
    assert at(13, 20, 30) <= newest.taken < at(13, 21, 30)  # after the catch-up delay
    # Another restart at 13:25 (nothing missed since the catch-up): nothing extra.
    await _run_for(ctx, schedule.Clock(start=at(13, 25), speed=60), 1.5)
    assert _triggers(ctx) == ["manual", "scheduled", "catch-up"]
    assert [e["type"] for e in events(ctx)] == ["snapshot.succeeded"] * 3


async def test_on_demand_requests_are_merged(etcd, make_ctx):
    ctx = make_ctx(etcd.url, schedule="0 0 1 1 *")
    assert (await take.take(ctx, trigger="manual")).ok
    runner = asyncio.create_task(task.run(ctx))
    try:
        await asyncio.sleep(0.3)
        for _ in range(3):  # e.g. the hub command delivered three times
            ctx.snapshot_now.set()
        await _until(lambda: "on-demand" in _triggers(ctx), timeout=10, what="the on-demand run")
        await asyncio.sleep(1.0)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert _triggers(ctx) == ["manual", "on-demand"]


async def test_etcd_down_fails_and_retries_with_backoff_until_it_is_back(make_ctx, tmp_path: Path, monkeypatch):
    port = devetcd.free_port()
    ctx = make_ctx(
        f"http://127.0.0.1:{port}",
        schedule="0 0 * * *",
        catchup_delay_seconds=0,
        timeout_seconds=1.2,
        retry_initial_seconds=8,
        retry_max_seconds=64,
    )
    clock = schedule.Clock(start=at(10), speed=20)
    attempts: list[tuple[dt.datetime, dt.datetime, bool, str]] = []
    real_take = take.take

    async def recording_take(ctx: AgentContext, **kwargs) -> take.Outcome:  # wraps the real thing
        started = clock.now()
        outcome = await real_take(ctx, **kwargs)
        attempts.append((started, clock.now(), outcome.ok, kwargs["trigger"]))
        return outcome

    monkeypatch.setattr(take, "take", recording_take)
    runner = asyncio.create_task(task.run(ctx, clock=clock))
    try:
        await _until(lambda: len(attempts) >= 3, timeout=20, what="three failed attempts")
        async with devetcd.running(tmp_path / "late-etcd", port=port):
            await _until(lambda: any(a[2] for a in attempts), timeout=20, what="a successful retry")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    failed = [a for a in attempts if not a[2]]
    assert [a[3] for a in attempts][:3] == ["catch-up", "retry", "retry"]
    assert attempts[-1][2] and attempts[-1][3] == "retry"
    gaps = [(nxt[0] - prev[1]).total_seconds() for prev, nxt in zip(attempts, attempts[1:], strict=False)]
    # Backoff 8, 16, 32 clock seconds (±10 % jitter, capped at 64): each wait clearly longer than the last.
    assert 7 <= gaps[0] <= 12, gaps
    assert gaps[1] > 1.4 * gaps[0] and gaps[2 if len(gaps) > 2 else 1] >= gaps[1] * 0.99, gaps
    kinds = [e["type"] for e in events(ctx)]
    assert kinds == ["snapshot.failed"] * len(failed) + ["snapshot.succeeded"]
    assert [e["data"]["consecutive_failures"] for e in events(ctx)[:-1]] == list(range(1, len(failed) + 1))
    assert ctx.store.get(sitestatus.SNAPSHOT_KEY)["failures"] == 0


async def test_clock_stepping_back_recomputes_the_schedule(etcd, make_ctx):
    ctx = make_ctx(etcd.url, schedule="0 * * * *")
    assert (await take.take(ctx, trigger="manual", now=at(10, 30, day=3))).ok
    clock = schedule.Clock(start=at(10, 40, day=3), speed=600)  # next fire 11:00 on the 3rd
    runner = asyncio.create_task(task.run(ctx, clock=clock))
    try:
        await asyncio.sleep(0.3)
        # NTP corrects the clock a day back: waiting for "11:00 on the 3rd" would mean 24 h without a snapshot.
        clock.start = clock.start - dt.timedelta(days=1)
        await _until(lambda: "scheduled" in _triggers(ctx), timeout=10, what="a run on the corrected clock")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    [scheduled] = [e for e in catalog.entries(ctx.store) if e.trigger == "scheduled"]
    assert at(11, day=2) <= scheduled.taken < at(11, 5, day=2)
    # Its name is unique even though the clock now repeats times already used.
    assert len({e.name for e in catalog.entries(ctx.store)}) == 2


async def test_limp_home_retries_wait_retry_max_seconds(make_ctx: MakeCtx, monkeypatch: pytest.MonkeyPatch):
    """In Red (``limp_home``) a failed snapshot is retried after retry_max_seconds, not the backoff.

    etcd is down (real etcdctl against a port where nothing listens). Backoff alone would wait 8,
    then 16 clock seconds; in Red both waits are the full 64. Once Red clears, the next failure
    is back on the backoff curve (32 s ±10 % for the third consecutive failure).
    """
    ctx = make_ctx(
        f"http://127.0.0.1:{devetcd.free_port()}",
        schedule="0 0 * * *",
        catchup_delay_seconds=0,
        timeout_seconds=1.2,
        retry_initial_seconds=8,
        retry_max_seconds=64,
    )
    ctx.limp_home.set()
    clock = schedule.Clock(start=at(10), speed=20)
    attempts: list[tuple[dt.datetime, dt.datetime, bool]] = []
    real_take = take.take

    async def recording_take(ctx: AgentContext, **kwargs) -> take.Outcome:  # wraps the real thing
        started = clock.now()
        outcome = await real_take(ctx, **kwargs)
        attempts.append((started, clock.now(), outcome.ok))
        return outcome

    monkeypatch.setattr(take, "take", recording_take)
    runner = asyncio.create_task(task.run(ctx, clock=clock))
    try:
        # The wait after an attempt is decided as it fails, before this poll can run again: the
        # first two waits are decided in Red, the third after it cleared.
        await _until(lambda: len(attempts) >= 2, timeout=30, what="two failed attempts in Red")
        ctx.limp_home.clear()
        await _until(lambda: len(attempts) >= 4, timeout=30, what="two more attempts after Red")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert not any(ok for _, _, ok in attempts)
    gaps = [(nxt[0] - prev[1]).total_seconds() for prev, nxt in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 64 and gaps[1] >= 64, gaps
    assert 28 <= gaps[2] < 64, gaps
