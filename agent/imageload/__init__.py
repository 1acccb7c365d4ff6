"""Image loaders for bundles that carry an OCI image layout (docs/images.md).

``agent.images.load_for`` (the installer's hook, run in the plan's ``prepare`` step, i.e. before
any component is applied) delegates here when the staged bundle has ``payload/images`` as an OCI
layout or the configured loader is ``registry``. Public surface:

- ``load(ctx, spec) -> dict``: complete a delta from its base, then
  ``registry``: push every image (resumable, retried), verify every manifest by digest and every
  tag, record what was pushed (kv ``images.pushed``: bundle_id → images) for GC;
  ``k3s-airgap``: one OCI archive per image into ``images.k3s_images_dir`` + ``ctr import``;
  ``none``: nothing (the sim).
  Then every image a component references must be available: carried by the bundle, or (registry
  loader) already in the site registry. Otherwise ``images.ImageLoadError`` names the component and
  the image, which fails the install before anything is applied (and rolls it back).
- ``collect_garbage(ctx, keep=bundle ids) -> dict | None``: with ``images.gc``, delete from the site
  registry the manifests edgefleet pushed for bundles other than ``keep`` (current + last good)
  that no kept bundle uses, run ``images.gc_command`` (the registry's garbage-collect) and report
  it as an ``images.gc`` event. Never raises: a GC problem is a warning, not a failed install.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog

from agent import images as agent_images
from agent import protocol
from agent.context import AgentContext
from agent.imageload import airgap, registry
from agent.install import model
from bundles import delta, errors, oci
from bundles import images as bundle_images

log = structlog.get_logger("edgefleet.images")

PUSHED_KEY = "images.pushed"


def target(ctx: AgentContext) -> registry.Target:
    c = ctx.config.images
    return registry.Target(url=c.registry_url, repo_layout=c.repo_layout, tls_verify=c.tls_verify, ca_file=c.ca_file,
                           concurrency=c.concurrency, retries=c.retries, backoff_max=c.backoff_max_seconds,
                           timeout=c.request_timeout_seconds)


async def load(ctx: AgentContext, spec: model.Spec) -> dict[str, Any]:
    loader = ctx.config.install.image_loader
    images_dir = agent_images.layout_dir(spec)
    carried: set[str] = set()
    meta: dict[str, Any] = {"images": []}
    out: dict[str, Any] = {"loader": loader}
    if images_dir is not None:
        try:
            added = await asyncio.to_thread(delta.complete, Path(spec.path), Path(spec.path).parent)
            meta = bundle_images.load_meta(images_dir)
        except (errors.BundleError, oci.OCIError) as exc:
            raise agent_images.ImageLoadError(f"bundle {spec.label}: {exc}") from None
        out["fromBase"] = added
        carried = {i["ref"] for i in meta["images"]}
    if loader == "registry":
        out.update(await _load_registry(ctx, spec, images_dir, meta))
    elif loader == "k3s-airgap" and images_dir is not None:
        out.update(await _load_airgap(ctx, images_dir, meta))
    if loader == "registry":
        await _check_available(ctx, spec, carried)
    elif loader == "k3s-airgap":
        await _check_containerd(spec, carried)
    return out


async def _load_registry(ctx: AgentContext, spec: model.Spec, images_dir: Path | None,
                         meta: dict[str, Any]) -> dict[str, Any]:
    if images_dir is None:
        return {"pushed": 0}
    t = target(ctx)
    try:
        report = await registry.push(t, images_dir)
        problems = await registry.verify(t, report.pushed)
    except (registry.PushError, oci.OCIError, OSError) as exc:
        raise agent_images.ImageLoadError(f"pushing the images of {spec.label} to {t.url}: {exc}") from None
    if problems:
        raise agent_images.ImageLoadError(f"{problems[0]} (after pushing to {t.url})")
    pushed = ctx.store.get(PUSHED_KEY, {}) or {}
    pushed[spec.bundle_id] = report.pushed
    ctx.store.put(PUSHED_KEY, pushed)
    ctx.emit("images.pushed", f"{report.images} images of {spec.label} in the site registry "
             f"({report.blobs_uploaded} blobs uploaded, {report.blobs_skipped} already there)",
             data={"bundle": spec.label, "images": report.images, "uploaded": report.blobs_uploaded,
                   "skipped": report.blobs_skipped, "bytes": report.bytes_uploaded, "retries": report.retries})
    return {"pushed": report.images, "uploaded": report.blobs_uploaded, "skipped": report.blobs_skipped,
            "mounted": report.blobs_mounted, "bytes": report.bytes_uploaded, "retries": report.retries}


async def _load_airgap(ctx: AgentContext, images_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    dest = ctx.config.images.k3s_images_dir
    written = imported = 0
    for image in meta["images"]:
        try:
            path, fresh = await asyncio.to_thread(airgap.archive, images_dir, image, dest)
            written += fresh
            imported += await airgap.ctr_import(path)
        except (OSError, oci.OCIError) as exc:
            raise agent_images.ImageLoadError(f"image {image['ref']}: k3s air-gap load failed: {exc}") from None
    return {"archives": len(meta["images"]), "written": written, "imported": imported}


async def _check_available(ctx: AgentContext, spec: model.Spec, carried: set[str]) -> None:
    """Every image a component runs is carried or already in the site registry, else fail naming it."""
    t = target(ctx)
    for unit in spec.units:
        for original in unit.images:
            try:
                ref = bundle_images.parse_ref(original)
            except (ValueError, oci.OCIError):
                raise agent_images.ImageLoadError(
                    f"component {unit.name}: image {original!r} is not a valid reference") from None
            if str(ref) in carried:
                continue
            try:
                found = await registry.has_manifest(t, registry.repo_for(ref, t.repo_layout),
                                                    ref.digest or ref.tag or "latest")
            except registry.PushError as exc:
                raise agent_images.ImageLoadError(f"component {unit.name}: image {original}: {exc}") from None
            if not found:
                raise agent_images.ImageLoadError(
                    f"component {unit.name}: image {original} is missing: not in bundle {spec.label} "
                    f"and not in the site registry {t.url}")


async def _check_containerd(spec: model.Spec, carried: set[str]) -> None:
    """k3s-airgap: an image neither carried nor in containerd fails the load (when ctr can tell)."""
    try:
        have = await airgap.ctr_images()
    except OSError as exc:
        raise agent_images.ImageLoadError(f"bundle {spec.label}: {exc}") from None
    if have is None:
        return  # no ctr: k3s imports the archives at its next start; nothing to compare against
    for unit in spec.units:
        for original in unit.images:
            try:
                ref = str(bundle_images.parse_ref(original))
            except (ValueError, oci.OCIError):
                raise agent_images.ImageLoadError(
                    f"component {unit.name}: image {original!r} is not a valid reference") from None
            if ref not in carried and ref not in have:
                raise agent_images.ImageLoadError(
                    f"component {unit.name}: image {original} is missing: not in bundle {spec.label} "
                    "and not in containerd (k8s.io)")


async def collect_garbage(ctx: AgentContext, *, keep: set[str | None]) -> dict[str, Any] | None:
    cfg = ctx.config.images
    if ctx.config.install.image_loader != "registry" or not cfg.gc:
        return None
    try:
        return await _gc(ctx, {k for k in keep if k})
    except Exception as exc:  # a GC problem must never fail an install that already committed
        log.warning("site registry GC failed", error=str(exc))
        ctx.emit("images.gc_failed", f"site registry GC failed: {exc}", severity=protocol.Severity.WARNING)
        return None


async def _gc(ctx: AgentContext, keep: set[str]) -> dict[str, Any]:
    pushed: dict[str, list[dict[str, Any]]] = ctx.store.get(PUSHED_KEY, {}) or {}
    kept = [img for b, imgs in pushed.items() if b in keep for img in imgs]
    dropped = [img for b, imgs in pushed.items() if b not in keep for img in imgs]
    keep_manifests = {(i["repo"], d) for i in kept for d in i["manifests"]}
    keep_blobs = {d for i in kept for d in (*i["blobs"], *i["manifests"])}
    delete = sorted({(i["repo"], d) for i in dropped for d in i["manifests"]} - keep_manifests)
    freed = sorted({d for i in dropped for d in (*i["blobs"], *i["manifests"])} - keep_blobs)
    deleted = await registry.delete_manifests(target(ctx), delete) if delete else 0
    ran = None
    if ctx.config.images.gc_command and delete:
        proc = await asyncio.create_subprocess_exec(*ctx.config.images.gc_command, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        ran = proc.returncode
        if proc.returncode != 0:
            raise OSError(f"{ctx.config.images.gc_command[0]} exited {proc.returncode}: "
                          f"{' '.join(err.decode(errors='replace').split())[-200:]}")
    ctx.store.put(PUSHED_KEY, {b: imgs for b, imgs in pushed.items() if b in keep})
    report = {"manifestsDeleted": deleted, "blobsUnreferenced": len(freed), "gcCommandExit": ran}
    if delete:
        ctx.emit("images.gc", f"site registry GC: {deleted} manifests deleted, {len(freed)} blobs unreferenced"
                 + ("; garbage-collect ran" if ran == 0 else "; no gc_command configured: blobs stay until it runs"),
                 data={**report, "blobs": freed[:100]})
    return report
