"""Container images of a bundle: the installer's hook (``load_for``, run in the plan's ``prepare`` step).

``load_for`` records what each component runs (``images.<bundle>`` in the store), then hands the
bundle to the configured loader in :mod:`agent.imageload` *before* any component is applied:
``registry`` (push the bundle's OCI images to the site registry and verify them by digest),
``k3s-airgap`` (one OCI archive per image into ``images.k3s_images_dir``, ``ctr import`` when ctr
is on PATH) or ``none`` (the sim). Then every image a component references must be available, else
``ImageLoadError`` names the component and the image and the run rolls back with nothing applied.
Bundles carry images only as an OCI image layout (``payload/images``, docs/images.md); an image that
goes missing later shows at the health gate (agent.install.gates), naming the pod and the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.context import AgentContext
from agent.install import model
from bundles import manifest


class ImageLoadError(Exception):
    pass


def references(spec: model.Spec) -> dict[str, list[str]]:
    """component → image references: the manifest's list, else what its pod templates name."""
    return {unit.name: sorted(unit.images) for unit in spec.units}


async def collect_garbage(ctx: AgentContext, *, keep: set[str | None]) -> dict[str, Any] | None:
    """Site-registry GC after a commit (``images.gc``); see :func:`agent.imageload.collect_garbage`."""
    from agent import imageload

    return await imageload.collect_garbage(ctx, keep=keep)


def layout_dir(spec: model.Spec) -> Path | None:
    """The bundle's OCI image layout, if it carries images."""
    return manifest.images_layout(Path(spec.path))


async def load_for(ctx: AgentContext, spec: model.Spec) -> dict[str, Any]:
    """Record the bundle's image references (``images.<bundle>`` in the store) and load its images.

    With the ``none`` loader and no images in the bundle there is nothing to load or check, and
    the loaders' modules (tarfile, the OCI and registry code, ~0.6 MiB) stay unimported.
    """
    refs = references(spec)
    ctx.store.put(f"images.{spec.label}", refs)
    count = sum(len(v) for v in refs.values())
    if ctx.config.install.image_loader == "none" and layout_dir(spec) is None:
        return {"references": count, "loader": "none"}
    from agent import imageload  # late: imageload imports this module

    return {"references": count, **await imageload.load(ctx, spec)}
