"""Build the installer's :class:`~agent.install.model.Spec` from a verified, staged bundle.

The manifest comes from the agent's DB (stored at import, right after verification) and the
objects from the staged payload through :func:`bundles.content.load_objects`; both were
verified byte for byte before they were staged into the agent's private store.

Components the build could not render (``rendered: false``, e.g. a Helm chart with no helm at
build time) carry no objects: they are left out of the plan and listed as ``skipped``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.install import gates, model, render
from bundles import content
from bundles.manifest import Manifest, parse_manifest


class SpecError(Exception):
    """The bundle cannot be planned (a dependsOn cycle, an unknown dependency, ...)."""


def load_spec(*, manifest_json: str, bundle_id: str, path: str, default_timeout: float) -> model.Spec:
    manifest = parse_manifest(manifest_json.encode())
    staged = Path(path)
    units: list[model.Unit] = []
    for comp in manifest.components:
        if not comp.rendered or not comp.files:
            continue
        timeouts = [c.timeout_seconds for c in comp.health_checks]
        unit = model.Unit(
            name=comp.name,
            layer=comp.layer,
            tier=comp.tier,
            namespace=comp.namespace or "default",
            depends_on=tuple(comp.depends_on),
            gate_timeout=float(max(timeouts)) if timeouts else default_timeout,
            checks=[c.model_dump(by_alias=True, exclude_none=True) for c in comp.health_checks],
            images=list(comp.images),
        )
        units.append(unit)
    spec = model.Spec(
        bundle_id=bundle_id,
        name=manifest.name,
        version=manifest.version,
        release=manifest.release,
        created=manifest.created.isoformat(),
        path=path,
        units=units,
    )
    _render_all(spec, tiers=manifest.tiers, staged=staged, components={c.name: c for c in manifest.components})
    check_dag(spec)
    return spec


def declared_timeouts(manifest_json: str) -> dict[str, float | None]:
    """component → the largest declared check timeout, or None (the config's default applies)."""
    manifest = parse_manifest(manifest_json.encode())
    return {c.name: float(max(h.timeout_seconds for h in c.health_checks)) if c.health_checks else None
            for c in manifest.components}


def skipped(manifest_json: str) -> list[dict[str, Any]]:
    manifest = parse_manifest(manifest_json.encode())
    return [{"name": c.name, "needs": list(c.needs)} for c in manifest.components if not c.rendered or not c.files]


def _render_all(spec: model.Spec, *, tiers: Any, staged: Path, components: dict[str, Any]) -> None:
    """Load, render and pack one component at a time (peak memory: the largest component).

    CRD scopes are collected in a first cheap pass over the CRDs only, since a custom resource
    may come before... no: CRDs come from earlier or the same component; one pass suffices
    because the profile builder rejects custom resources whose CRD is applied later.
    """
    crds: dict[tuple[str, str], bool] = {}
    seen: dict[str, str] = {}
    for unit in spec.units:
        objects = content.load_objects(staged, components[unit.name])
        crds.update(render.crd_scopes(objects))
        rendered = []
        for obj in objects:
            out, changes = render.render(obj, unit=unit, bundle_label=spec.label, policy=tiers or None, crds=crds)
            key = model.Ref.of(out).key
            if key in seen:
                # Two components claiming one object would make prune and rollback ambiguous.
                raise SpecError(f"{model.Ref.of(out)} is in both {seen[key]} and {unit.name}")
            seen[key] = unit.name
            if changes:
                unit.placement[key] = changes
            rendered.append(out)
        unit.set_objects(rendered)
        unit.gate_checks = gates.unit_checks(unit, rendered)
        if not unit.images:
            unit.images = sorted(images_in(rendered))
        del objects, rendered


def check_dag(spec: model.Spec) -> None:
    names = {u.name: u for u in spec.units}
    for unit in spec.units:
        for dep in unit.depends_on:
            other = names.get(dep)
            if other is not None and other.layer > unit.layer:
                raise SpecError(f"component {unit.name} (layer {unit.layer}) depends on {dep} in later layer "
                                f"{other.layer}")
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise SpecError(f"dependsOn cycle: {' -> '.join((*trail, name))}")
        state[name] = 1
        for dep in names[name].depends_on:
            if dep in names:
                visit(dep, (*trail, name))
        state[name] = 2

    for name in names:
        visit(name, ())


def manifest_of(spec_json: str) -> Manifest:
    return parse_manifest(spec_json.encode())


def images_in(objects: list[dict[str, Any]]) -> set[str]:
    """Image references of every container in the objects' pod templates."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("containers", "initContainers", "ephemeralContainers"):
                for container in node.get(key) or []:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        found.add(container["image"])
            for value in node.values():
                if isinstance(value, dict | list):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for obj in objects:
        if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"):
            walk(obj.get("spec") or {})
    return found
