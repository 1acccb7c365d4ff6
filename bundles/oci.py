"""OCI image layouts: read, write, walk, verify (https://github.com/opencontainers/image-spec).

Public surface (stable):

- ``Descriptor``: ``media_type``, ``digest`` ("sha256:<hex>"), ``size``, ``annotations``, ``platform``.
- ``blob_path(layout, digest)``: where a blob lives (``blobs/sha256/<hex>``), the digest checked first.
- ``read_index(layout)``: the descriptors of ``index.json``; ``read_json(layout, desc)``: a small JSON
  blob (manifest, index, config), its size and digest checked before it is parsed.
- ``closure(layout, desc, *, arches)``: every blob an image needs, top first, restricted to the
  platforms in ``arches`` (a multi-arch index keeps only those children; when that changes the
  index, a new filtered index is written and returned instead). Unknown media types are refused.
- ``write_blob(layout, data, media_type)``, ``write_index(layout, descs)``, ``init_layout(layout)``;
  ``add_image(layout, *, layers, arch, ...)`` builds an image from layer tarballs (gzip'd on the
  way) and ``add_index(layout, manifests)`` a multi-arch index: used by tests and the benchmark,
  and useful for packaging locally built artefacts.
- ``verify_blob(path, digest, size)``: streamed re-hash.

Why digests are checked even on read: a layout directory handed to the builder is untrusted
input; a blob whose content does not match its name would otherwise be signed into a bundle.
Small JSON documents are capped (4 MiB) before they are read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_LAYOUT = '{"imageLayoutVersion":"1.0.0"}'
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MT_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_MANIFEST, MT_DOCKER_MANIFEST)
REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 4 << 20
CHUNK = 1 << 20
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


class OCIError(ValueError):
    """A layout is malformed, a blob is missing or does not match its digest."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    platform: dict[str, str] | None = field(default=None, hash=False, compare=False)

    @property
    def hex(self) -> str:
        return check_digest(self.digest)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform:
            doc["platform"] = dict(self.platform)
        return doc

    @classmethod
    def from_json(cls, doc: Any, *, default_type: str = "") -> Descriptor:
        if not isinstance(doc, dict):
            raise OCIError("descriptor is not an object")
        digest, size = doc.get("digest"), doc.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise OCIError(f"descriptor {str(digest)[:80]!r} lacks a digest or size")
        check_digest(digest)
        ann = doc.get("annotations") or {}
        plat = doc.get("platform")
        return cls(
            media_type=str(doc.get("mediaType") or default_type),
            digest=digest,
            size=size,
            annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {},
            platform={str(k): v for k, v in plat.items() if isinstance(v, str)} if isinstance(plat, dict) else None,
        )


def check_digest(digest: str) -> str:
    """The hex part of a sha256 digest; anything else (other algorithms, bad hex) is refused."""
    m = _DIGEST.match(digest)
    if not m:
        raise OCIError(f"digest {digest[:80]!r} is not sha256:<64 lowercase hex>")
    return m.group(1)


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / check_digest(digest)


def verify_blob(path: Path, digest: str, size: int | None = None) -> None:
    h = hashlib.sha256()
    n = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
    except OSError as exc:
        raise OCIError(f"blob {digest} is missing or unreadable: {exc.strerror}") from None
    if size is not None and n != size:
        raise OCIError(f"blob {digest} is {n} bytes, its descriptor says {size}")
    if "sha256:" + h.hexdigest() != digest:
        raise OCIError(f"blob {digest} does not match its digest (content is sha256:{h.hexdigest()[:16]}...)")


def read_blob(layout: Path, desc: Descriptor, *, max_bytes: int = MAX_JSON) -> bytes:
    if desc.size > max_bytes:
        raise OCIError(f"{desc.media_type or 'document'} {desc.digest} is {desc.size} bytes, over {max_bytes}")
    path = blob_path(layout, desc.digest)
    try:
        data = path.read_bytes() if path.stat().st_size <= max_bytes else b""
    except OSError as exc:
        raise OCIError(f"blob {desc.digest} is missing from {layout}: {exc.strerror}") from None
    if len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
        raise OCIError(f"blob {desc.digest} in {layout} does not match its digest or size")
    return data


