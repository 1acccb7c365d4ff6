"""Verify a bundle and stage its payload atomically into the bundle store.

Public surface (stable):

- ``verify_and_stage(path, *, root, store_dir, min_release=0, min_created=None, now=None,
  kubernetes_version=None, arch=None, limits=Limits()) -> StagedBundle``
- ``verify_only(path, *, root, ...same checks...) -> Verified``: every check, every byte hashed,
  nothing written (``edgefleet-bundle verify``, the hub).
- ``read_envelope(path, *, limits) -> (envelope bytes, root-chain links, compression)``: no trust
  decisions; used by ``inspect`` and ``sign``.
- ``cleanup_stale(store_dir)``: remove ``.staging-*``/``.trash-*`` left by a crash (call at startup,
  when no verification is running).
- ``load_staged(path) -> Manifest``: the manifest of an already staged bundle (after a restart);
  ``recheck_staged(path)``: re-hash its payload against the manifest (tamper/disk-rot check).
- ``StagedBundle``: ``path`` (``<store>/<bundle_id>``: ``manifest.json`` = the signed manifest bytes,
  ``manifest.dsse.json`` = the envelope as shipped, ``root-chain.json`` if any, ``payload/<files>``),
  ``payload_dir``, ``manifest``, ``bundle_id`` (sha256 hex of the envelope bytes), ``root`` (the
  effective trust root after any rotation in the bundle), ``root_chain`` (the bundle's links, for
  ``trust.persist_rotation``), ``root_rotated``, ``signers``.

Verification order (docs/bundle-format.md), nothing skipped, nothing reordered:

1. container compression sniffed from the first bytes (zstd or plain ustar; anything else refused);
2. the first member must be the envelope, its size capped before it is read;
3. the optional root chain is walked from the site's root (each link: threshold of old AND new
   keys; length capped) giving the effective root, which must not have expired;
4. signatures against the effective root: the role is the manifest's channel (release or
   development) and the threshold must be met;
5. only now is the manifest parsed (schema), then: expiry, compatibility (Kubernetes version,
   architecture), anti-rollback (release >= min_release, created >= min_created), the declared
   compression equals the container's, the manifest's sizes are within the caps, and the store
   has room;
6. payload members are streamed (``bundles.streaming``: hashed and written from the same
   buffers, O_DIRECT where the filesystem allows), each into a fresh private staging
   directory (``<store>/.staging-*``, mode 0700) with byte caps from the signed manifest; any
   unlisted, duplicate, unsafe or mis-sized member aborts immediately;
7. after the end marker: every listed file seen, only zero padding follows;
8. files and directories fsynced, then one atomic ``rename`` into ``<store>/<bundle_id>``.

On any failure the staging directory is removed and the store is exactly as before. A crash
mid-way leaves only a ``.staging-*`` directory, which ``cleanup_stale`` removes; the agent must not
treat anything but ``<store>/<64 hex>`` as a bundle.

The anti-rollback high-water (release, created) is persisted by the caller after it commits to
the bundle; this module only enforces the minimums it is given.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from bundles import container, delta, dsse, errors, split, streaming, trust
from bundles.manifest import PAYLOAD_TYPE, Manifest, check_path, loads_strict, now_utc, parse_manifest
from bundles.trust import TrustRoot

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Hard caps, independent of what any signer says."""

    max_envelope_bytes: int = 8 * MiB
    max_chain_bytes: int = 2 * MiB
    max_file_bytes: int = 16 * GiB
    max_total_bytes: int = 64 * GiB
    max_files: int = 100_000
    max_dir_entries: int = 100_000
    max_trailing_bytes: int = 64 * 1024
    min_free_bytes: int = 64 * MiB  # left free on the store's filesystem after staging


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    envelope: bytes
    bundle_id: str
    root: TrustRoot
    root_chain: tuple[bytes, ...]
    root_rotated: bool
    signers: frozenset[str]
    compression: str


