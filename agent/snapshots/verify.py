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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

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


def _check_trailer(body_hash: Any, trailer: bytes, size: int) -> None:
    if size < TRAILER + 4096:
        raise VerificationFailed(f"snapshot is truncated ({size} bytes)")
    if body_hash.digest() != trailer:
        raise VerificationFailed("sha256 trailer mismatch: the snapshot is corrupted or truncated")


def digest_raw(path: Path, *, compress_to: Path | None = None, level: int = 3) -> Digest:
    """Hash ``path`` (checking its trailer) and optionally write a fsynced zstd copy to ``compress_to``.

    Runs in a worker thread; hashlib and zstd release the GIL on large buffers.
    """
    body = hashlib.sha256()
    whole = hashlib.sha256()
    out_hash = hashlib.sha256()
    size = path.stat().st_size
    remaining_body = size - TRAILER
    trailer = b""
    compressor = zstandard.ZstdCompressor(level=level).compressobj() if compress_to is not None else None
    out = open(compress_to, "xb") if compress_to is not None else None  # noqa: SIM115 - closed below
    out_size = 0
    try:
        with open(path, "rb") as src:
            while chunk := src.read(CHUNK):
                whole.update(chunk)
                if remaining_body > 0:
                    part = chunk[:remaining_body]
                    body.update(part)
                    remaining_body -= len(part)
                    trailer += chunk[len(part) :]
                else:
                    trailer += chunk
                if compressor is not None and out is not None:
                    data = compressor.compress(chunk)
                    out.write(data)
                    out_hash.update(data)
                    out_size += len(data)
        if compressor is not None and out is not None:
            data = compressor.flush()
            out.write(data)
            out_hash.update(data)
            out_size += len(data)
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    _check_trailer(body, trailer[-TRAILER:], size)
    raw_sha = whole.hexdigest()
    if compress_to is None:
        return Digest(size=size, sha256=raw_sha, file_size=size, file_sha256=raw_sha)
    return Digest(size=size, sha256=raw_sha, file_size=out_size, file_sha256=out_hash.hexdigest())


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
    path: Path, *, etcdutl: Path, timeout: float, compress_to: Path | None = None, level: int = 3
) -> tuple[Status, Digest]:
    """Both checks at once on a raw snapshot; compress while hashing if asked."""
    digest_task = asyncio.create_task(asyncio.to_thread(digest_raw, path, compress_to=compress_to, level=level))
    try:
        status = await etcd_status(etcdutl, path, timeout=timeout)
    except BaseException:
        await asyncio.gather(digest_task, return_exceptions=True)
        raise
    digest = await digest_task
    if status.total_size > digest.size:
        raise VerificationFailed(f"etcdutl reports {status.total_size} bytes but the file has {digest.size}")
    return status, digest


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
