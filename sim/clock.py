"""Simulated time: every modelled delay is in *sim seconds*, run ``speed`` times faster than real time.

Timestamps written into objects stay wall-clock (kubectl computes AGE from them); only durations are
accelerated. ``speed=60`` makes the 40 s node-monitor grace period take 0.67 s and the default 300 s eviction
toleration 5 s, so a 5-minute failure scenario runs in about 5 seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class Clock:
    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self._start = time.monotonic()

    def monotonic(self) -> float:
        """Sim seconds since the clock started."""
        return (time.monotonic() - self._start) * self.speed

    def real(self, sim_seconds: float) -> float:
        """Real seconds that ``sim_seconds`` take."""
        return max(0.0, sim_seconds / self.speed)

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(self.real(sim_seconds))

    def call_later(self, sim_seconds: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(self.real(sim_seconds), callback, *args)
