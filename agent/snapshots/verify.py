"""Is this file a snapshot etcd will restore? Checked two independent ways.

1. ``etcdutl snapshot status -w json``: opens the bbolt database and walks it, giving the
   revision, key count and etcd's own hash. A file it cannot read is unusable.
2. The sha256 trailer. A snapshot streamed from etcd ends with the sha256 of everything before
   it; ``etcdutl snapshot restore`` checks it and refuses a mismatch unless told
   ``--skip-hash-check``. Checking it here catches a flipped byte in a free page that the
   bbolt walk never reads, and any truncation.

The same read pass computes the whole file's sha256 (the catalog's fingerprint) and, when
configured, feeds the zstd compressor, so the data is read once; ``etcdutl`` runs alongside
it in its own process. A snapshot that fails either check is a failure, never a success.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard

from agent.snapshots import procs

CHUNK = 1 << 20
TRAILER = 32  # sha256 digest appended by etcd's snapshot stream
ZST_SUFFIX = ".zst"


class VerificationFailed(Exception):
    """The snapshot is unusable; one line saying why."""


@dataclass(frozen=True)
class Digest:
    size: int  # raw snapshot bytes
    sha256: str  # of the raw snapshot (what a restore reads)
    file_size: int  # bytes on disk (compressed or not)
    file_sha256: str  # of the file as stored


@dataclass(frozen=True)
class Status:
    revision: int
    total_keys: int
    etcd_hash: int
    total_size: int


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Digester:
    """Streaming sha256 + trailer check (+ zstd), for data whose total length is not known yet.

    The last 32 bytes seen so far are held back from the hash: when the stream ends, the hash
    state *is* sha256(body), compared with the held-back trailer, and then continues over the
    trailer to give sha256(whole file). One pass, one hash.
    """

    def __init__(self, *, compress_to: Path | None, level: int) -> None:
        self.hasher = hashlib.sha256()
        self.tail = b""
        self.size = 0
        self.compress_to = compress_to
        self.out: BinaryIO | None = open(compress_to, "xb") if compress_to is not None else None  # noqa: SIM115
        self.compressor = zstandard.ZstdCompressor(level=level).compressobj() if compress_to is not None else None
        self.out_hash = hashlib.sha256()
        self.out_size = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if len(chunk) >= TRAILER:
            self.hasher.update(self.tail)
            self.hasher.update(memoryview(chunk)[:-TRAILER])
            self.tail = chunk[-TRAILER:]
        else:
            data = self.tail + chunk
            self.hasher.update(data[:-TRAILER])
            self.tail = data[-TRAILER:]
        if self.compressor is not None:
            self._write(self.compressor.compress(chunk))

    def _write(self, data: bytes) -> None:
        assert self.out is not None
        self.out.write(data)
        self.out_hash.update(data)
        self.out_size += len(data)

    def discard(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None
        if self.compress_to is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.compress_to)

    def finish(self) -> Digest:
        try:
            if self.size < TRAILER + 4096:
                raise VerificationFailed(f"snapshot is truncated ({self.size} bytes)")
            if self.hasher.digest() != self.tail:
                raise VerificationFailed("sha256 trailer mismatch: the snapshot is corrupted or truncated")
            if self.compressor is not None and self.out is not None:
                self._write(self.compressor.flush())
                self.out.flush()
                os.fsync(self.out.fileno())
                self.out.close()
                self.out = None
        except BaseException:
            self.discard()
            raise
        self.hasher.update(self.tail)
        raw_sha = self.hasher.hexdigest()
        if self.compressor is None:
            return Digest(size=self.size, sha256=raw_sha, file_size=self.size, file_sha256=raw_sha)
        return Digest(size=self.size, sha256=raw_sha, file_size=self.out_size, file_sha256=self.out_hash.hexdigest())


def digest_raw(path: Path, *, compress_to: Path | None = None, level: int = 3) -> Digest:
    """Hash ``path`` (checking its trailer) and optionally write a fsynced zstd copy to ``compress_to``.

    Runs in a worker thread; hashlib and zstd release the GIL on large buffers.
    """
    digester = _Digester(compress_to=compress_to, level=level)
    try:
        with open(path, "rb") as src:
            while chunk := src.read(CHUNK):
                digester.feed(chunk)
    except BaseException:
        digester.discard()
        raise
    return digester.finish()


def follow(
    growing: Path, *, final: Path, done: threading.Event, compress_to: Path | None = None, level: int = 3
) -> Digest | None:
    """Digest a file *while* another process writes it, so verification overlaps the download.

    ``etcdctl snapshot save DEST`` streams into ``DEST.part``, fsyncs and renames it to ``DEST``.
    We open ``DEST.part`` as soon as it appears and read what has been appended; once ``done`` is
    set (the writer exited) we drain the open descriptor, which still names the same inode after
    the rename. The result counts only if that inode is ``final`` and we read exactly its size;
    otherwise (the writer did something unexpected) this returns None and the caller digests
    ``final`` afterwards. A torn read can only make the trailer check fail, never pass.
    """
    fd = None
    while fd is None:
        try:
            fd = os.open(growing, os.O_RDONLY)
        except FileNotFoundError:
            if done.is_set():
                return None
            time.sleep(0.01)
    digester = _Digester(compress_to=compress_to, level=level)
    try:
        with os.fdopen(fd, "rb", buffering=0) as src:
            while True:
                finished = done.is_set()  # read *after* checking, so nothing written before "done" is missed
                chunk = src.read(CHUNK)
                if chunk:
                    digester.feed(chunk)
                elif finished:
                    break
                else:
                    time.sleep(0.01)
            ours = os.fstat(src.fileno())
        try:
            theirs = os.stat(final)
        except FileNotFoundError:
            digester.discard()
            return None
        if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino) or theirs.st_size != digester.size:
            digester.discard()
            return None
    except BaseException:
        digester.discard()
        raise
    return digester.finish()


async def etcd_status(etcdutl: Path, path: Path, *, timeout: float) -> Status:
    try:
        result = await procs.run([etcdutl, "snapshot", "status", "-w", "json", path], timeout=timeout)
    except procs.CommandFailed as exc:
        raise VerificationFailed(f"etcdutl cannot read the snapshot: {exc}") from None
    try:
        doc = json.loads(result.stdout)
        status = Status(
            revision=int(doc["revision"]),
            total_keys=int(doc["totalKey"]),
            etcd_hash=int(doc["hash"]),
            total_size=int(doc["totalSize"]),
        )
    except (ValueError, KeyError, TypeError):
        raise VerificationFailed(f"etcdutl snapshot status: unexpected output {result.stdout[:200]!r}") from None
    if status.total_size <= 0 or status.revision < 0:
        raise VerificationFailed(f"etcdutl reports an impossible snapshot: {result.stdout[:200]!r}")
    return status


async def verify_raw(
    path: Path,
    *,
    etcdutl: Path,
    timeout: float,
    compress_to: Path | None = None,
    level: int = 3,
    digest: Digest | None = None,
    status: Awaitable[Status] | None = None,
) -> tuple[Status, Digest]:
    """Both checks at once on a raw snapshot; compress while hashing if asked.

    ``digest``: already computed while the file was written (:func:`follow`); then only
    ``etcdutl`` remains to run. ``status``: :func:`etcd_status` of ``path``, already started.
    """
    running = status if status is not None else etcd_status(etcdutl, path, timeout=timeout)
    if digest is not None:
        status_ = await running
    else:
        digest_task = asyncio.create_task(asyncio.to_thread(digest_raw, path, compress_to=compress_to, level=level))
        try:
            status_ = await running
        except BaseException:
            await asyncio.gather(digest_task, return_exceptions=True)
            raise
        digest = await digest_task
    if status_.total_size > digest.size:
        raise VerificationFailed(f"etcdutl reports {status_.total_size} bytes but the file has {digest.size}")
    return status_, digest


def _fresh_name(directory: Path) -> Path:
    """A unique, not yet existing path in ``directory`` (``.verify-*`` leftovers are swept at start)."""
    fd, name = tempfile.mkstemp(prefix=".verify-", suffix=".db", dir=directory)
    os.close(fd)
    os.unlink(name)
    return Path(name)


class _HashingReader:
    """A read-only file wrapper hashing what passes through (the compressed bytes as stored)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data


