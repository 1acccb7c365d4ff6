"""Container images of a bundle: the installer's hook (``load_for``, run in the plan's ``prepare`` step).

``load_for`` records what each component runs (``images.<bundle>`` in the store), then makes the
images available to the cluster *before* any component is applied:

* a bundle carrying an OCI image layout (``payload/images/edgefleet-images.json``), or the
  ``registry`` loader, goes through :mod:`agent.imageload` (push + verify by digest, or k3s
  archives; then every referenced image must be available, else ``ImageLoadError`` names it);
* otherwise plain image archives the bundle ships (``payload/images/*.tar``, ``*.tar.zst``,
  ``*.tar.gz``) go to the configured loader below: ``none`` records the references only (the
  sim); ``k3s-airgap`` copies them into k3s' air-gap directory
  (``/var/lib/rancher/k3s/agent/images``, picked up by k3s at start) and, when ``k3s`` or ``ctr``
  is on PATH, imports them into containerd's ``k8s.io`` namespace right away.

Copies are atomic (temp file + rename), and an archive already present with the same size is
not copied again, so a resumed install does not redo gigabytes of work.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from agent.context import AgentContext
from agent.install import model

log = structlog.get_logger("edgefleet.images")

K3S_IMAGES_DIR = Path("/var/lib/rancher/k3s/agent/images")
ARCHIVE_SUFFIXES = (".tar", ".tar.zst", ".tar.gz")

Loader = Callable[[list[Path]], Awaitable[list[str]]]


class ImageLoadError(Exception):
    pass


def archives(spec: model.Spec) -> list[Path]:
    if not spec.images_dir:
        return []
    root = Path(spec.images_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))


def references(spec: model.Spec) -> dict[str, list[str]]:
    """component → image references: the manifest's list, else what its pod templates name."""
    return {unit.name: sorted(unit.images) for unit in spec.units}


async def load_none(paths: list[Path]) -> list[str]:
    return []


def k3s_airgap(target: Path = K3S_IMAGES_DIR) -> Loader:
    async def load(paths: list[Path]) -> list[str]:
        loaded = []
        for path in paths:
            dest = await asyncio.to_thread(_copy, path, target)
            await _import(dest)
            loaded.append(path.name)
        return loaded

    return load


def _copy(path: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    dest = target / path.name
    if dest.exists() and dest.stat().st_size == path.stat().st_size:
        return dest
    tmp = target / f".{path.name}.edgefleet-tmp"
    try:
        shutil.copyfile(path, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImageLoadError(f"cannot copy {path.name} to {target}: {exc.strerror}") from None
    return dest


async def _import(archive: Path) -> None:
    if archive.name.endswith((".zst", ".gz")):
        return  # ctr imports plain tars only; k3s decompresses these itself at start
    if shutil.which("k3s"):
        cmd = ["k3s", "ctr", "-n", "k8s.io", "images", "import", str(archive)]
    elif shutil.which("ctr"):
        cmd = ["ctr", "-n", "k8s.io", "images", "import", str(archive)]
    else:
        return
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ImageLoadError(f"{' '.join(cmd[:-1])} {archive.name} failed: {err.decode(errors='replace')[-300:]}")


async def collect_garbage(ctx: AgentContext, *, keep: set[str | None]) -> dict[str, Any] | None:
    """Site-registry GC after a commit (``images.gc``); see :func:`agent.imageload.collect_garbage`."""
    from agent import imageload

    return await imageload.collect_garbage(ctx, keep=keep)


def loader_for(name: str) -> Loader:
    if name == "none":
        return load_none
    if name == "k3s-airgap":
        return k3s_airgap()
    raise ImageLoadError(f"install.image_loader {name!r} is not available in this agent version")


async def load_for(ctx: AgentContext, spec: model.Spec) -> dict[str, Any]:
    """Record the bundle's image references (``images.<bundle>`` in the store) and load its archives.

    A bundle carrying an OCI image layout, or the ``registry`` loader, goes through
    :mod:`agent.imageload` (push/verify or k3s archives, then every referenced image must be available).
    """
    refs = references(spec)
    ctx.store.put(f"images.{spec.label}", refs)
    from agent import imageload  # late: imageload imports this module

    loader = ctx.config.install.image_loader
    layout = imageload.layout_dir(spec) is not None
    if loader == "registry" or layout or (loader == "k3s-airgap" and not archives(spec)):
        return {"references": sum(len(v) for v in refs.values()), **await imageload.load(ctx, spec)}
    found = archives(spec)
    loaded = await loader_for(ctx.config.install.image_loader)(found) if found else []
    if loaded:
        log.info("image archives loaded", bundle=spec.label, count=len(loaded))
    return {"references": sum(len(v) for v in refs.values()), "archives": len(found), "loaded": len(loaded)}