def read_json(layout: Path, desc: Descriptor) -> dict[str, Any]:
    data = read_blob(layout, desc)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OCIError(f"blob {desc.digest} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OCIError(f"blob {desc.digest} is not a JSON object")
    return doc


def read_index(layout: Path) -> list[Descriptor]:
    try:
        raw = (layout / "index.json").read_bytes()
    except OSError as exc:
        raise OCIError(f"{layout} is not an OCI image layout (index.json: {exc.strerror})") from None
    if len(raw) > MAX_JSON:
        raise OCIError(f"{layout}/index.json is over {MAX_JSON} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise OCIError(f"{layout}/index.json is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise OCIError(f"{layout}/index.json has no manifests list")
    return [Descriptor.from_json(d) for d in doc["manifests"]]


def platform_arch(platform: dict[str, str] | None) -> str | None:
    if not platform:
        return None
    return platform.get("architecture")


def closure(
    layout: Path, desc: Descriptor, *, arches: Iterable[str] | None = None, write_to: Path | None = None
) -> tuple[Descriptor, list[Descriptor]]:
    """``(top, blobs)``: the (possibly re-written) top descriptor and every blob it needs, top first.

    For an index: children whose platform architecture is not in ``arches`` are dropped (children
    without a platform, e.g. attestations, are dropped too when filtering). If nothing is left the
    image is refused naming the architectures it has. For a single manifest: its config's
    ``architecture`` must be in ``arches``. A filtered index is written to ``write_to`` (default:
    ``layout``), so a source layout can stay read-only.
    """
    want = set(arches) if arches is not None else None
    if desc.media_type in INDEX_TYPES:
        doc = read_json(layout, desc)
        children = [Descriptor.from_json(c) for c in doc.get("manifests") or []]
        keep = [c for c in children if want is None or platform_arch(c.platform) in want]
        if not keep:
            have = sorted({platform_arch(c.platform) or "?" for c in children})
            raise OCIError(f"image {desc.digest} has no manifest for {', '.join(sorted(want or ()))} "
                           f"(it has {', '.join(have)})")
        top = desc
        if len(keep) != len(children):
            doc = dict(doc)
            doc["manifests"] = [c.to_json() for c in keep]
            top = write_blob(write_to or layout, json.dumps(doc, separators=(",", ":")).encode(), desc.media_type,
                             annotations=desc.annotations)
        out = [top]
        for c in keep:
            _top, blobs = closure(layout, c, arches=None)
            out.extend(blobs)
        return top, _dedupe(out)
    if desc.media_type in MANIFEST_TYPES or not desc.media_type:
        doc = read_json(layout, desc)
        config = Descriptor.from_json(doc.get("config"), default_type=MT_CONFIG)
        layers = [Descriptor.from_json(x) for x in doc.get("layers") or []]
        if want is not None:
            arch = read_json(layout, config).get("architecture")
            if arch not in want:
                raise OCIError(f"image {desc.digest} is {arch}, the bundle wants {', '.join(sorted(want))}")
        return desc, _dedupe([desc, config, *layers])
    raise OCIError(f"image {desc.digest} has unsupported media type {desc.media_type[:80]!r}")


def _dedupe(descs: Sequence[Descriptor]) -> list[Descriptor]:
    seen: set[str] = set()
    out = []
    for d in descs:
        if d.digest not in seen:
            seen.add(d.digest)
            out.append(d)
    return out


# --- writing ---------------------------------------------------------------------------------------


def init_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(OCI_LAYOUT)
    if not (layout / "index.json").exists():
        write_index(layout, [])


def write_blob(layout: Path, data: bytes, media_type: str, *, annotations: dict[str, str] | None = None,
               platform: dict[str, str] | None = None) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != len(data):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return Descriptor(media_type=media_type, digest=digest, size=len(data), annotations=annotations or {},
                      platform=platform)


def write_index(layout: Path, descs: Sequence[Descriptor]) -> None:
    doc = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [d.to_json() for d in descs]}
    tmp = layout / ".index.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, layout / "index.json")


def tar_layer(files: dict[str, bytes]) -> bytes:
    """A deterministic tar of ``files`` (name → content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def add_image(layout: Path, *, layers: Sequence[bytes], arch: str = "amd64", os_name: str = "linux",
              ref: str | None = None, labels: dict[str, str] | None = None) -> Descriptor:
    """Write an image (each ``layers`` item an uncompressed tar, gzip'd here) and return its manifest
    descriptor; with ``ref``, it is also listed in ``index.json`` under that ref name."""
    init_layout(layout)
    layer_descs = []
    diff_ids = []
    for tar in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        gz = gzip.compress(tar, compresslevel=1, mtime=0)
        layer_descs.append(write_blob(layout, gz, MT_LAYER_GZIP))
    config = {
        "architecture": arch, "os": os_name, "config": {"Labels": labels or {}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdesc = write_blob(layout, json.dumps(config, sort_keys=True).encode(), MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc.to_json(),
                "layers": [d.to_json() for d in layer_descs]}
    mdesc = write_blob(layout, json.dumps(manifest, sort_keys=True).encode(), MT_MANIFEST,
                       platform={"architecture": arch, "os": os_name})
    if ref:
        tag(layout, mdesc, ref)
    return mdesc


def add_index(layout: Path, manifests: Sequence[Descriptor], *, ref: str | None = None) -> Descriptor:
    doc = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [m.to_json() for m in manifests]}
    idesc = write_blob(layout, json.dumps(doc, sort_keys=True).encode(), MT_INDEX)
    if ref:
        tag(layout, idesc, ref)
    return idesc


def tag(layout: Path, desc: Descriptor, ref: str) -> None:
    """List ``desc`` in ``index.json`` under ``ref`` (replacing an entry of the same ref)."""
    existing = [d for d in read_index(layout) if d.annotations.get(REF_NAME) != ref]
    entry = Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size, annotations={REF_NAME: ref})
    write_index(layout, [*existing, entry])