@dataclass(frozen=True)
class StagedBundle(Verified):
    path: Path = field(default=Path())

    @property
    def payload_dir(self) -> Path:
        return self.path / "payload"


STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


# --- public entry points ------------------------------------------------------------------------


def verify_only(
    path: Path | str,
    *,
    root: TrustRoot,
    min_release: int = 0,
    min_created: datetime | None = None,
    now: datetime | None = None,
    kubernetes_version: str | None = None,
    arch: str | None = None,
    limits: Limits | None = None,
) -> Verified:
    checks = _Checks(
        root=root, min_release=min_release, min_created=min_created, now=now,
        kubernetes_version=kubernetes_version, arch=arch, limits=limits or Limits(),
    )
    return _run(Path(path), checks=checks, sink=None)


def verify_and_stage(
    path: Path | str,
    *,
    root: TrustRoot,
    store_dir: Path | str,
    min_release: int = 0,
    min_created: datetime | None = None,
    now: datetime | None = None,
    kubernetes_version: str | None = None,
    arch: str | None = None,
    limits: Limits | None = None,
) -> StagedBundle:
    checks = _Checks(
        root=root, min_release=min_release, min_created=min_created, now=now,
        kubernetes_version=kubernetes_version, arch=arch, limits=limits or Limits(),
    )
    store = Path(store_dir)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.StoreError(f"cannot create bundle store {store}: {exc.strerror}") from None
    sink = _Stager(store)
    try:
        verified = _run(Path(path), checks=checks, sink=sink)
        if verified.manifest.base is not None and sink.tmp is not None:  # a delta: link its base's blobs in
            delta.complete(sink.tmp, store, manifest=verified.manifest, rehash=False)
        final = sink.commit(verified)
    except BaseException:
        sink.abort()
        raise
    return StagedBundle(**{f: getattr(verified, f) for f in Verified.__dataclass_fields__}, path=final)


def read_envelope(path: Path | str, *, limits: Limits | None = None) -> tuple[bytes, tuple[bytes, ...], str]:
    """The raw envelope, chain links and compression, with container checks but no trust decisions."""
    lim = limits or Limits()
    with _open(Path(path)) as raw:
        compression = container.detect_compression(_peek(raw))
        stream = container.CappedStream(raw, compression, limit=_preamble_limit(lim))
        env_bytes, chain, _pending = _read_preamble(stream, lim)
    return env_bytes, chain, compression


def load_staged(path: Path | str) -> Manifest:
    """The manifest of a bundle staged earlier (e.g. after an agent restart), without re-verifying.

    Trusted because only a fully verified bundle is ever renamed into the store; the check that
    the directory name is the sha256 of its envelope and that ``manifest.json`` is the envelope's
    payload catches a wrong path or a partially restored backup, not a root-level attacker.
    """
    base = Path(path)
    try:
        env_bytes = (base / container.ENVELOPE_NAME).read_bytes()
        manifest_bytes = (base / "manifest.json").read_bytes()
    except OSError as exc:
        raise errors.MissingFile(f"staged bundle {base} is incomplete: {exc.strerror}") from None
    if hashlib.sha256(env_bytes).hexdigest() != base.name:
        raise errors.DigestMismatch(f"{base} is not a staged bundle: its name is not the envelope's sha256")
    try:
        envelope = dsse.parse(env_bytes, max_bytes=Limits().max_envelope_bytes)
    except dsse.EnvelopeError as exc:
        raise errors.EnvelopeInvalid(str(exc)) from None
    if envelope.payload != manifest_bytes:
        raise errors.DigestMismatch(f"{base}/manifest.json differs from the signed manifest")
    return parse_manifest(manifest_bytes)


