"""Container images in bundles: which images a bundle needs, where they come from, how they are laid out.

Public surface (stable):

- ``parse_ref(ref) -> ImageRef`` (Docker reference rules: ``nginx:1.25`` is
  ``docker.io/library/nginx:1.25``; ``latest`` when no tag and no digest).
- ``ImageField``: a profile entry naming an image field of a custom resource (``kind``, optional
  ``group``, ``path`` like ``spec.image`` or ``spec.containers[].image``).
- ``referenced(components, sources, fields) -> {ref: [components]}``: pod-template images (the
  manifest's ``Component.images``) plus the profile-named custom-resource fields.
- ``Options``: ``source`` (``oci:DIR`` or ``registry``), ``arches``, ``base`` (a delta's base
  bundle), ``registry_tls_verify``.
- ``add_images(components, sources, *, fields, options, work) -> ImageSet``: resolve every image
  (tag → digest), filter by architecture, and lay the blobs out as payload files.
- ``IMAGES_DIR`` (``images``) and ``META_NAME``: where a bundle carries its images.

In the bundle, ``payload/images/`` is an OCI image layout: ``oci-layout``, ``index.json`` (one
entry per image, ``org.opencontainers.image.ref.name`` = the normalized reference), the blobs under
``blobs/sha256/<hex>`` and ``edgefleet-images.json`` (below). Every one of these is an ordinary
payload file of the signed manifest, so the existing verifier checks each blob's size and
sha256 while it streams; a blob's payload sha256 *is* its OCI digest, so nothing about images is
trusted that the signature does not cover. Blobs shared by several images or components are
stored once.

``edgefleet-images.json``::

    {"schemaVersion": 1, "arches": [...],
     "images": [{"ref", "original": [as written in the manifests], "tag", "digest", "mediaType",
                 "size", "sourceDigest" (differs from digest when the index was filtered),
                 "components": [...], "blobs": [digests]}],
     "blobs": [{"digest", "size"}]   # everything the images need, including blobs from the base
     "base": {"name", "version", "release", "blobs": [digests left out because the base has them]}}
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from bundles import content, errors, manifest, oci
from bundles.manifest import BaseRef, Component, FileEntry

IMAGES_DIR = manifest.IMAGES_DIR
META_NAME = manifest.IMAGES_META_NAME
SKOPEO_TIMEOUT = 3600
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")  # distribution's reference grammar
_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?$")


# --- references ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository``, e.g. ``docker.io/library/nginx``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_ref(ref: str) -> ImageRef:
    text = ref.strip()
    if not text or any(c.isspace() for c in text) or len(text) > 512:
        raise ValueError(f"image reference {ref[:80]!r} is empty, has spaces or is too long")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        oci.check_digest(digest)
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise ValueError(f"image reference {ref[:80]!r} has an invalid tag")
    parts = text.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, path = parts[0], "/".join(parts[1:])
    else:
        registry, path = "docker.io", text
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = "docker.io"
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_PATH_COMPONENT.match(p) for p in path.split("/")) or len(path) > 255:
        raise ValueError(f"image reference {ref[:80]!r} has an invalid repository")
    if not _HOST.match(registry):
        raise ValueError(f"image reference {ref[:80]!r} has an invalid registry host")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry=registry, repository=path, tag=tag, digest=digest)


def normalize(ref: str) -> str:
    return str(parse_ref(ref))


# --- what the bundle needs -------------------------------------------------------------------------


class ImageField(BaseModel):
    """An image-valued field of a custom resource, named by the profile (``imageFields``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    group: str | None = None
    path: str


def _walk(value: Any, parts: Sequence[str]) -> list[Any]:
    if not parts:
        return [value]
    head, rest = parts[0], parts[1:]
    if head.endswith("[]"):
        inner = value.get(head[:-2]) if isinstance(value, dict) else None
        out: list[Any] = []
        for item in inner if isinstance(inner, list) else []:
            out.extend(_walk(item, rest))
        return out
    if isinstance(value, dict) and head in value:
        return _walk(value[head], rest)
    return []


def field_images(obj: dict[str, Any], fields: Iterable[ImageField]) -> set[str]:
    found: set[str] = set()
    kind = obj.get("kind")
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    for f in fields:
        if f.kind != kind or (f.group is not None and f.group != group):
            continue
        for v in _walk(obj, f.path.split(".")):
            if isinstance(v, str) and v:
                found.add(v)
    return found


def referenced(
    components: Sequence[Component], sources: Mapping[str, Path], fields: Sequence[ImageField] = ()
) -> dict[str, list[str]]:
    """original reference → components using it (pod templates + profile-named CR fields)."""
    out: dict[str, list[str]] = {}
    for comp in components:
        refs = set(comp.images)
        if fields:
            for rel in comp.files:
                text = Path(sources[rel]).read_text(encoding="utf-8")
                for obj in content.parse_documents(text, source=f"{comp.name}:{rel}"):
                    refs |= field_images(obj, fields)
        for r in sorted(refs):
            out.setdefault(r, []).append(comp.name)
    return out


# --- where images come from ------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    source: str  # "oci:DIR" or "registry"
    arches: tuple[str, ...] = ("amd64", "arm64")
    base: Path | None = None
    registry_tls_verify: bool = True
    skopeo: str | None = field(default_factory=lambda: shutil.which("skopeo"))


@dataclass
class ImageSet:
    files: list[FileEntry]
    sources: dict[str, Path]
    images: list[dict[str, Any]]
    base: BaseRef | None
    blobs_total: int
    blobs_from_base: int
    work: Path


def _find_in_layout(layout: Path, ref: ImageRef, original: str) -> oci.Descriptor | None:
    wanted = {original, str(ref)}
    if ref.digest and ref.tag:
        wanted.add(str(ImageRef(ref.registry, ref.repository, ref.tag, None)))
    hits = []
    for d in oci.read_index(layout):
        name = d.annotations.get(oci.REF_NAME)
        if name is None:
            continue
        try:
            norm = normalize(name)
        except ValueError:
            norm = name
        if name in wanted or norm in wanted:
            hits.append(d)
    if ref.digest:
        hits = [d for d in hits if d.digest == ref.digest]
        if not hits and oci.blob_path(layout, ref.digest).is_file():
            size = oci.blob_path(layout, ref.digest).stat().st_size
            desc = oci.Descriptor(media_type="", digest=ref.digest, size=size)
            mt = oci.read_json(layout, desc).get("mediaType")
            return oci.Descriptor(media_type=str(mt or oci.MT_MANIFEST), digest=ref.digest, size=desc.size)
    return hits[-1] if hits else None


def _skopeo_fetch(refs: Sequence[tuple[str, ImageRef]], *, into: Path, options: Options) -> None:
    if options.skopeo is None:
        raise errors.BuildError("--images-from registry needs skopeo on PATH (apt-get install skopeo)")
    for original, ref in refs:
        cmd = [options.skopeo, "copy", "--all", "--retry-times", "3"]
        if not options.registry_tls_verify:
            cmd.append("--src-tls-verify=false")
        cmd += [f"docker://{ref}", f"oci:{into}:{ref}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SKOPEO_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise errors.BuildError(f"image {original}: skopeo copy failed: {exc}") from None
        if proc.returncode != 0:
            err = " ".join(proc.stderr.split())[-300:]
            raise errors.BuildError(f"image {original}: cannot fetch from its registry: {err}")


def add_images(
    components: Sequence[Component],
    sources: Mapping[str, Path],
    *,
    fields: Sequence[ImageField],
    options: Options,
    work: Path,
) -> ImageSet:
    """Resolve every referenced image and lay it out under ``work/images`` as payload files.

    Raises ``errors.BuildError`` naming the first image the source lacks, an image without a
    manifest for the bundle's architectures, or a blob whose content does not match its digest.
    """
    refs = referenced(components, sources, fields)
    parsed: list[tuple[str, ImageRef]] = []
    for original in sorted(refs):
        try:
            parsed.append((original, parse_ref(original)))
        except (ValueError, oci.OCIError) as exc:
            raise errors.BuildError(f"image {original[:120]} (component {refs[original][0]}): {exc}") from None

    out = work / IMAGES_DIR
    oci.init_layout(out)
    fetched: Path | None = None
    if options.source == "registry":
        fetched = Path(tempfile.mkdtemp(prefix="skopeo-", dir=work))
        _skopeo_fetch(parsed, into=fetched, options=options)
        layout = fetched
    elif options.source.startswith("oci:"):
        layout = Path(options.source[4:])
        if not (layout / "index.json").is_file():
            raise errors.BuildError(f"--images-from {options.source}: no OCI image layout (index.json) there")
    else:
        raise errors.BuildError(f"--images-from {options.source!r}: use oci:DIR or registry")

    base_ref, base_blobs = (None, set[str]())
    if options.base is not None:
        from bundles import delta  # late: delta reads bundles through pack, which imports verify

        base_ref, base_blobs = delta.base_blobs(options.base)

    by_ref: dict[str, dict[str, Any]] = {}
    blob_src: dict[str, tuple[Path, int]] = {}
    for original, ref in parsed:
        key = str(ref)
        if key in by_ref:
            by_ref[key]["original"].append(original)
            by_ref[key]["components"] = sorted(set(by_ref[key]["components"]) | set(refs[original]))
            continue
        where = f"component {', '.join(refs[original])}"
        try:
            desc = _find_in_layout(layout, ref, original)
        except oci.OCIError as exc:
            raise errors.BuildError(f"image {original} ({where}): {exc}") from None
        if desc is None:
            raise errors.BuildError(
                f"image {original} ({where}) is not in {options.source}; add it there or build with --without-images"
            )
        try:
            top, blobs = oci.closure(layout, desc, arches=options.arches, write_to=out)
        except oci.OCIError as exc:
            raise errors.BuildError(f"image {original} ({where}): {exc}") from None
        for b in blobs:
            path = oci.blob_path(out, b.digest)
            if not path.is_file():
                path = oci.blob_path(layout, b.digest)
            blob_src[b.digest] = (path, b.size)
        by_ref[key] = {
            "ref": key, "original": [original], "tag": ref.tag, "digest": top.digest, "mediaType": top.media_type,
            "size": top.size, "sourceDigest": desc.digest, "components": sorted(refs[original]),
            "blobs": [b.digest for b in blobs],
        }

    files: list[FileEntry] = []
    srcs: dict[str, Path] = {}
    left_out = []
    for digest, (path, size) in sorted(blob_src.items()):
        if digest in base_blobs:
            left_out.append(digest)
            continue
        hexd = oci.check_digest(digest)
        rel = f"{IMAGES_DIR}/blobs/sha256/{hexd}"
        try:
            oci.verify_blob(path, digest, size)
        except oci.OCIError as exc:
            users = [r["original"][0] for r in by_ref.values() if digest in r["blobs"]]
            raise errors.BuildError(f"image {users[0] if users else '?'}: {exc}") from None
        files.append(FileEntry(path=rel, size=size, sha256=hexd, mode=0o644))
        srcs[rel] = path

    images = sorted(by_ref.values(), key=lambda r: r["ref"])
    oci.write_index(out, [
        oci.Descriptor(media_type=r["mediaType"], digest=r["digest"], size=r["size"],
                       annotations={oci.REF_NAME: r["ref"]})
        for r in images
    ])
    meta: dict[str, Any] = {
        "schemaVersion": 1,
        "arches": sorted(options.arches),
        "images": images,
        "blobs": [{"digest": d, "size": s} for d, (_p, s) in sorted(blob_src.items())],
    }
    if base_ref is not None:
        meta["base"] = {**base_ref.model_dump(), "blobs": sorted(left_out)}
    (out / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True))
    for name in ("oci-layout", "index.json", META_NAME):
        rel = f"{IMAGES_DIR}/{name}"
        from bundles import pack  # late: pack imports verify; images is imported by build

        files.append(pack.file_entry(rel, out / name, mode=0o644))
        srcs[rel] = out / name
    return ImageSet(
        files=files, sources=srcs, images=images, base=base_ref if left_out or base_ref else None,
        blobs_total=len(blob_src), blobs_from_base=len(left_out), work=out,
    )


def load_meta(images_dir: Path) -> dict[str, Any]:
    """``edgefleet-images.json`` of a staged bundle (``payload/images``): verified with the payload."""
    try:
        doc = json.loads((images_dir / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise oci.OCIError(f"{images_dir}/{META_NAME} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 1 or not isinstance(doc.get("images"), list):
        raise oci.OCIError(f"{images_dir}/{META_NAME} is not an edgefleet image list v1")
    return doc
