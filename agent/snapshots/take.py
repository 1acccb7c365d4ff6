"""One snapshot, start to finish, so that every crash point leaves a defined state.

    guard disk → backend writes <name>.db.part → fsync → verify (+ compress to <name>.db.zst.part,
    fsync) → rename to the final name → fsync the directory → catalog row → retention

A crash before the rename leaves only ``*.part`` files, removed at the next start. A crash
between the rename and the catalog row leaves a complete, verified file without a row, which
:func:`reconcile` re-verifies and adopts. Retention runs only after a new snapshot is safely
recorded, and never removes the newest verified one.

Single flight: one snapshot at a time per snapshot directory, across processes (the daemon and
``edgefleet-agent snapshot now``), through an ``flock`` on ``<dir>/.lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from agent import metrics, protocol
from agent.context import AgentContext
from agent.snapshots import backends, binaries, catalog, status, verify

log = structlog.get_logger("edgefleet.snapshots")

FreeBytes = Callable[[Path], int]
NAME_RE = re.compile(r"^etcd-(\d{8}T\d{6})\.(\d{3})Z\.db(\.zst)?$")
LOCK_NAME = ".lock"


class Refused(Exception):
    """The disk guard said no; nothing was written."""


class Busy(Exception):
    """Another snapshot holds the lock and did not finish in time."""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    kind: str  # "succeeded" | "failed" | "refused"
    message: str
    entry: catalog.Entry | None = None


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def snapshot_name(at: datetime, *, compressed: bool) -> str:
    at = at.astimezone(UTC)
    return f"etcd-{at:%Y%m%dT%H%M%S}.{at.microsecond // 1000:03d}Z.db" + (verify.ZST_SUFFIX if compressed else "")


def taken_from_name(name: str) -> datetime | None:
    match = NAME_RE.match(name)
    if not match:
        return None
    base = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return base + timedelta(milliseconds=int(match.group(2)))


@contextlib.asynccontextmanager
async def locked(directory: Path, *, wait: float | None) -> AsyncIterator[None]:
    """Hold the directory's snapshot lock; poll so the event loop stays free while waiting."""
    fd = _open_lock(directory)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise Busy(f"another snapshot is running in {directory}") from None
                await asyncio.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_name(ctx: AgentContext, directory: Path, now: datetime) -> str:
    """A name no file or row has: after a clock step backwards, ``now`` may repeat an old time."""
    compressed = ctx.config.snapshots.compress
    stamp = now
    while True:
        name = snapshot_name(stamp, compressed=compressed)
        raw = name.removesuffix(verify.ZST_SUFFIX)
        taken = {raw, raw + verify.ZST_SUFFIX}
        if not any((directory / n).exists() or catalog.get(ctx.store, n) for n in taken):
            return name
        stamp += timedelta(milliseconds=1)


def _guard(ctx: AgentContext, directory: Path, free_bytes: FreeBytes) -> None:
    cfg = ctx.config.snapshots
    free = free_bytes(directory)
    newest = next(iter(catalog.entries(ctx.store)), None)
    last_size = newest.size if newest else 0
    if free < cfg.min_free_bytes:
        raise Refused(f"only {_human(free)} free in {directory}, below the {_human(cfg.min_free_bytes)} threshold")
    if free < 2 * last_size:
        raise Refused(f"only {_human(free)} free in {directory}, below twice the last snapshot ({_human(last_size)})")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _etcdutl(ctx: AgentContext) -> Path:
    try:
        return binaries.find("etcdutl", explicit=ctx.config.snapshots.etcdutl)
    except binaries.BinaryNotFound as exc:
        raise verify.VerificationFailed(f"cannot verify: {exc}") from None