def recheck_staged(path: Path | str) -> Manifest:
    """Re-hash every payload file of a staged bundle against its manifest (disk rot, tampering)."""
    base = Path(path)
    manifest = load_staged(base)
    for entry in manifest.files:
        h = hashlib.sha256()
        size = 0
        try:
            with open(base / "payload" / entry.path, "rb") as fh:
                while chunk := fh.read(container.CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise errors.MissingFile(f"staged file {entry.path}: {exc.strerror}") from None
        if size != entry.size or h.hexdigest() != entry.sha256:
            raise errors.DigestMismatch(f"staged file {entry.path} no longer matches the manifest")
    return manifest


def cleanup_stale(store_dir: Path | str) -> list[Path]:
    removed = []
    store = Path(store_dir)
    if not store.is_dir():
        return []
    for child in store.iterdir():
        if child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


# --- the pipeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checks:
    root: TrustRoot
    min_release: int
    min_created: datetime | None
    now: datetime | None
    kubernetes_version: str | None
    arch: str | None
    limits: Limits


def _open(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
    except OSError as exc:
        raise errors.Unreadable(f"cannot read bundle {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise errors.Unreadable(f"{path} is not a regular file")
    if st.st_size < 4 << 20 and split.is_index(os.pread(fd, 64, 0)):  # a split bundle (docs/images.md)
        os.close(fd)
        return split.open_parts(path)  # type: ignore[return-value]  # a read-only sequential BinaryIO
    return os.fdopen(fd, "rb", buffering=0)


def _peek(raw: BinaryIO) -> bytes:
    head = raw.read(container.BLOCK) or b""
    raw.seek(0)
    return head


def _preamble_limit(lim: Limits) -> int:
    return 3 * container.BLOCK + lim.max_envelope_bytes + lim.max_chain_bytes + 2 * container.BLOCK


def _read_member(stream: container.CappedStream, hdr: container.Header, *, what: str) -> bytes:
    data = stream.read_exact(hdr.size, what=what)
    container.skip_padding(stream, hdr.size)
    return data


def _read_preamble(
    stream: container.CappedStream, lim: Limits
) -> tuple[bytes, tuple[bytes, ...], container.Header | None]:
    hdr = container.next_header(stream)
    if hdr is None:
        raise errors.EnvelopeInvalid("archive is empty: no manifest envelope")
    if hdr.name != container.ENVELOPE_NAME or not hdr.is_file:
        raise errors.EnvelopeInvalid(f"first member is {hdr.name[:80]!r}, not {container.ENVELOPE_NAME}")
    if hdr.size > lim.max_envelope_bytes:
        raise errors.EnvelopeTooLarge(f"envelope is {hdr.size} bytes, over the {lim.max_envelope_bytes}-byte cap")
    env_bytes = _read_member(stream, hdr, what="the manifest envelope")
    chain: tuple[bytes, ...] = ()
    pending = container.next_header(stream)
    if pending is not None and pending.name == container.CHAIN_NAME and pending.is_file:
        if pending.size > lim.max_chain_bytes:
            raise errors.ChainTooLong(f"root chain is {pending.size} bytes, over the {lim.max_chain_bytes}-byte cap")
        chain = trust.parse_chain(_read_member(stream, pending, what="the root chain"))
        pending = container.next_header(stream)
    return env_bytes, chain, pending


def _channel_hint(payload: bytes) -> str:
    """The channel the (not yet trusted) manifest claims: it only selects which role must sign."""
    try:
        doc = loads_strict(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "release"
    channel = doc.get("channel") if isinstance(doc, dict) else None
    return "development" if channel == "development" else "release"


def check_manifest_policy(manifest: Manifest, checks: _Checks) -> None:
    now = checks.now or now_utc()
    if manifest.expires <= now:
        raise errors.Expired(f"bundle {manifest.label()} expired at {manifest.expires.isoformat()}")
    if checks.kubernetes_version is not None and not manifest.compat.kubernetes.contains(checks.kubernetes_version):
        k = manifest.compat.kubernetes
        raise errors.Incompatible(
            f"bundle {manifest.label()} supports Kubernetes {k.min}-{k.max}, the site runs {checks.kubernetes_version}"
        )
    if checks.arch is not None and checks.arch not in manifest.compat.architectures:
        raise errors.Incompatible(
            f"bundle {manifest.label()} supports {', '.join(manifest.compat.architectures)}, not {checks.arch}"
        )
    if manifest.release < checks.min_release:
        raise errors.ReleaseRollback(
            f"bundle release {manifest.release} is below this site's high-water release {checks.min_release}"
        )
    if checks.min_created is not None and manifest.created < checks.min_created:
        raise errors.CreatedRollback(
            f"bundle created {manifest.created.isoformat()} is older than the newest bundle seen "
            f"({checks.min_created.isoformat()})"
        )


def _run(path: Path, *, checks: _Checks, sink: _Stager | None) -> Verified:
    lim = checks.limits
    with _open(path) as raw:
        compression = container.detect_compression(_peek(raw))
        stream = container.CappedStream(raw, compression, limit=_preamble_limit(lim))
        env_bytes, chain, pending = _read_preamble(stream, lim)

        try:
            envelope = dsse.parse(env_bytes, max_bytes=lim.max_envelope_bytes)
        except dsse.EnvelopeError as exc:
            raise errors.EnvelopeInvalid(str(exc)) from None
        if envelope.payload_type != PAYLOAD_TYPE:
            raise errors.EnvelopeInvalid(f"envelope payload type is {envelope.payload_type[:80]!r}, not {PAYLOAD_TYPE}")
        root = trust.verify_chain(checks.root, chain, now=checks.now)
        role = _channel_hint(envelope.payload)
        signers = trust.check_threshold(envelope, root, role, what="bundle manifest")  # type: ignore[arg-type]
        manifest = parse_manifest(envelope.payload)
        if manifest.channel != role:  # unreachable unless two JSON readers disagree; belt and braces
            raise errors.SignatureInvalid("manifest channel does not match the signing role")
        check_manifest_policy(manifest, checks)
        if sink is not None and manifest.base is not None:
            delta.find_base(manifest, sink.store)  # a delta needs its base here (errors.BaseMissing)
        if manifest.compression != compression:
            raise errors.WrongCompression(
                f"manifest declares {manifest.compression} but the container is {compression}"
            )
        _check_caps(manifest, lim)
        if sink is not None:
            sink.begin(manifest, lim)
        stream.limit = stream.total + _payload_allowance(manifest, lim)
        _stream_payload(stream, manifest, pending, sink)
        stream.drain_trailing(max_bytes=lim.max_trailing_bytes)
        if sink is not None:
            sink.write_meta(env_bytes, envelope.payload, chain)

    return Verified(
        manifest=manifest,
        envelope=env_bytes,
        bundle_id=hashlib.sha256(env_bytes).hexdigest(),
        root=root,
        root_chain=chain,
        root_rotated=root.version != checks.root.version,
        signers=frozenset(signers),
        compression=compression,
    )


def _check_caps(manifest: Manifest, lim: Limits) -> None:
    if len(manifest.files) > lim.max_files:
        raise errors.CapExceeded(f"manifest lists {len(manifest.files)} files, the cap is {lim.max_files}")
    for f in manifest.files:
        if f.size > lim.max_file_bytes:
            raise errors.CapExceeded(f"file {f.path} is {f.size} bytes, over the per-file cap {lim.max_file_bytes}")
    if manifest.payload_bytes > lim.max_total_bytes:
        raise errors.CapExceeded(
            f"payload is {manifest.payload_bytes} bytes, over the total cap {lim.max_total_bytes}"
        )


def _payload_allowance(manifest: Manifest, lim: Limits) -> int:
    """Decompressed bytes the rest of the archive may take: exactly what the manifest accounts for."""
    dirs = _ancestor_dirs(manifest)
    files = sum(container.BLOCK + f.size + container.padding(f.size) for f in manifest.files)
    return files + container.BLOCK * (len(dirs) + 1) + 2 * container.BLOCK + lim.max_trailing_bytes


def _ancestor_dirs(manifest: Manifest) -> set[str]:
    dirs = {""}
    for f in manifest.files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    return dirs


def _member_path(name: str) -> str:
    """Map a tar member name to a payload-relative path, refusing anything unsafe."""
    if name.startswith("/") or name.startswith("\\"):
        raise errors.UnsafePath(f"member {name[:80]!r} has an absolute path")
    parts = name.split("/")
    if ".." in parts or any("\\" in p for p in parts):
        raise errors.UnsafePath(f"member {name[:80]!r} contains '..' or a backslash")
    if name in (container.ENVELOPE_NAME, container.CHAIN_NAME):
        raise errors.DuplicateMember(f"member {name} appears twice")
    if name.rstrip("/") == container.PAYLOAD_PREFIX.rstrip("/"):
        return ""
    if not name.startswith(container.PAYLOAD_PREFIX):
        raise errors.UnlistedFile(f"member {name[:80]!r} is outside payload/ and not in the manifest")
    rel = name[len(container.PAYLOAD_PREFIX) :].rstrip("/")
    try:
        return check_path(rel)
    except ValueError as exc:
        raise errors.UnsafePath(f"member {name[:80]!r}: {exc}") from None


def _stream_payload(
    stream: container.CappedStream,
    manifest: Manifest,
    pending: container.Header | None,
    sink: _Stager | None,
) -> None:
    entries = {f.path: f for f in manifest.files}
    dirs = _ancestor_dirs(manifest)
    seen: set[str] = set()
    seen_dirs: set[str] = set()
    pipeline = streaming.Pipeline()
    try:
        hdr = pending
        while hdr is not None:
            if not (hdr.is_file or hdr.is_dir):
                raise errors.UnsafeMemberType(f"member {hdr.name[:80]!r} is a {hdr.type_name}; only files and dirs")
            rel = _member_path(hdr.name)
            if hdr.is_dir:
                if hdr.size:
                    raise errors.Garbled(f"directory member {hdr.name[:80]!r} has a size")
                if rel not in dirs:
                    raise errors.UnlistedFile(f"directory {hdr.name[:80]!r} holds no listed file")
                if rel in seen_dirs:
                    raise errors.DuplicateMember(f"directory {hdr.name[:80]!r} appears twice")
                seen_dirs.add(rel)
            else:
                entry = entries.get(rel)
                if entry is None:
                    raise errors.UnlistedFile(f"member {hdr.name[:80]!r} is not listed in the manifest")
                if rel in seen:
                    raise errors.DuplicateMember(f"member {hdr.name[:80]!r} appears twice")
                seen.add(rel)
                if hdr.size != entry.size:
                    beyond = "beyond" if hdr.size > entry.size else "short of"
                    raise errors.SizeMismatch(
                        f"member {rel} is {hdr.size} bytes, {beyond} the manifest's {entry.size}"
                    )
                write, close = sink.open_file(rel, entry.mode) if sink is not None else (None, None)
                check = functools.partial(_check_digest, rel=rel, expected=entry.sha256)
                pipeline.member(stream, hdr.size, check=check, sink=write, close=close)
                container.skip_padding(stream, hdr.size)
            hdr = container.next_header(stream)
        pipeline.finish()
    except BaseException:
        pipeline.finish()  # a digest or write error earlier in the stream is the one to report
        raise
    finally:
        pipeline.stop()
    missing = sorted(set(entries) - seen)
    if missing:
        raise errors.MissingFile(f"{len(missing)} listed file(s) missing from the archive, e.g. {missing[0]}")


def _check_digest(digest: str, *, rel: str, expected: str) -> None:
    if digest != expected:
        raise errors.DigestMismatch(f"file {rel}: sha256 {digest[:16]}... does not match the manifest")


class _Stager:
    """Writes into ``<store>/.staging-XXXX`` (0700) and renames it into place on commit."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.tmp: Path | None = None
        self._flusher: ThreadPoolExecutor | None = None
        self._flushes: list[Future[None]] = []

    def begin(self, manifest: Manifest, lim: Limits) -> None:
        try:
            st = os.statvfs(self.store)
        except OSError as exc:
            raise errors.StoreError(f"cannot stat bundle store {self.store}: {exc.strerror}") from None
        free = st.f_bavail * st.f_frsize
        need = manifest.payload_bytes + lim.min_free_bytes
        if free < need:
            raise errors.StoreError(
                f"bundle store {self.store} has {free} bytes free, staging needs {need} (payload + reserve)"
            )
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.store))
            (self.tmp / "payload").mkdir(mode=0o700)
        except OSError as exc:
            raise errors.StoreError(f"cannot create staging directory in {self.store}: {exc.strerror}") from None

    def open_file(self, rel: str, mode: int) -> tuple[streaming.Sink, Callable[[], None]]:
        """Create ``payload/<rel>``; the writer and the closer run on the pipeline's write lane.

        The closer hands the file to the flusher thread, whose fsync overlaps the next files'
        streaming. Every file must be durable before the rename; written ``O_DIRECT``
        (``bundles.streaming``) its fsync is mostly the device-cache flush and the journal.
        """
        assert self.tmp is not None
        target = self.tmp / "payload" / rel
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(target, flags, mode)
        except OSError as exc:
            raise errors.StoreError(f"cannot create {rel} in staging: {exc.strerror}") from None
        staged = streaming.StagedFile(fd)

        def write(view: memoryview) -> None:
            try:
                staged.write(view)
            except OSError as exc:
                raise errors.StoreError(f"writing {rel} to staging failed: {exc.strerror}") from None

        def close() -> None:
            self._flushes.append(self._executor().submit(_fsync_close, fd, str(target)))

        return write, close

    def _executor(self) -> ThreadPoolExecutor:
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-fsync")
        return self._flusher

    def _wait_flushes(self) -> None:
        failures = []
        for fut in self._flushes:
            exc = fut.exception()
            if exc is not None:
                failures.append(exc)
        self._flushes.clear()
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None
        if failures:
            first = failures[0]
            msg = first.message if isinstance(first, errors.BundleError) else str(first)
            raise errors.StoreError(msg)

    def write_meta(self, envelope: bytes, manifest_bytes: bytes, chain: Sequence[bytes]) -> None:
        assert self.tmp is not None
        self._wait_flushes()
        metas = [("manifest.dsse.json", envelope), ("manifest.json", manifest_bytes)]
        if chain:
            metas.append((container.CHAIN_NAME, trust.chain_json(chain)))
        try:
            for name, data in metas:
                fd = os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for d, _subdirs, _files in os.walk(self.tmp, topdown=False):
                _fsync_dir(Path(d))
        except OSError as exc:
            raise errors.StoreError(f"finishing staging failed: {exc.strerror}") from None

    def commit(self, verified: Verified) -> Path:
        assert self.tmp is not None
        final = self.store / verified.bundle_id
        try:
            if final.exists():
                # Same envelope staged before: replace it with the freshly verified copy.
                trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=self.store))
                os.rename(final, trash / "old")
                os.rename(self.tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, final)
            _fsync_dir(self.store)
        except OSError as exc:
            raise errors.StoreError(f"moving the staged bundle into {final} failed: {exc.strerror}") from None
        self.tmp = None
        return final

    def abort(self) -> None:
        with contextlib.suppress(errors.StoreError):  # already failing; staging goes away below
            self._wait_flushes()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _fsync_close(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise errors.StoreError(f"fsync of {path} failed: {exc.strerror}") from None
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
