"""Build a bundle from a profile, the platform source and an optional offline mirror.

Public surface (stable): ``load_profile(path) -> Profile``, ``build(...) -> BuildResult``,
``render(...) -> Rendered`` (everything but writing the bundle), ``DEFAULT_PROFILE``.

A profile (``bundles/profiles/idp-platform.yaml``) lists components with their layer, tier,
dependencies, default namespace, Helm pin and sources. Sources, rendered in order into payload
files ``<component>/<NNN>-<name>`` (the apply order):

- ``platform: PATH`` / ``mirror: PATH``: a file, or a directory's ``*.yaml``/``*.yml`` (sorted, not
  recursive; ``includeFiles``/``excludeFiles`` globs). Copied byte for byte.
- ``kustomize: DIR`` (``exclude: [{kind: K}]`` drops objects): ``kubectl kustomize`` (or ``kustomize build``).
- ``inline: NAME`` with ``objects``: small objects the profile itself defines.
- ``helm``: when helm is on PATH, ``helm template`` renders the pinned chart and replaces the
  component's mirror sources (IDP-local sources are kept); without helm, or with ``prefer_mirror``,
  the mirror sources are used. A component with a pin and no other source needs helm.

A component that cannot be rendered fails the build naming the component and what is missing,
unless ``allow_unrendered``: then it is carried pinned but unrendered (``rendered: false``,
``needs: ["helm"]``) and the result lists it.

The build also checks what a Kubernetes 1.33 API server would refuse, so a bundle never fails
half-way through an install: removed API versions, invalid object names (DNS-1123/1035), custom
resources whose CRD is not applied earlier, namespaced objects whose namespace is not created
earlier (``default``, ``kube-system``, ``kube-public``, ``kube-node-lease`` exist everywhere), and
the same object owned by two components. Health checks are derived from the rendered workloads
(Deployments Available, StatefulSets/DaemonSets ready, CRDs Established, Jobs complete) unless the
profile lists them; images are collected from every pod template.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from bundles import container, content, errors, pack
from bundles import images as bundle_images
from bundles.manifest import (
    Compat,
    Component,
    FileEntry,
    HealthCheck,
    HelmPin,
    Manifest,
    Source,
    TierPolicy,
    now_utc,
    order_components,
)

DEFAULT_PROFILE = Path(__file__).resolve().parent / "profiles" / "idp-platform.yaml"
EXISTING_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
RENDER_TIMEOUT = 300

# Built-in API groups of Kubernetes 1.33 (objects of any other group need a CRD).
BUILTIN_GROUPS = frozenset({
    "", "apps", "batch", "autoscaling", "policy", "rbac.authorization.k8s.io", "networking.k8s.io",
    "scheduling.k8s.io", "apiextensions.k8s.io", "admissionregistration.k8s.io", "apiregistration.k8s.io",
    "storage.k8s.io", "coordination.k8s.io", "discovery.k8s.io", "certificates.k8s.io", "node.k8s.io",
    "flowcontrol.apiserver.k8s.io", "events.k8s.io", "authentication.k8s.io", "authorization.k8s.io",
    "resource.k8s.io", "internal.apiserver.k8s.io", "storagemigration.k8s.io",
})
CLUSTER_SCOPED = frozenset({
    "Namespace", "Node", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "StorageClass", "PriorityClass", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding", "APIService", "CSIDriver", "CSINode", "RuntimeClass", "IngressClass",
    "VolumeAttachment", "CertificateSigningRequest", "FlowSchema", "PriorityLevelConfiguration",
    "ComponentStatus", "ClusterTrustBundle", "DeviceClass", "IPAddress", "ServiceCIDR", "VolumeAttributesClass",
})
REMOVED_APIS = frozenset({
    "extensions/v1beta1", "apps/v1beta1", "apps/v1beta2", "rbac.authorization.k8s.io/v1beta1",
    "rbac.authorization.k8s.io/v1alpha1", "apiextensions.k8s.io/v1beta1", "admissionregistration.k8s.io/v1beta1",
    "policy/v1beta1", "networking.k8s.io/v1beta1", "scheduling.k8s.io/v1beta1", "scheduling.k8s.io/v1alpha1",
    "batch/v1beta1", "autoscaling/v2beta1", "autoscaling/v2beta2", "flowcontrol.apiserver.k8s.io/v1beta1",
    "flowcontrol.apiserver.k8s.io/v1beta2", "flowcontrol.apiserver.k8s.io/v1beta3", "discovery.k8s.io/v1beta1",
    "events.k8s.io/v1beta1", "certificates.k8s.io/v1beta1", "coordination.k8s.io/v1beta1", "node.k8s.io/v1beta1",
    "storage.k8s.io/v1alpha1", "apiregistration.k8s.io/v1beta1",
})
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --- the profile -----------------------------------------------------------------------------------


class _P(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ProfileHelm(_P):
    repo: str
    chart: str
    version: str
    values: str | None = None
    pinned_in: str | None = None  # Chart.yaml or kustomization.yaml (helmCharts) to cross-check the pin
    release_name: str | None = None


class ProfileSource(_P):
    platform: str | None = None
    mirror: str | None = None
    kustomize: str | None = None
    inline: str | None = None
    objects: list[dict[str, Any]] = Field(default_factory=list)
    include_files: list[str] = Field(default_factory=list)
    exclude_files: list[str] = Field(default_factory=list)
    exclude: list[dict[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one(self) -> ProfileSource:
        given = [k for k in ("platform", "mirror", "kustomize", "inline") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("a source needs exactly one of platform, mirror, kustomize, inline")
        if self.inline and not self.objects:
            raise ValueError("an inline source needs objects")
        return self

    @property
    def kind(self) -> str:
        for k in ("platform", "mirror", "kustomize", "inline"):
            if getattr(self, k):
                return k
        raise AssertionError

    @property
    def where(self) -> str:
        return str(getattr(self, self.kind))


class ProfileComponent(_P):
    name: str
    layer: int
    tier: int
    namespace: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    description: str | None = None
    partial: list[str] = Field(default_factory=list)
    helm: ProfileHelm | None = None
    sources: list[ProfileSource] = Field(default_factory=list)
    health_checks: list[HealthCheck] | None = None
    health_timeout_seconds: int | None = None


class Profile(_P):
    name: str
    description: str | None = None
    version: str | None = None
    expires_days: int = 180
    compat: Compat = Compat()
    tiers: dict[int, TierPolicy]
    health_timeout_seconds: int = 300
    components: list[ProfileComponent]
    #: Image-valued fields of custom resources (docs/images.md), e.g. {kind: Prometheus, path: spec.image}.
    image_fields: list[bundle_images.ImageField] = Field(default_factory=list)


def load_profile(path: Path) -> Profile:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Profile.model_validate(doc)
    except OSError as exc:
        raise errors.BuildError(f"cannot read profile {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise errors.BuildError(f"profile {path} is not valid YAML: {exc}") from None
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise errors.BuildError(f"profile {path} invalid at {where}: {first.get('msg')}") from None


# --- rendering -------------------------------------------------------------------------------------


@dataclass
class Tools:
    kubectl: str | None = field(default_factory=lambda: shutil.which("kubectl"))
    kustomize: str | None = field(default_factory=lambda: shutil.which("kustomize"))
    helm: str | None = field(default_factory=lambda: shutil.which("helm"))


@dataclass
class Rendered:
    components: list[Component]
    files: list[FileEntry]
    sources: dict[str, Path]
    needs_helm: list[str]
    object_count: int


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    needs_helm: tuple[str, ...]
    object_count: int
    envelope: bytes


def _run(cmd: Sequence[str], *, what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=RENDER_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.BuildError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split())[:300]
        raise errors.BuildError(f"{what}: {Path(cmd[0]).name} failed: {err}")
    return proc.stdout


def _list_dir(path: Path, src: ProfileSource) -> list[Path]:
    skip = {"kustomization.yaml", "kustomization.yml", "Chart.yaml"}
    out = []
    for p in sorted(path.iterdir(), key=lambda x: x.name):
        if not p.is_file() or p.suffix not in (".yaml", ".yml") or p.name in skip or p.name.startswith("values"):
            continue
        if src.include_files and not any(fnmatch.fnmatch(p.name, g) for g in src.include_files):
            continue
        if any(fnmatch.fnmatch(p.name, g) for g in src.exclude_files):
            continue
        out.append(p)
    return out


def _filter_docs(text: str, exclude: list[dict[str, str]], *, what: str) -> str:
    if not exclude:
        return text
    kept = []
    for chunk in re.split(r"(?m)^---[ \t]*\n", text):
        if not chunk.strip():
            continue
        docs = content.parse_documents(chunk, source=what)
        if docs and any(all(d.get(k) == v for k, v in rule.items()) for d in docs for rule in exclude):
            continue
        kept.append(chunk if chunk.endswith("\n") else chunk + "\n")
    return "---\n".join(kept)


def _check_pin(comp: ProfileComponent, platform: Path) -> None:
    pin = comp.helm
    if pin is None or pin.pinned_in is None:
        return
    path = platform / pin.pinned_in
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise errors.BuildError(f"component {comp.name}: cannot read the pin in {pin.pinned_in}: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.BuildError(f"component {comp.name}: {pin.pinned_in} is not a mapping")
    if "helmCharts" in doc:
        entries = [e for e in doc["helmCharts"] or [] if isinstance(e, dict) and e.get("name") == pin.chart]
        if not entries:
            raise errors.BuildError(f"component {comp.name}: {pin.pinned_in} has no helmCharts entry {pin.chart}")
        found_version, found_repo = str(entries[0].get("version")), str(entries[0].get("repo", ""))
        if found_repo.rstrip("/") != pin.repo.rstrip("/"):
            raise errors.BuildError(
                f"component {comp.name}: profile pins repo {pin.repo} but {pin.pinned_in} says {found_repo}"
            )
    else:
        found_version = str(doc.get("version"))
    if found_version != pin.version:
        raise errors.BuildError(
            f"component {comp.name}: profile pins {pin.chart} {pin.version} but {pin.pinned_in} says {found_version}"
        )


def _helm_pin(comp: ProfileComponent) -> HelmPin | None:
    if comp.helm is None:
        return None
    return HelmPin(repo=comp.helm.repo, chart=comp.helm.chart, version=comp.helm.version, values=comp.helm.values)


def render(
    profile: Profile,
    *,
    platform: Path,
    mirror: Path | None,
    work: Path,
    tools: Tools | None = None,
    allow_unrendered: bool = False,
    prefer_mirror: bool = False,
) -> Rendered:
    """Render every component into ``work`` and validate the result; no bundle is written."""
    tools = tools or Tools()
    if not platform.is_dir():
        raise errors.BuildError(f"platform source {platform} is not a directory")
    components: list[Component] = []
    files: list[FileEntry] = []
    sources: dict[str, Path] = {}
    needs_helm: list[str] = []
    objects_by_component: dict[str, list[dict[str, Any]]] = {}

    for comp in profile.components:
        _check_pin(comp, platform)
        srcs = list(comp.sources)
        has_mirror = any(s.kind == "mirror" for s in srcs)
        # helm template where helm exists, otherwise the mirror (or --prefer-mirror: the mirror first).
        use_helm = comp.helm is not None and (
            not srcs or (tools.helm is not None and not (prefer_mirror and has_mirror))
        )
        if use_helm:
            srcs = [s for s in srcs if s.kind != "mirror"]
        if use_helm and tools.helm is None:
            assert comp.helm is not None
            if not allow_unrendered:
                raise errors.BuildError(
                    f"component {comp.name}: needs helm to render chart {comp.helm.chart} {comp.helm.version} "
                    f"({comp.helm.repo}) and helm is not on PATH; use --allow-unrendered to carry it pinned"
                )
            needs_helm.append(comp.name)
            components.append(_component(profile, comp, files=(), objects=[], paths=(f"helm:{comp.helm.chart}",),
                                         stype="helm", rendered=False))
            objects_by_component[comp.name] = []
            continue

        writer = _Writer(work=work, component=comp.name, files=files, sources=sources)
        source_paths: list[str] = []
        emit = writer.emit

        if use_helm:
            assert comp.helm is not None and tools.helm is not None
            cmd = [tools.helm, "template", comp.helm.release_name or comp.name, comp.helm.chart,
                   "--repo", comp.helm.repo, "--version", comp.helm.version, "--namespace", comp.namespace or "default"]
            if comp.helm.values:
                cmd += ["--values", str(platform / comp.helm.values)]
            text = _run(cmd, what=f"component {comp.name}: helm template {comp.helm.chart} {comp.helm.version}")
            emit(f"helm-{comp.helm.chart}.yaml", text=text, origin=f"helm:{comp.helm.chart}")
            source_paths.append(f"helm:{comp.helm.chart}")

        for src in srcs:
            label = f"{src.kind}:{src.where}"
            source_paths.append(label)
            if src.kind == "inline":
                emit(src.where, text=yaml.safe_dump_all(src.objects, sort_keys=False), origin=label)
                continue
            if src.kind == "mirror" and mirror is None:
                raise errors.BuildError(f"component {comp.name}: source {label} needs the offline mirror (--mirror)")
            base = mirror if src.kind == "mirror" else platform
            assert base is not None
            path = base / src.where
            if not path.exists():
                raise errors.BuildError(f"component {comp.name}: {label} does not exist ({path})")
            if src.kind == "kustomize":
                if tools.kubectl:
                    cmd = [tools.kubectl, "kustomize", str(path)]
                elif tools.kustomize:
                    cmd = [tools.kustomize, "build", str(path)]
                else:
                    raise errors.BuildError(
                        f"component {comp.name}: kustomize dir {src.where} needs kubectl or kustomize on PATH"
                    )
                text = _run(cmd, what=f"component {comp.name}: kustomize {src.where}")
                text = _filter_docs(text, src.exclude, what=label)
                emit(f"{path.name}.yaml", text=text, origin=label)
            elif path.is_dir():
                listed = _list_dir(path, src)
                if not listed:
                    raise errors.BuildError(f"component {comp.name}: {label} has no YAML files")
                for p in listed:
                    emit(p.name, copy_from=p, origin=f"{label}/{p.name}")
            else:
                emit(path.name, copy_from=path, origin=label)

        if not writer.paths:
            raise errors.BuildError(f"component {comp.name}: rendered no objects")
        stype: Literal["files", "kustomize", "helm", "mirror"] = (
            "helm" if use_helm else "mirror" if any(s.kind == "mirror" for s in srcs)
            else "kustomize" if any(s.kind == "kustomize" for s in srcs) else "files"
        )
        components.append(_component(profile, comp, files=tuple(writer.paths), objects=writer.objects,
                                     paths=tuple(source_paths), stype=stype, rendered=True))
        objects_by_component[comp.name] = writer.objects

    _validate(components, objects_by_component, tiers=profile.tiers)
    total = sum(len(v) for v in objects_by_component.values())
    return Rendered(components=components, files=files, sources=sources, needs_helm=needs_helm, object_count=total)


class _Writer:
    """Writes one component's payload files as ``<component>/<NNN>-<name>`` and parses each."""

    def __init__(self, *, work: Path, component: str, files: list[FileEntry], sources: dict[str, Path]) -> None:
        self.work, self.component, self.files, self.sources = work, component, files, sources
        (work / component).mkdir(parents=True, exist_ok=True)
        self.paths: list[str] = []
        self.objects: list[dict[str, Any]] = []

    def emit(self, name: str, *, text: str | None = None, copy_from: Path | None = None, origin: str) -> None:
        rel = f"{self.component}/{len(self.paths) + 1:03d}-{_SAFE_NAME.sub('_', name)}"
        target = self.work / rel
        try:
            if copy_from is not None:
                shutil.copyfile(copy_from, target)
                body = target.read_text(encoding="utf-8")
            else:
                assert text is not None
                target.write_text(text, encoding="utf-8")
                body = text
        except (OSError, UnicodeDecodeError) as exc:
            raise errors.BuildError(f"component {self.component}: cannot read {origin}: {exc}") from None
        try:
            docs = content.parse_documents(body, source=origin)
        except content.ContentError as exc:
            raise errors.BuildError(f"component {self.component}: {exc}") from None
        if not docs:
            target.unlink()
            return
        self.objects.extend(docs)
        self.files.append(pack.file_entry(rel, target, mode=0o644))
        self.sources[rel] = target
        self.paths.append(rel)


