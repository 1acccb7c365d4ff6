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
- A file is closed (handed to the fsync thread) on the write lane after its last write, so
  nothing fsyncs a file that is still being written.
- ``O_DIRECT`` changes nothing about durability: data can still sit in the device's volatile
  cache and the file's size and extents in the journal, so the stager still fsyncs every file
  and directory before the rename. Only the page-cache copy is skipped.
- Where ``O_DIRECT`` is unavailable (not Linux, a filesystem that refuses it) or a write is
  refused for alignment (``EINVAL``), the file falls back to ordinary buffered writes.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable

from bundles import container, errors

BUF_BYTES = 4 << 20  # 4 buffers: 16 MiB; 1/2/4 MiB x 2-8 buffers compared in docs/bundle-format.md
BUF_COUNT = 4
ALIGN = 4096  # O_DIRECT length/offset granularity; >= the logical block size of common devices

Sink = Callable[[memoryview], None]


class _Lane:
    """A thread running queued calls in order; after one raises, the rest are skipped.

    Calls queued with ``always`` still run after an error (closing a file). The first error
    is kept with the member number it belongs to, for the producer to re-raise.
    """

    def __init__(self, *, name: str) -> None:
        self.error: tuple[int, BaseException] | None = None
        self._q: queue.SimpleQueue[tuple[Callable[[], object], int, bool, threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            fn, seq, always, done = item
            if self.error is None or always:
                try:
                    fn()
                except BaseException as exc:  # re-raised on the producer's thread
                    if self.error is None:
                        self.error = (seq, exc)
            done.set()

    def submit(self, fn: Callable[[], object], *, seq: int, always: bool = False) -> threading.Event:
        done = threading.Event()
        self._q.put((fn, seq, always, done))
        return done

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join()


class Pipeline:
    """Page-aligned buffers (anonymous mmap), a hash lane and a write lane, shared by all members.

    Members follow each other without draining the lanes: a member's digest is compared on the
    hash lane after its last byte, and its file is closed on the write lane after its last
    write. So an error a lane finds surfaces at a later call; the caller must end with
    ``finish``, also when it fails itself, so that the error earliest in the stream wins
    whatever the threads' timing: lane work always belongs to bytes read before the point
    where the caller failed.
    """

    def __init__(self) -> None:
        self._bufs = [mmap.mmap(-1, BUF_BYTES) for _ in range(BUF_COUNT)]
        self._busy: list[list[threading.Event]] = [[] for _ in self._bufs]
        self._next = 0
        self._seq = 0
        self._write = _Lane(name="bundle-write")  # first: at the same member, a write error comes first
        self._hash = _Lane(name="bundle-hash")

    def member(
        self,
        stream: container.CappedStream,
        size: int,
        *,
        check: Callable[[str], None],
        sink: Sink | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``size`` bytes of ``stream`` for hashing (``check`` gets the hex digest) and ``sink``.

        ``close`` runs on the write lane after the member's last write, even after an error.
        """
        self._seq += 1
        seq = self._seq
        h = hashlib.sha256()
        left = size
        try:
            while left:
                i = self._next
                for ev in self._busy[i]:
                    ev.wait()
                self._raise_lane_error()
                view = memoryview(self._bufs[i])[: min(left, BUF_BYTES)]
                if stream.readinto(view) < len(view):
                    raise errors.Truncated("archive ends inside a member's data")
                left -= len(view)
                self._busy[i] = [self._hash.submit(functools.partial(h.update, view), seq=seq)]
                if sink is not None:
                    self._busy[i].append(self._write.submit(functools.partial(sink, view), seq=seq))
                self._next = (i + 1) % len(self._bufs)
            self._hash.submit(lambda: check(h.hexdigest()), seq=seq)
        finally:
            if close is not None:
                self._write.submit(close, seq=seq, always=True)

    def finish(self) -> None:
        """Wait for everything queued; raise the error the lanes found earliest in the stream."""
        for lane in (self._write, self._hash):
            lane.submit(lambda: None, seq=self._seq, always=True).wait()
        self._raise_lane_error()

    def _raise_lane_error(self) -> None:
        first: tuple[int, BaseException] | None = None
        for lane in (self._write, self._hash):  # strict <: at the same member the write lane wins
            if lane.error is not None and (first is None or lane.error[0] < first[0]):
                first = lane.error
        if first is not None:
            self._write.error = self._hash.error = None
            raise first[1]

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
