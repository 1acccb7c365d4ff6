"""In-process change notifications: "site changed", "event stored", "command changed".

The store is the truth; notifications only tell listeners (the dashboard's server-sent events,
tests) *what* to re-read, so a slow listener may lose notifications without losing data. A
subscriber whose queue overflows gets a single ``resync`` change and should re-read everything.

Typical use (a server-sent-events endpoint)::

    async with hub.notifier.subscribe() as changes:
        while True:
            change = await changes.get()
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

ChangeKind = Literal["site", "event", "command", "bundle", "resync"]


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    site: str | None = None
    #: Event row id, command id or bundle sha256, depending on ``kind``.
    ref: str | None = None
    #: Small extra facts (event type, stale flag, command state) so listeners can filter cheaply.
    detail: dict[str, str | bool | int | None] = field(default_factory=dict)


class Notifier:
    """Fan-out of :class:`Change` to any number of subscribers on one event loop.

    :meth:`publish` never blocks and may be called from the loop only (ingest and the API's async
    paths run there); threads use :meth:`publish_threadsafe`.
    """

    def __init__(self, *, queue_size: int = 1000) -> None:
        self._queues: set[asyncio.Queue[Change]] = set()
        self._overflowed: set[asyncio.Queue[Change]] = set()
        self._queue_size = queue_size
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Change]]:
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Change] = asyncio.Queue(maxsize=self._queue_size)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
            self._overflowed.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def publish(self, change: Change) -> None:
        for queue in self._queues:
            if queue in self._overflowed:
                if queue.empty():  # the listener caught up: tell it to re-read, then resume
                    self._overflowed.discard(queue)
                    queue.put_nowait(Change(kind="resync"))
                continue
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                self._overflowed.add(queue)

    def publish_threadsafe(self, change: Change) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.publish, change)