def _component(
    profile: Profile,
    comp: ProfileComponent,
    *,
    files: tuple[str, ...],
    objects: list[dict[str, Any]],
    paths: tuple[str, ...],
    stype: Literal["files", "kustomize", "helm", "mirror"],
    rendered: bool,
) -> Component:
    timeout = comp.health_timeout_seconds or profile.health_timeout_seconds
    checks = tuple(comp.health_checks) if comp.health_checks is not None else _health_checks(
        objects, namespace=comp.namespace, timeout=timeout
    )
    try:
        return Component(
            name=comp.name,
            layer=comp.layer,
            tier=comp.tier,
            depends_on=tuple(comp.depends_on),
            namespace=comp.namespace,
            files=files,
            images=tuple(sorted(_images(objects))),
            health_checks=checks,
            source=Source(type=stype, paths=paths, helm=_helm_pin(comp)),
            rendered=rendered,
            needs=() if rendered else ("helm",),
            partial=tuple(comp.partial),
            description=comp.description,
        )
    except pydantic.ValidationError as exc:
        raise errors.BuildError(f"component {comp.name}: {exc.errors()[0].get('msg')}") from None


def _health_checks(objects: list[dict[str, Any]], *, namespace: str | None, timeout: int) -> tuple[HealthCheck, ...]:
    types = {
        "Deployment": "deployment-available",
        "StatefulSet": "statefulset-ready",
        "DaemonSet": "daemonset-ready",
        "CustomResourceDefinition": "crd-established",
        "Job": "job-complete",
    }
    checks = []
    for obj in objects:
        kind = obj.get("kind")
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        if kind not in types or (kind != "CustomResourceDefinition" and group not in ("apps", "batch")):
            continue
        meta = obj.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        if "helm.sh/hook" in annotations:
            continue
        ns = None if kind == "CustomResourceDefinition" else (meta.get("namespace") or namespace)
        checks.append(
            HealthCheck(type=types[kind], name=str(meta.get("name")), namespace=ns, timeout_seconds=timeout)
        )
    return tuple(checks)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    tmpl = (spec.get("template") or {}).get("spec") if isinstance(spec, dict) else None
    return [tmpl] if isinstance(tmpl, dict) else []


