"""Write and sign bundle files.

Public surface (stable):

- ``file_entry(path, source) -> FileEntry``: size and sha256 of a source file (streamed).
- ``write_bundle(out, *, manifest, sources, keys=(), chain=(), level=3) -> bytes``: write a bundle
  (envelope first, optional root chain, payload in manifest order); returns the envelope bytes.
  Zero keys gives an unsigned bundle that ``sign`` completes later.
- ``sign_bundle(path, *, keys, out=None) -> dsse.Envelope``: add signatures (k-of-n signing on
  separate machines). It re-streams the archive with the new envelope and rechecks every payload
  file against the manifest on the way, so nobody signs a bundle whose payload differs from
  what the manifest says. The original is replaced atomically (or ``out`` is written).
- ``load_manifest(path) -> (Manifest, Envelope, chain, compression)``: for ``inspect``.

All writes go to a temp file next to the target, fsync, rename: a crash never leaves a
half-written bundle under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundles import container, dsse, errors
from bundles.manifest import PAYLOAD_TYPE, FileEntry, Manifest, canonical_json, parse_manifest
from bundles.verify import Limits, _read_member, read_envelope


def file_entry(path: str, source: Path, *, mode: int | None = None) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with open(source, "rb") as fh:
        while chunk := fh.read(container.CHUNK):
            h.update(chunk)
            size += len(chunk)
    if mode is None:
        mode = 0o755 if os.stat(source).st_mode & 0o111 else 0o644
    return FileEntry(path=path, size=size, sha256=h.hexdigest(), mode=mode)


def _atomic_out(out: Path) -> tuple[int, Path]:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise _write_error(out, exc) from None
    return fd, Path(tmp)


def _write_error(out: Path, exc: OSError) -> errors.StoreError:
    """One line naming the output and the file that failed (a source, or the output's directory)."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    return errors.StoreError(f"cannot write {out}: {exc.strerror or exc}{where}")


def _finish(fh: object, tmp: Path, out: Path) -> None:
    os.fsync(fh.fileno())  # type: ignore[attr-defined]
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


def _chain_member(chain: Sequence[bytes]) -> bytes:
    links = [json.loads(x) for x in chain]
    return json.dumps({"links": links}, sort_keys=True, separators=(",", ":")).encode()


def write_bundle(
    out: Path,
    *,
    manifest: Manifest,
    sources: Mapping[str, Path],
    keys: Iterable[Ed25519PrivateKey] = (),
    chain: Sequence[bytes] = (),
    level: int = container.ZSTD_LEVEL,
) -> bytes:
    envelope = dsse.sign(payload_type=PAYLOAD_TYPE, payload=canonical_json(manifest), keys=keys)
    env_bytes = envelope.to_json()
    fd, tmp = _atomic_out(out)
    try:
        with os.fdopen(fd, "wb") as fh:
            w = container.Writer(fh, compression=manifest.compression, level=level)
            w.add_bytes(container.ENVELOPE_NAME, env_bytes)
            if chain:
                w.add_bytes(container.CHAIN_NAME, _chain_member(chain))
            for entry in manifest.files:
                src = sources[entry.path]
                w.add_file(container.PAYLOAD_PREFIX + entry.path, src, size=entry.size, mode=entry.mode)
            w.close()
            _finish(fh, tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(out, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return env_bytes


def load_manifest(path: Path) -> tuple[Manifest, dsse.Envelope, tuple[bytes, ...], str]:
    env_bytes, chain, compression = read_envelope(path)
    try:
        envelope = dsse.parse(env_bytes, max_bytes=Limits().max_envelope_bytes)
    except dsse.EnvelopeError as exc:
        raise errors.EnvelopeInvalid(str(exc)) from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise errors.EnvelopeInvalid(f"envelope payload type is {envelope.payload_type[:80]!r}")
    return parse_manifest(envelope.payload), envelope, chain, compression


def sign_bundle(path: Path, *, keys: Sequence[Ed25519PrivateKey], out: Path | None = None) -> dsse.Envelope:
    manifest, envelope, _chain, compression = load_manifest(path)
    new_env = dsse.sign(payload_type=envelope.payload_type, payload=envelope.payload, keys=keys, existing=envelope)
    target = out or path
    entries = {f.path: f for f in manifest.files}
    fd, tmp = _atomic_out(target)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as fh:
            stream = container.CappedStream(src, compression, limit=1 << 62)
            first = container.next_header(stream)
            assert first is not None
            _read_member(stream, first, what="the manifest envelope")
            w = container.Writer(fh, compression=manifest.compression)
            w.add_bytes(container.ENVELOPE_NAME, new_env.to_json())
            seen: set[str] = set()
            while (hdr := container.next_header(stream)) is not None:
                if hdr.name == container.CHAIN_NAME:
                    w.add_bytes(container.CHAIN_NAME, _read_member(stream, hdr, what="the root chain"))
                    continue
                rel = hdr.name[len(container.PAYLOAD_PREFIX) :]
                entry = entries.get(rel)
                if not hdr.is_file or entry is None or rel in seen or hdr.size != entry.size:
                    raise errors.UnlistedFile(f"refusing to sign: member {hdr.name[:80]!r} does not match the manifest")
                seen.add(rel)
                h = hashlib.sha256()
                w.add_raw(container.make_header(hdr.name, hdr.size, mode=entry.mode))
                left = hdr.size
                while left:
                    chunk = stream.read_exact(min(left, container.CHUNK), what=rel)
                    h.update(chunk)
                    w.add_raw(chunk)
                    left -= len(chunk)
                container.skip_padding(stream, hdr.size)
                w.add_raw(b"\x00" * container.padding(hdr.size))
                if h.hexdigest() != entry.sha256:
                    raise errors.DigestMismatch(f"refusing to sign: {rel} does not match its manifest sha256")
            if set(entries) - seen:
                raise errors.MissingFile(f"refusing to sign: {sorted(set(entries) - seen)[0]} is missing")
            w.close()
            _finish(fh, tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(target, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return new_env


def attach_chain(path: Path, chain: Sequence[bytes]) -> None:
    """Insert (or replace) the root chain member right after the envelope; payload copied verbatim."""
    manifest, _envelope, _old, compression = load_manifest(path)
    fd, tmp = _atomic_out(path)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as fh:
            stream = container.CappedStream(src, compression, limit=1 << 62)
            first = container.next_header(stream)
            assert first is not None
            env_bytes = _read_member(stream, first, what="the manifest envelope")
            w = container.Writer(fh, compression=manifest.compression)
            w.add_bytes(container.ENVELOPE_NAME, env_bytes)
            w.add_bytes(container.CHAIN_NAME, _chain_member(chain))
            while (hdr := container.next_header(stream)) is not None:
                data = _read_member(stream, hdr, what=hdr.name)
                if hdr.name == container.CHAIN_NAME:
                    continue
                w.add_raw(container.make_header(hdr.name, hdr.size, mode=hdr.mode))
                w.add_raw(data + b"\x00" * container.padding(hdr.size))
            w.close()
            _finish(fh, tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
