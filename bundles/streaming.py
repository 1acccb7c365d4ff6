"""Stream a payload member: hash it and write it to staging on two threads, from the same buffers.

Why this shape (measured in docs/bundle-format.md, "Benchmark"): at 1 GiB the cost of staging
was neither the disk nor dirty-page throttling (Dirty never passed ~60 MiB of a 4.8 GiB limit;
each 64 MiB fsync took ~25 ms) but the buffered ``write`` itself: copying every byte into the
page cache (``copy_folio_from_iter_atomic``, the top kernel symbol) took longer than hashing it.
So staged files are written with ``O_DIRECT`` where the filesystem allows it: the device reads
the very buffer sha256 reads, nothing is copied, and the write runs on its own thread so the disk
stays busy while the main thread decompresses the next buffer.

Invariants:

- The bytes hashed are the bytes written: both lanes read the same buffer, and the reader only
  refills a buffer after both lanes are done with it.
- ``member`` returns only after every write and hash it started has finished (also when it
  raises), so the caller may fsync and close the file right after.
- ``O_DIRECT`` changes nothing about durability: data can still sit in the device's volatile
  cache and the file's size and extents in the journal, so the stager still fsyncs every file
  and directory before the rename. Only the page-cache copy is skipped.
- Where ``O_DIRECT`` is unavailable (not Linux, a filesystem that refuses it) or a write is
  refused for alignment (``EINVAL``), the file falls back to ordinary buffered writes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable

from bundles import container, errors

BUF_BYTES = 4 << 20  # per buffer; 4 of them: 16 MiB, the best of 1/2/4 MiB x 2-8 buffers measured
BUF_COUNT = 4
ALIGN = 4096  # O_DIRECT length/offset granularity; >= the logical block size of common devices

Sink = Callable[[memoryview], None]


class _Lane:
    """A thread applying one function to buffers in the order they are submitted.

    After the function raises, the lane skips the rest (the buffers are still released) and
    keeps the first error for the producer to re-raise.
    """

    def __init__(self, fn: Sink, *, name: str) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self._q: queue.SimpleQueue[tuple[memoryview, threading.Event] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            view, done = item
            if self.error is None:
                try:
                    self.fn(view)
                except BaseException as exc:  # re-raised on the producer's thread
                    self.error = exc
            done.set()

    def submit(self, view: memoryview) -> threading.Event:
        done = threading.Event()
        self._q.put((view, done))
        return done

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join()


class Pipeline:
    """Page-aligned buffers (anonymous mmap), a hash lane and a write lane, reused for every member."""

    def __init__(self) -> None:
        self._bufs = [mmap.mmap(-1, BUF_BYTES) for _ in range(BUF_COUNT)]
        self._h = hashlib.sha256()
        self._sink: Sink | None = None
        self._hash = _Lane(self._update, name="bundle-hash")
        self._write = _Lane(self._put, name="bundle-write")

    def _update(self, view: memoryview) -> None:
        self._h.update(view)

    def _put(self, view: memoryview) -> None:
        assert self._sink is not None
        self._sink(view)

    def member(self, stream: container.CappedStream, size: int, sink: Sink | None) -> str:
        """Read ``size`` bytes from ``stream``, hash them and hand them to ``sink``; the hex digest."""
        self._h = hashlib.sha256()
        self._sink = sink
        busy: list[list[threading.Event]] = [[] for _ in self._bufs]
        i = 0
        left = size
        try:
            while left:
                for ev in busy[i]:
                    ev.wait()
                self._raise_lane_error()
                view = memoryview(self._bufs[i])[: min(left, BUF_BYTES)]
                if stream.readinto(view) < len(view):
                    raise errors.Truncated("archive ends inside a member's data")
                left -= len(view)
                busy[i] = [self._hash.submit(view)]
                if sink is not None:
                    busy[i].append(self._write.submit(view))
                i = (i + 1) % len(self._bufs)
        finally:
            for evs in busy:
                for ev in evs:
                    ev.wait()
        self._raise_lane_error()
        return self._h.hexdigest()

    def _raise_lane_error(self) -> None:
        for lane in (self._write, self._hash):
            if lane.error is not None:
                exc, lane.error = lane.error, None
                raise exc

    def stop(self) -> None:
        self._hash.stop()
        self._write.stop()


class StagedFile:
    """Sequential writes to a new file, ``O_DIRECT`` for whole aligned blocks when possible.

    Only the last buffer of a file can be shorter than ``BUF_BYTES``; its aligned part still
    goes direct, the remainder (and everything after a refused direct write) through the page
    cache, from an aligned offset, so mixing the two never needs a read-modify-write.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = _enable_direct(fd)

    def write(self, view: memoryview) -> None:
        off = 0
        if self.direct:
            aligned = len(view) - len(view) % ALIGN
            try:
                while off < aligned:
                    off += os.write(self.fd, view[off:aligned])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            if off < len(view):
                self._buffered()
        while off < len(view):
            off += os.write(self.fd, view[off:])

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False


def _enable_direct(fd: int) -> bool:
    """Set O_DIRECT on an open fd (fcntl, not open: a refused open would have created the file)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
    except OSError:
        return False
    return True