def _images(objects: list[dict[str, Any]]) -> set[str]:
    images: set[str] = set()
    for obj in objects:
        for pod in _pod_specs(obj):
            for key in ("initContainers", "containers", "ephemeralContainers"):
                for c in pod.get(key) or []:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        images.add(c["image"])
    return images


def _validate(
    components: list[Component], objects: dict[str, list[dict[str, Any]]], *, tiers: dict[int, TierPolicy]
) -> None:
    """What a 1.33 API server would refuse, checked in install order over the whole bundle."""
    order = order_components(components)
    crds: dict[tuple[str, str], str] = {}  # (group, kind) -> scope
    namespaces = set(EXISTING_NAMESPACES)
    owners: dict[tuple[str, str, str, str], str] = {}
    for comp in order:
        for obj in objects.get(comp.name, []):
            api = str(obj.get("apiVersion"))
            kind = str(obj.get("kind"))
            meta = obj.get("metadata") or {}
            name = str(meta.get("name") or "")
            what = f"component {comp.name}: {kind} {name or '<no name>'}"
            if api in REMOVED_APIS:
                raise errors.BuildError(f"{what}: {api} is not served by Kubernetes 1.33")
            group = api.rpartition("/")[0]
            if group == "rbac.authorization.k8s.io":  # RBAC names are path segments ("system:foo")
                if not name or name in (".", "..") or "/" in name or "%" in name:
                    raise errors.BuildError(f"{what}: name is not a valid path segment")
            elif not name or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
                raise errors.BuildError(f"{what}: name is not a valid DNS-1123 subdomain")
            if kind == "Service" and group == "" and not _DNS1035_LABEL.match(name):
                raise errors.BuildError(f"{what}: a Service name must be a DNS-1035 label")
            if group in BUILTIN_GROUPS:
                namespaced = kind not in CLUSTER_SCOPED
            elif (group, kind) in crds:
                namespaced = crds[(group, kind)] == "Namespaced"
            else:
                raise errors.BuildError(f"{what}: no CRD for {kind}.{group} is applied before it")
            ns = ""
            if namespaced:
                ns = str(meta.get("namespace") or comp.namespace or "")
                if not ns:
                    raise errors.BuildError(f"{what}: namespaced object without a namespace (set the component's)")
                if ns not in namespaces:
                    raise errors.BuildError(f"{what}: namespace {ns} is not created before it")
            key = (group, kind, ns, name)
            if key in owners:
                raise errors.BuildError(f"{what}: also shipped by component {owners[key]} (alternative files?)")
            owners[key] = comp.name
            if kind == "Namespace" and group == "":
                namespaces.add(name)
            if kind == "CustomResourceDefinition" and group == "apiextensions.k8s.io":
                spec = obj.get("spec") or {}
                crd_group = str(spec.get("group", ""))
                crd_kind = str((spec.get("names") or {}).get("kind", ""))
                crds[(crd_group, crd_kind)] = str(spec.get("scope", "Namespaced"))
    for comp in components:
        if comp.tier not in tiers:
            raise errors.BuildError(f"component {comp.name}: tier {comp.tier} has no tier policy in the profile")
    pc_objs = [o for objs in objects.values() for o in objs if o.get("kind") == "PriorityClass"]
    pcs = {str((o.get("metadata") or {}).get("name")) for o in pc_objs}
    defaults = [str((o.get("metadata") or {}).get("name")) for o in pc_objs if o.get("globalDefault")]
    if len(defaults) > 1:
        raise errors.BuildError(f"PriorityClasses {', '.join(defaults)} are all globalDefault (at most one may be)")
    for o in pc_objs:
        if not isinstance(o.get("value"), int) or o["value"] > 1_000_000_000:
            raise errors.BuildError(
                f"PriorityClass {(o.get('metadata') or {}).get('name')}: value must be an integer <= 1000000000"
            )
    for t, pol in tiers.items():
        if pol.priority_class_name and pol.priority_class_name not in pcs:
            raise errors.BuildError(f"tier {t}: PriorityClass {pol.priority_class_name} is not in the bundle")


