"""Object storage: one global resourceVersion, serialized-once JSON, and watch fan-out with a bounded history.

Why bytes first: the mirror contains CRDs of up to ~950 KiB of JSON. As Python dicts they would cost ~10x that,
so every object is kept as its compact JSON (served verbatim to GET/LIST/WATCH) and only small objects also keep
their parsed dict. Stored dicts are never mutated in place: writers build a new dict and ``put`` it.

The watch history is bounded by count and bytes. A watch (or a list's ``continue``) from a resourceVersion older
than the history answers ``410 Gone`` as a real server does after etcd compaction; ``compact()`` forces that.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

SMALL_OBJECT_BYTES = 32 * 1024
HISTORY_EVENTS = 4096
HISTORY_BYTES = 24 * 1024 * 1024

Key = tuple[str, str]  # (group, plural)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Entry:
    """One stored object version. Immutable once created."""

    __slots__ = ("_obj", "labels", "name", "namespace", "raw", "rv")

    def __init__(self, obj: dict[str, Any], rv: int) -> None:
        meta = obj.get("metadata") or {}
        self.raw = dumps(obj)
        self.rv = rv
        self.name: str = meta.get("name", "")
        self.namespace: str = meta.get("namespace", "") or ""
        self.labels: dict[str, str] = meta.get("labels") or {}
        self._obj: dict[str, Any] | None = obj if len(self.raw) <= SMALL_OBJECT_BYTES else None

    @property
    def obj(self) -> dict[str, Any]:
        """The object as a dict. Shared for small objects: callers must copy before changing it."""
        if self._obj is not None:
            return self._obj
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed

    def copy(self) -> dict[str, Any]:
        """A private, mutable deep copy."""
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed


@dataclasses.dataclass(slots=True)
class Event:
    type: str  # ADDED, MODIFIED, DELETED
    key: Key
    entry: Entry
    old: Entry | None


class Gone(Exception):
    """The requested resourceVersion is older than the watch history."""


class Watcher:
    def __init__(self, *, key: Key, namespace: str, match: Callable[[Entry], bool]) -> None:
        self.key = key
        self.namespace = namespace
        self.match = match
        self.queue: asyncio.Queue[tuple[str, Entry] | None] = asyncio.Queue()

    def offer(self, ev: Event) -> None:
        if self.namespace and ev.entry.namespace != self.namespace:
            return
        new_ok = self.match(ev.entry)
        if ev.type == "MODIFIED" and ev.old is not None:
            old_ok = self.match(ev.old)
            if new_ok and not old_ok:
                self.queue.put_nowait(("ADDED", ev.entry))
            elif old_ok and not new_ok:
                self.queue.put_nowait(("DELETED", ev.entry))
            elif new_ok:
                self.queue.put_nowait(("MODIFIED", ev.entry))
            return
        if new_ok:
            self.queue.put_nowait((ev.type, ev.entry))


class Store:
    def __init__(self) -> None:
        self.rv = 1
        self._data: dict[Key, dict[tuple[str, str], Entry]] = collections.defaultdict(dict)
        self._history: collections.deque[tuple[int, Event]] = collections.deque()
        self._history_bytes = 0
        self.compacted = 1  # events with rv > compacted are in history
        self._watchers: dict[Key, set[Watcher]] = collections.defaultdict(set)
        self._listeners: list[Callable[[Event], None]] = []

    # --- reads -------------------------------------------------------------------------------------------------
    def get(self, key: Key, namespace: str, name: str) -> Entry | None:
        return self._data[key].get((namespace, name))

    def select(self, key: Key, namespace: str = "") -> list[Entry]:
        items = self._data[key]
        entries = [e for (ns, _), e in items.items() if ns == namespace] if namespace else list(items.values())
        entries.sort(key=lambda e: (e.namespace, e.name))
        return entries

    def iter(self, key: Key) -> Iterator[Entry]:
        yield from list(self._data[key].values())

    def count(self, key: Key) -> int:
        return len(self._data[key])

    def kinds(self) -> list[Key]:
        return [k for k, v in self._data.items() if v]

    # --- writes ------------------------------------------------------------------------------------------------
    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, key: Key, obj: dict[str, Any]) -> Entry:
        """Store ``obj`` (its metadata.resourceVersion is set here) and notify watchers."""
        rv = self.next_rv()
        obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
        entry = Entry(obj, rv)
        slot = (entry.namespace, entry.name)
        old = self._data[key].get(slot)
        self._data[key][slot] = entry
        self._emit(Event("MODIFIED" if old else "ADDED", key, entry, old))
        return entry

    def delete(self, key: Key, namespace: str, name: str) -> Entry | None:
        old = self._data[key].pop((namespace, name), None)
        if old is None:
            return None
        rv = self.next_rv()
        obj = old.copy()
        obj["metadata"]["resourceVersion"] = str(rv)
        entry = Entry(obj, rv)
        self._emit(Event("DELETED", key, entry, old))
        return entry

    def _emit(self, ev: Event) -> None:
        self._history.append((ev.entry.rv, ev))
        self._history_bytes += len(ev.entry.raw)
        while len(self._history) > HISTORY_EVENTS or self._history_bytes > HISTORY_BYTES:
            rv, old = self._history.popleft()
            self._history_bytes -= len(old.entry.raw)
            self.compacted = rv
        for w in list(self._watchers[ev.key]):
            w.offer(ev)
        for listener in list(self._listeners):
            listener(ev)

    def compact(self) -> None:
        """Forget all watch history (as etcd compaction): older resourceVersions now answer 410 Gone."""
        self._history.clear()
        self._history_bytes = 0
        self.compacted = self.rv

    # --- watch -------------------------------------------------------------------------------------------------
    def listen(self, callback: Callable[[Event], None]) -> None:
        self._listeners.append(callback)

    def watch(self, *, key: Key, namespace: str, match: Callable[[Entry], bool], since: int | None) -> Watcher:
        """Register a watcher. ``since=None`` starts with ADDED events for the current state."""
        w = Watcher(key=key, namespace=namespace, match=match)
        if since is None:
            for e in self.select(key, namespace):
                if match(e):
                    w.queue.put_nowait(("ADDED", e))
        else:
            if since < self.compacted:
                raise Gone(f"too old resource version: {since} ({self.compacted + 1})")
            for rv, ev in self._history:
                if rv > since and ev.key == key:
                    w.offer(ev)
        self._watchers[key].add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        self._watchers[w.key].discard(w)

    def close_watchers(self) -> None:
        for ws in self._watchers.values():
            for w in ws:
                w.queue.put_nowait(None)