def extract(path: Path, dest: Path) -> tuple[int, str]:
    """Decompress a ``.zst`` snapshot to ``dest`` (fsynced); return size and sha256 of the *stored* file."""
    with open(path, "rb") as src, open(dest, "xb") as out:
        hashing = _HashingReader(src)
        reader = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], hashing), read_across_frames=True)
        try:
            while chunk := reader.read(CHUNK):
                out.write(chunk)
            while hashing.read(CHUNK):  # trailing bytes after the frame still count for the file hash
                pass
        except zstandard.ZstdError as exc:
            raise VerificationFailed(f"{path.name}: corrupt zstd stream: {exc}") from None
        out.flush()
        os.fsync(out.fileno())
    return hashing.size, hashing.hash.hexdigest()


async def verify_stored(
    path: Path, *, etcdutl: Path, timeout: float, expected_sha256: str | None, keep_raw: Path | None = None
) -> tuple[Status, Digest]:
    """Re-check a stored snapshot (compressed or not) against its catalog fingerprint.

    A compressed file is decompressed to a temporary file next to ``keep_raw`` (or in the
    snapshot directory), which is removed unless ``keep_raw`` asks to keep it there.
    """
    if not await asyncio.to_thread(path.is_file):
        raise VerificationFailed(f"{path}: no such snapshot file")
    if not path.name.endswith(ZST_SUFFIX):
        status, digest = await verify_raw(path, etcdutl=etcdutl, timeout=timeout)
    else:
        tmp = _fresh_name(keep_raw.parent if keep_raw is not None else path.parent)
        try:
            file_size, file_sha256 = await asyncio.to_thread(extract, path, tmp)
            status, raw = await verify_raw(tmp, etcdutl=etcdutl, timeout=timeout)
            digest = Digest(size=raw.size, sha256=raw.sha256, file_size=file_size, file_sha256=file_sha256)
            if keep_raw is not None:
                os.replace(tmp, keep_raw)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    if expected_sha256 is not None and digest.sha256 != expected_sha256:
        raise VerificationFailed(f"sha256 {digest.sha256[:16]}… does not match the catalog's {expected_sha256[:16]}…")
    return status, digest
