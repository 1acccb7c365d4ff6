"""Delta bundles: image blobs the base bundle already carries are left out.

Public surface (stable):

- ``base_blobs(base_bundle) -> (BaseRef, {digest})``: the builder's view of ``--base OLD.efb`` (the
  image blobs listed in its manifest; read without trust decisions: a lying base only makes the
  delta uninstallable, never lets unverified bytes in, because the site checks every blob again).
- ``find_base(manifest, store_dir) -> Path``: the staged base of a delta in the bundle store, or
  ``errors.BaseMissing`` naming the bundle the site needs. ``verify_and_stage`` calls it before a
  single payload byte is staged, so a site without the base refuses the delta at once.
- ``complete(staged, store_dir, *, manifest=None, rehash=True) -> int``: hard-link (or copy) the
  blobs left out of a staged delta from its base into the delta's own ``payload/images/blobs``,
  checking each one's size (and sha256 with ``rehash``), so the staged delta is self-contained
  (the base may leave the store later). ``verify_and_stage`` calls it before the atomic rename
  with ``rehash=False``: the base's blobs were hashed when the base was staged into the same
  private store, and every consumer (the registry, containerd) re-checks digests on ingest.

Only image blobs are ever left out: YAML, ``index.json`` and ``edgefleet-images.json`` are
always carried, so a delta's manifest still lists everything it installs, and the images file
names each blob taken from the base.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from bundles import errors, images, oci
from bundles.manifest import BaseRef, Manifest, images_layout

_BLOB = re.compile(r"^images/blobs/sha256/([0-9a-f]{64})$")
_STAGED = re.compile(r"^[0-9a-f]{64}$")


def base_blobs(base_bundle: Path) -> tuple[BaseRef, set[str]]:
    from bundles import pack  # late: pack imports verify, which imports this module lazily

    manifest, _env, _chain, _comp = pack.load_manifest(base_bundle)
    digests = {"sha256:" + m.group(1) for f in manifest.files if (m := _BLOB.match(f.path))}
    return BaseRef(name=manifest.name, version=manifest.version, release=manifest.release), digests


def _describe(base: BaseRef) -> str:
    return f"{base.name}-{base.version} (release {base.release})"


def find_base(manifest: Manifest, store_dir: Path) -> Path:
    base = manifest.base
    if base is None:
        raise ValueError("not a delta bundle")
    from bundles import verify

    candidates = sorted(p for p in store_dir.iterdir() if _STAGED.match(p.name) and p.is_dir()) \
        if store_dir.is_dir() else []
    for path in candidates:
        try:
            m = verify.load_staged(path)
        except errors.BundleError:
            continue
        if (m.name, m.version, m.release) == (base.name, base.version, base.release):
            return path
    raise errors.BaseMissing(
        f"bundle {manifest.label()} is a delta: this site needs its base bundle {_describe(base)} first "
        "(import the full bundle, or build a full bundle without --base)"
    )


def complete(staged: Path, store_dir: Path, *, manifest: Manifest | None = None, rehash: bool = True) -> int:
    """Bring the blobs a staged delta left out into its payload; returns how many were added."""
    images_dir = images_layout(staged)
    if images_dir is None:
        return 0
    meta = images.load_meta(images_dir)
    base_doc = meta.get("base")
    if not base_doc:
        return 0
    from bundles import verify

    manifest = manifest or verify.load_staged(staged)
    base_path = find_base(manifest, store_dir)
    sizes = {b["digest"]: int(b["size"]) for b in meta.get("blobs", [])}
    added = 0
    for digest in base_doc.get("blobs", []):
        dest = oci.blob_path(images_dir, digest)
        if dest.is_file() and dest.stat().st_size == sizes.get(digest):
            continue
        src = _find_blob(base_path, digest, store_dir)
        if src is None:
            raise errors.BaseMissing(
                f"base bundle {_describe(BaseRef.model_validate(base_doc))} has no blob {digest} "
                f"that delta {manifest.label()} needs"
            )
        try:
            if rehash:
                oci.verify_blob(src, digest, sizes.get(digest))
            elif src.stat().st_size != sizes.get(digest):
                raise oci.OCIError(f"blob {digest} is {src.stat().st_size} bytes, expected {sizes.get(digest)}")
        except oci.OCIError as exc:
            raise errors.DigestMismatch(f"base bundle blob: {exc}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise errors.StoreError(f"cannot bring base blob {digest} into the delta: {exc.strerror}") from None
        added += 1
    if added:
        fd = os.open(images_dir / "blobs" / "sha256", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return added


def _find_blob(base_path: Path, digest: str, store_dir: Path, depth: int = 0) -> Path | None:
    """The blob in the base, or (when the base is itself a completed or chained delta) its base."""
    cand = oci.blob_path(base_path / "payload" / images.IMAGES_DIR, digest)
    if cand.is_file():
        return cand
    if depth >= 8:
        return None
    from bundles import verify

    m = verify.load_staged(base_path)
    if m.base is None:
        return None
    try:
        return _find_blob(find_base(m, store_dir), digest, store_dir, depth + 1)
    except errors.BaseMissing:
        return None
