"""Build the installer's :class:`~agent.install.model.Spec` from a verified, staged bundle.

The manifest comes from the agent's DB (stored at import, right after verification) and the
objects from the staged payload through :func:`bundles.content.load_objects`; both were
verified byte for byte before they were staged into the agent's private store.

Components the build could not render (``rendered: false``, e.g. a Helm chart with no helm at
build time) carry no objects: they are left out of the plan and listed as ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """Load, render and pack one object at a time (peak memory: the largest object).

    A component is not parsed at once: the IDP's prometheus is 75 objects, 4.5 MB of YAML and
    ~11 MiB of dicts, and the renderer's heap stays at its high-water mark after such a burst.
    Each object is rendered and serialized as soon as it is parsed, except a custom resource
    whose CRD has not been seen yet: whether it is namespaced depends on that CRD, which may
    come later in the same component, so it waits (as a dict, in its place) for the end of the
    component. CRDs of later components never count, as before.
    """
    crds: dict[tuple[str, str], bool] = {}
    seen: dict[str, str] = {}
    for unit in spec.units:
        slots: list[_Rendered | dict[str, Any]] = []
        for obj in content.iter_objects(staged, components[unit.name]):
            crds.update(render.crd_scopes([obj]))
            group = str(obj.get("apiVersion", "")).rpartition("/")[0]
            if render.is_custom(obj) and (group, str(obj.get("kind", ""))) not in crds:
                slots.append(obj)  # maybe a custom resource of a CRD further down
            else:
                slots.append(_render_one(obj, unit=unit, spec=spec, tiers=tiers, crds=crds, seen=seen))
        done = [slot if isinstance(slot, _Rendered) else
                _render_one(slot, unit=unit, spec=spec, tiers=tiers, crds=crds, seen=seen) for slot in slots]
        del slots
        unit.set_documents([(r.key, r.kinds, r.line) for r in done])
        declared = [gates.normalise(c, namespace=unit.namespace) for c in unit.checks]
        have = {(c["kind"], c["namespace"], c["name"]) for c in declared}
        unit.gate_checks = declared + [c for r in done for c in r.checks
                                       if (c["kind"], c["namespace"], c["name"]) not in have]
        if not unit.images:
            unit.images = sorted({image for r in done for image in r.images})


@dataclass(frozen=True)
class _Rendered:
    key: str
    kinds: tuple[str, str]
    line: bytes
    checks: list[dict[str, Any]]
    images: set[str]


def _render_one(obj: dict[str, Any], *, unit: model.Unit, spec: model.Spec, tiers: Any,
                crds: dict[tuple[str, str], bool], seen: dict[str, str]) -> _Rendered:
    out, changes = render.render(obj, unit=unit, bundle_label=spec.label, policy=tiers or None, crds=crds)
    ref = model.Ref.of(out)
    if ref.key in seen:
        # Two components claiming one object would make prune and rollback ambiguous.
        raise SpecError(f"{ref} is in both {seen[ref.key]} and {unit.name}")
    seen[ref.key] = unit.name
    if changes:
        unit.placement[ref.key] = changes
    return _Rendered(key=ref.key, kinds=(str(out.get("apiVersion")), str(out.get("kind"))), line=model.dump(out),
                     checks=gates.implied_checks([out]), images=images_in([out]))


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