async def _take_locked(
    ctx: AgentContext, *, trigger: str, directory: Path, free_bytes: FreeBytes, now: datetime
) -> catalog.Entry:
    cfg = ctx.config.snapshots
    _guard(ctx, directory, free_bytes)
    etcdutl = _etcdutl(ctx)  # before taking anything: an unverifiable snapshot is a failure anyway
    name = _free_name(ctx, directory, now)
    raw_name = name.removesuffix(verify.ZST_SUFFIX)
    raw_part = directory / f"{raw_name}.part"
    final = directory / name
    zst_part = directory / f"{name}.part" if cfg.compress else None
    etcdctl_part = directory / f"{raw_name}.part.part"  # etcdctl's own temporary file
    started = time.monotonic()
    try:
        for stale in (raw_part, etcdctl_part):
            stale.unlink(missing_ok=True)
        draining = await _save(ctx, raw_part, growing=etcdctl_part, compress_to=zst_part)
        status_task: asyncio.Task[verify.Status] | None = None
        try:
            if not raw_part.is_file():
                raise backends.BackendError(f"{cfg.backend}: reported success but wrote no file")
            # The file is complete: etcdutl reads it while the follower drains its tail and the
            # fsync runs (the three used to run one after the other; ~4 % of a snapshot).
            status_task = asyncio.create_task(verify.etcd_status(etcdutl, raw_part, timeout=cfg.timeout_seconds))
            streamed = await draining if draining is not None else None
            await asyncio.to_thread(verify.fsync_path, raw_part)
            if streamed is None and zst_part is not None:
                zst_part.unlink(missing_ok=True)
            etcd_status, digest = await verify.verify_raw(
                raw_part,
                etcdutl=etcdutl,
                timeout=cfg.timeout_seconds,
                compress_to=zst_part,
                level=cfg.zstd_level,
                digest=streamed,
                status=status_task,
            )
        finally:
            for task in (draining, status_task):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (draining, status_task) if t is not None), return_exceptions=True)
        os.replace(zst_part or raw_part, final)
        fsync_dir(directory)
    finally:
        for leftover in (raw_part, zst_part, etcdctl_part):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
    return _verified_entry(
        name=name, path=final, taken=now, duration=time.monotonic() - started, backend=cfg.backend,
        trigger=trigger, compressed=cfg.compress, etcd_status=etcd_status, digest=digest,
    )


def _verified_entry(
    *, name: str, path: Path, taken: datetime, duration: float, backend: str, trigger: str, compressed: bool,
    etcd_status: verify.Status, digest: verify.Digest,
) -> catalog.Entry:
    """The catalog row of a snapshot file that just passed verification."""
    return catalog.Entry(
        name=name,
        path=path,
        taken=taken,
        duration=duration,
        backend=backend,
        trigger=trigger,
        revision=etcd_status.revision,
        total_keys=etcd_status.total_keys,
        etcd_hash=etcd_status.etcd_hash,
        size=digest.size,
        sha256=digest.sha256,
        file_size=digest.file_size,
        file_sha256=digest.file_sha256,
        compressed=compressed,
        verified=True,
        verified_at=datetime.now(UTC),
    )


async def _save(
    ctx: AgentContext, dest: Path, *, growing: Path, compress_to: Path | None
) -> asyncio.Task[verify.Digest | None] | None:
    """Run the backend; for etcdctl, digest (and compress) the file while it downloads.

    Returns once the backend is done, with the follower still draining the file's tail: a task
    giving the streamed digest, or None when the file must be digested afterwards (that task's
    result is None too when the follower could not vouch for what it read).
    """
    cfg = ctx.config.snapshots
    if cfg.backend != "etcdctl":
        await backends.save(cfg, dest)
        return None
    done = threading.Event()
    follower = asyncio.create_task(
        asyncio.to_thread(verify.follow, growing, final=dest, done=done, compress_to=compress_to, level=cfg.zstd_level)
    )
    try:
        await backends.save(cfg, dest)
    except BaseException:
        done.set()
        await asyncio.gather(follower, return_exceptions=True)
        raise
    done.set()
    return follower


def apply_retention(ctx: AgentContext, *, now: datetime) -> list[catalog.Entry]:
    cfg = ctx.config.snapshots
    max_age = timedelta(days=cfg.max_age_days) if cfg.max_age_days is not None else None
    doomed = catalog.expired(catalog.entries(ctx.store), keep=cfg.keep, max_age=max_age, now=now)
    for entry in doomed:
        entry.path.unlink(missing_ok=True)
        catalog.remove(ctx.store, entry.name)
        log.info("snapshot removed by retention", name=entry.name, taken=entry.taken.isoformat())
    if doomed:
        fsync_dir(ctx.config.snapshot_dir)
    return doomed


