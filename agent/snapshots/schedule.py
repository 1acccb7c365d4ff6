"""When snapshots are due: cron fire times from APScheduler's ``CronTrigger``, and catch-up.

Why only the trigger and not ``AsyncIOScheduler``: the scheduler's job stores decide
missed runs at start-up in ways that are wrong for a node that was powered off. With a
memory store nothing is remembered; re-adding a persistent job with ``replace_existing=True``
resets its next run time and silently drops the missed one; ``coalesce=False`` replays every
missed fire in a burst; ``misfire_grace_time`` turns "how long was the power off" into
"whether we back up at all". Instead, the only persisted fact is the start time of the last
*successful* snapshot (in the catalog), and the rule is:

    catch up (once) at start-up  iff  the latest fire time <= now is later than the last success.

That makes a power-off spanning one or fifty fire times produce exactly one catch-up run, a
failing scheduled run get another try after a restart, a manual snapshot taken meanwhile count
as a success, and a first start on a new site take a first snapshot right away. Nothing
persisted says "next run at T", so a clock that was wrong (no RTC, NTP not yet synced) cannot
pin the schedule to a bogus time: fire times are always recomputed from the current clock.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

_SEARCH_WINDOWS = (timedelta(hours=1), timedelta(days=1), timedelta(days=8), timedelta(days=32), timedelta(days=400))


def trigger(expression: str, *, timezone: str = "UTC") -> CronTrigger:
    return CronTrigger.from_crontab(expression, timezone=timezone)


def next_fire(cron: CronTrigger, *, after: datetime) -> datetime | None:
    """The first fire time strictly after ``after``."""
    fire: datetime | None = cron.get_next_fire_time(after, after)
    return fire.astimezone(UTC) if fire is not None else None


def latest_fire(cron: CronTrigger, *, now: datetime) -> datetime | None:
    """The last fire time at or before ``now`` (within about a year), or None."""
    for window in _SEARCH_WINDOWS:
        fire: datetime | None = cron.get_next_fire_time(None, now - window)
        if fire is None or fire > now:
            continue
        while True:
            following = next_fire(cron, after=fire)
            if following is None or following > now:
                return fire.astimezone(UTC)
            fire = following
    return None


def missed_fire(cron: CronTrigger, *, now: datetime, last_success: datetime | None) -> datetime | None:
    """The fire time a catch-up run stands in for, if one is due (see the module docstring)."""
    latest = latest_fire(cron, now=now)
    if latest is None:
        return None
    if last_success is not None and last_success >= latest:
        return None
    return latest


def max_age(cron: CronTrigger, *, now: datetime, samples: int = 64) -> timedelta:
    """How old the newest snapshot may get before it is overdue: two of the longest gaps.

    One missed or failed run is tolerated; two in a row are worth a highlight on the hub.
    Sampling the next fire times covers irregular schedules (weekdays only, monthly).
    """
    gaps: list[timedelta] = []
    fire = next_fire(cron, after=now)
    for _ in range(samples):
        if fire is None:
            break
        following = next_fire(cron, after=fire)
        if following is None:
            break
        gaps.append(following - fire)
        fire = following
    return 2 * max(gaps, default=timedelta(days=1))


@dataclass
class Clock:
    """Wall time for the schedule, optionally shifted and accelerated (tests, demos).

    ``speed`` > 1 makes cron time pass faster than real time: ``sleep(60)`` at speed 60 is one
    real second. Waiting is always done in real time derived from this, so asyncio timeouts and
    events keep working.
    """

    start: datetime | None = None
    speed: float = 1.0
    _t0: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("clock speed must be positive")
        if self.start is None and self.speed != 1.0:
            self.start = datetime.now(UTC)

    def now(self) -> datetime:
        if self.start is None:
            return datetime.now(UTC)
        return self.start + timedelta(seconds=(time.monotonic() - self._t0) * self.speed)

    def real_seconds(self, seconds: float) -> float:
        return max(0.0, seconds / self.speed)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(self.real_seconds(seconds))

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        """Wait for ``event`` up to ``seconds`` of clock time; True if it was set."""
        try:
            await asyncio.wait_for(event.wait(), self.real_seconds(seconds))
        except TimeoutError:
            return event.is_set()
        return True


SYSTEM_CLOCK = Clock()