def build(
    *,
    profile: Path,
    platform: Path,
    mirror: Path | None,
    out: Path,
    version: str,
    release: int,
    keys: Sequence[Ed25519PrivateKey] = (),
    allow_unrendered: bool = False,
    prefer_mirror: bool = False,
    created: datetime | None = None,
    expires: datetime | None = None,
    compression: Literal["zstd", "none"] = "zstd",
    channel: Literal["release", "development"] = "release",
    tools: Tools | None = None,
    level: int = container.ZSTD_LEVEL,
    images: bundle_images.Options | None = None,
) -> BuildResult:
    """``images``: carry the referenced container images (docs/images.md); None builds without them."""
    prof = load_profile(profile)
    created = created or now_utc()
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        rendered = render(
            prof, platform=platform, mirror=mirror, work=Path(tmp), tools=tools,
            allow_unrendered=allow_unrendered, prefer_mirror=prefer_mirror,
        )
        compat, base = prof.compat, None
        if images is not None:
            carried = bundle_images.add_images(rendered.components, rendered.sources, fields=prof.image_fields,
                                               options=images, work=Path(tmp) / "_images")
            rendered.files.extend(carried.files)
            rendered.sources.update(carried.sources)
            compat = Compat(kubernetes=prof.compat.kubernetes, architectures=tuple(images.arches))
            base = carried.base
        try:
            manifest = Manifest(
                name=prof.name,
                version=version,
                release=release,
                channel=channel,
                created=created,
                expires=expires or created + timedelta(days=prof.expires_days),
                compression=compression,
                compat=compat,
                base=base,
                files=tuple(rendered.files),
                components=tuple(rendered.components),
                tiers=prof.tiers,
                description=prof.description,
            )
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise errors.BuildError(f"manifest invalid at {where}: {first.get('msg')}") from None
        env = pack.write_bundle(out, manifest=manifest, sources=rendered.sources, keys=keys, level=level)
    return BuildResult(
        path=out, manifest=manifest, needs_helm=tuple(rendered.needs_helm),
        object_count=rendered.object_count, envelope=env,
    )