async def take(
    ctx: AgentContext,
    *,
    trigger: str,
    free_bytes: FreeBytes = disk_free,
    now: datetime | None = None,
    lock_wait: float | None = None,
) -> Outcome:
    """Take, verify, record and report one snapshot. Never raises for snapshot problems.

    Every outcome becomes an event (``snapshot.succeeded``/``failed``/``refused``) and updates
    ``site.snapshot``; the caller decides about retries. The caller has run :func:`catalog.setup`.
    """
    directory = ctx.config.snapshot_dir
    started = now or datetime.now(UTC)
    try:
        async with locked(directory, wait=lock_wait):
            entry = await _take_locked(ctx, trigger=trigger, directory=directory, free_bytes=free_bytes, now=started)
            # One transaction (one fsync): the row, retention, counters, status and event land together.
            with ctx.store.transaction():
                catalog.add(ctx.store, entry)
                removed = apply_retention(ctx, now=started)
                _succeeded(ctx, entry, removed=removed, trigger=trigger, at=started)
    except Refused as exc:
        return _fail(ctx, kind="refused", message=str(exc), trigger=trigger, at=started)
    except (backends.BackendError, verify.VerificationFailed, Busy) as exc:
        return _fail(ctx, kind="failed", message=str(exc), trigger=trigger, at=started)
    except OSError as exc:  # ENOSPC mid-write, permissions, a vanished directory
        return _fail(
            ctx,
            kind="failed",
            message=f"{exc.strerror or exc}: {exc.filename or directory}",
            trigger=trigger,
            at=started,
        )
    metrics.SNAPSHOTS.labels("succeeded").inc()
    ctx.report_now.set()
    return Outcome(ok=True, kind="succeeded", message=f"{entry.name} verified", entry=entry)


def _succeeded(
    ctx: AgentContext, entry: catalog.Entry, *, removed: list[catalog.Entry], trigger: str, at: datetime
) -> None:
    status.record_success(ctx.store, at=at)
    status.publish(ctx.store, ctx.config.snapshots)
    ctx.emit(
        "snapshot.succeeded",
        f"etcd snapshot {entry.name} taken and verified (revision {entry.revision}, {_human(entry.file_size)})",
        data={
            "name": entry.name,
            "trigger": trigger,
            "backend": entry.backend,
            "revision": entry.revision,
            "keys": entry.total_keys,
            "size_bytes": entry.size,
            "file_bytes": entry.file_size,
            "sha256": entry.sha256,
            "duration_seconds": round(entry.duration, 3),
            "removed": [e.name for e in removed],
        },
    )


def _fail(ctx: AgentContext, *, kind: str, message: str, trigger: str, at: datetime) -> Outcome:
    severity = protocol.Severity.WARNING if kind == "refused" else protocol.Severity.ERROR
    with ctx.store.transaction():
        consecutive = status.record_failure(ctx.store, reason=message, at=at)
        status.publish(ctx.store, ctx.config.snapshots)
        ctx.emit(
            f"snapshot.{kind}",
            f"etcd snapshot {kind}: {message}",
            severity=severity,
            data={"trigger": trigger, "reason": message[:500], "consecutive_failures": consecutive},
        )
    metrics.SNAPSHOTS.labels(kind).inc()
    ctx.report_now.set()
    return Outcome(ok=False, kind=kind, message=message)


async def reconcile(ctx: AgentContext, *, lock_wait: float | None = None) -> None:
    """Settle the directory and the catalog after a crash or manual meddling (under the lock)."""
    catalog.setup(ctx.store)
    directory = ctx.config.snapshot_dir
    async with locked(directory, wait=lock_wait):
        for path in directory.iterdir():
            if path.name.endswith(".part") or path.name.startswith((".verify-", ".k3s-")):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                log.info("removed leftover of an interrupted snapshot", path=str(path))
        known = {e.name: e for e in catalog.entries(ctx.store)}
        for entry in known.values():
            if not entry.path.is_file():
                catalog.remove(ctx.store, entry.name)
                log.warning("snapshot file missing; dropped from the catalog", name=entry.name, path=str(entry.path))
        for path in sorted(directory.iterdir()):
            taken = taken_from_name(path.name)
            if taken is None or path.name in known or not path.is_file():
                continue
            await _adopt(ctx, path, taken)


async def _adopt(ctx: AgentContext, path: Path, taken: datetime) -> None:
    cfg = ctx.config.snapshots
    try:
        etcd_status, digest = await verify.verify_stored(
            path, etcdutl=_etcdutl(ctx), timeout=cfg.timeout_seconds, expected_sha256=None
        )
    except verify.VerificationFailed as exc:
        log.warning("unrecorded snapshot file fails verification; left in place", path=str(path), error=str(exc))
        return
    catalog.add(
        ctx.store,
        _verified_entry(
            name=path.name, path=path, taken=taken, duration=0.0, backend="unknown", trigger="adopted",
            compressed=path.name.endswith(verify.ZST_SUFFIX), etcd_status=etcd_status, digest=digest,
        ),
    )
    log.info("adopted a verified snapshot file the catalog did not know", name=path.name)
