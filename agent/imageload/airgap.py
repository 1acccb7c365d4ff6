"""k3s air-gap loader: one OCI archive per image into the k3s images directory, then ``ctr import``.

``archive(images_dir, image, dest_dir) -> Path`` writes ``<repo>_<tag>-<digest12>.tar`` (an OCI
image layout as a tar, the format ``ctr images import`` and k3s' image-directory importer read),
streaming every blob from the staged bundle (bounded memory). The index carries both
``org.opencontainers.image.ref.name`` and ``io.containerd.image.name`` with the full reference,
so containerd names the image exactly as the pod templates do; nothing is rewritten.

Writes are atomic (temp + fsync + rename) and an archive already present with the same size is
kept, so a resumed install does not rewrite gigabytes. ``k3s ctr`` (or ``ctr``) on PATH imports
the archive into the ``k8s.io`` namespace right away; otherwise k3s imports the directory at its
next start (docs/images.md).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from bundles import oci

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _name(image: dict[str, Any]) -> str:
    base = _UNSAFE.sub("_", image["ref"].split("@")[0])[-100:]
    return f"{base}-{oci.check_digest(image['digest'])[:12]}.tar"


def _blobs(images_dir: Path, top: oci.Descriptor) -> list[oci.Descriptor]:
    _top, blobs = oci.closure(images_dir, top, arches=None)
    return blobs


def archive(images_dir: Path, image: dict[str, Any], dest_dir: Path) -> tuple[Path, bool]:
    """``(path, written)``; ``written`` is False when an archive of the right size was already there."""
    top = oci.Descriptor(media_type=image["mediaType"], digest=image["digest"], size=image["size"])
    blobs = _blobs(images_dir, top)
    index = {"schemaVersion": 2, "mediaType": oci.MT_INDEX, "manifests": [{
        **top.to_json(), "annotations": {oci.REF_NAME: image["ref"], "io.containerd.image.name": image["ref"]}}]}
    members: list[tuple[str, bytes | Path, int]] = [
        ("oci-layout", oci.OCI_LAYOUT.encode(), len(oci.OCI_LAYOUT)),
        ("index.json", json.dumps(index, sort_keys=True).encode(), 0),
    ]
    members[1] = (members[1][0], members[1][1], len(members[1][1]))  # type: ignore[arg-type]
    for b in blobs:
        members.append((f"blobs/sha256/{b.hex}", oci.blob_path(images_dir, b.digest), b.size))
    size = sum(512 + n + (-n) % 512 for _name_, _src, n in members) + 2 * 512
    size += (-size) % tarfile.RECORDSIZE
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / _name(image)
    if dest.is_file() and dest.stat().st_size == size:
        return dest, False
    tmp = dest_dir / f".{dest.name}.edgefleet-tmp"
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, src, n in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = n, 0o644
                    if isinstance(src, bytes):
                        tar.addfile(info, io.BytesIO(src))
                    else:
                        with open(src, "rb") as blob:
                            tar.addfile(info, blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return dest, True


def ctr_command() -> list[str] | None:
    if shutil.which("k3s"):
        return ["k3s", "ctr", "-n", "k8s.io", "images", "import"]
    if shutil.which("ctr"):
        return ["ctr", "-n", "k8s.io", "images", "import"]
    return None


async def ctr_images() -> set[str] | None:
    """Image names containerd's ``k8s.io`` namespace has, or None without ctr (cannot tell)."""
    cmd = ctr_command()
    if cmd is None:
        return None
    ls = [*cmd[:-1], "ls", "-q"]
    proc = await asyncio.create_subprocess_exec(*ls, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"{' '.join(ls)} failed: {' '.join(err.decode(errors='replace').split())[-300:]}")
    return {line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()}


async def ctr_import(path: Path) -> bool:
    """Import now when ctr exists; False when it does not (k3s imports at its next start)."""
    cmd = ctr_command()
    if cmd is None:
        return False
    proc = await asyncio.create_subprocess_exec(*cmd, str(path), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"{' '.join(cmd)} {path.name} failed: {' '.join(err.decode(errors='replace').split())[-300:]}")
    return True
