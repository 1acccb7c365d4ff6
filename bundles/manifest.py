"""The bundle manifest (format v1): pydantic models and the canonical JSON that gets signed.

Public surface (stable):

- ``Manifest``: ``schema_version`` (1), ``name``, ``version`` (semver), ``release`` (monotonic int
  counter, the anti-rollback key), ``channel`` ("release" | "development": which trust-root role
  must sign), ``created`` / ``expires`` (aware UTC datetimes), ``compression`` ("zstd" | "none",
  the container's), ``compat`` (``kubernetes`` {min, max} minor versions inclusive, ``architectures``),
  ``files`` (``FileEntry``: path relative to the payload root, size, sha256, mode), ``components``,
  ``tiers`` ({1..4: ``TierPolicy``}), optional ``base`` (for delta bundles later).
  Helpers: ``component(name)``, ``file(path)``, ``install_order()``, ``payload_bytes``.
- ``Component``: ``name``, ``layer`` 0-4, ``tier`` 1-4, ``depends_on``, ``namespace`` (for namespaced
  objects that carry none), ``files`` (payload paths, in apply order), ``images``, ``health_checks``,
  ``source`` (``Source``: type, paths, ``helm`` pin), ``rendered`` (False = carried pinned but
  unrendered: it has no files and ``needs`` says what the build lacked, e.g. ["helm"]), ``partial``
  (what a rendered component lacks compared with its Helm pin, e.g. a controller Deployment).
  An installer skips unrendered components (``Manifest.installable()``).
- ``HealthCheck``: ``type`` in HEALTH_CHECK_TYPES, object ``name``/``namespace``, ``timeout_seconds``;
  for ``type == "condition"`` also ``api_version``, ``kind``, ``condition`` and ``status``.
- ``TierPolicy``: ``priority_class_name``, ``tolerate_control_plane``, ``spread``.
- ``canonical_json(model_or_dict) -> bytes`` and ``parse_manifest(bytes) -> Manifest``
  (raises ``errors.ManifestInvalid``, never anything else).

JSON field names are camelCase (``dependsOn``, ``healthChecks``, ``timeoutSeconds``,
``priorityClassName`` ...); Python attributes are snake_case. Models are frozen and reject unknown
fields: a v1 verifier must not silently ignore a field a later writer meant to be enforced.

Why canonical JSON (sorted keys, no whitespace, UTF-8) and a duplicate-key check: the signature
covers bytes, and two JSON parsers that disagree on duplicate keys would let a signer and a
verifier see different manifests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from bundles import errors

SCHEMA_VERSION = 1
PAYLOAD_TYPE = "application/vnd.edgefleet.bundle-manifest.v1+json"
HEALTH_CHECK_TYPES = (
    "deployment-available",
    "statefulset-ready",
    "daemonset-ready",
    "crd-established",
    "job-complete",
    "condition",
)
#: Where a bundle carries its images (under ``payload/``): an OCI image layout plus the image
#: list ``META_NAME`` (see :mod:`bundles.images`). Here, not there, so that a reader asking only
#: "does this bundle carry images?" (the agent, per install) does not import the image tooling.
IMAGES_DIR = "images"
IMAGES_META_NAME = "edgefleet-images.json"


def images_layout(bundle_dir: Path) -> Path | None:
    """The OCI image layout of a staged bundle (``payload/images``), or None if it carries no images."""
    layout = bundle_dir / "payload" / IMAGES_DIR
    return layout if (layout / IMAGES_META_NAME).is_file() else None

MAX_PATH_LEN = 240  # "payload/" + path must fit a ustar name+prefix (255)
MAX_FILES = 100_000
MAX_COMPONENTS = 1_000

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KUBE_MINOR = re.compile(r"^1\.(0|[1-9]\d{0,2})$")
_PATH_PART = re.compile(r"^[A-Za-z0-9._@+=,~-]+$")


def check_path(path: str) -> str:
    """Validate a payload path: relative POSIX, no ``..``/``.``/empty parts, a safe alphabet.

    The alphabet excludes backslashes, colons, spaces and control characters so a path means the
    same thing on every filesystem and in every log line. Used both for the manifest and for tar
    member names (which raise ``errors.UnsafePath`` there).
    """
    if not path or len(path) > MAX_PATH_LEN:
        raise ValueError(f"path {path[:60]!r} is empty or longer than {MAX_PATH_LEN} characters")
    if path.startswith("/"):
        raise ValueError(f"path {path[:60]!r} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"path {path[:60]!r} has an empty, '.' or '..' component")
        if not _PATH_PART.match(part):
            raise ValueError(f"path {path[:60]!r} has characters outside [A-Za-z0-9._@+=,~-]")
    return path


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must carry a timezone (use UTC, e.g. 2026-01-01T00:00:00Z)")
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True, strict=False
    )


class FileEntry(_Model):
    path: str
    size: int = Field(ge=0)
    sha256: str
    mode: int = 0o644

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_path(v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: int) -> int:
        # Only rw-r--r-- or rwxr-xr-x: no setuid/sticky bits, nothing group/world-writable.
        if v not in (0o644, 0o755):
            raise ValueError(f"mode {v:o} is not 644 or 755")
        return v


class HelmPin(_Model):
    repo: str
    chart: str
    version: str
    values: str | None = None  # path of the values file in the platform source, if any


class Source(_Model):
    """Where a component came from. ``paths`` are "<kind>:<path>" entries in render order, e.g.
    "mirror:argo-cd/v3.1.8/manifests/install.yaml", "kustomize:IT/gateway", "platform:IT/x.yaml",
    "inline:extra-namespaces.yaml", "helm:cilium"."""

    type: Literal["files", "kustomize", "helm", "mirror"]
    paths: tuple[str, ...] = ()
    helm: HelmPin | None = None


class HealthCheck(_Model):
    type: Literal[
        "deployment-available", "statefulset-ready", "daemonset-ready", "crd-established", "job-complete", "condition"
    ]
    name: str
    namespace: str | None = None
    timeout_seconds: int = Field(default=300, ge=1, le=86_400)
    # Only for type == "condition": the object and the condition that must hold.
    api_version: str | None = None
    kind: str | None = None
    condition: str | None = None
    status: str = "True"

    @model_validator(mode="after")
    def _condition_fields(self) -> HealthCheck:
        if self.type == "condition" and not (self.api_version and self.kind and self.condition):
            raise ValueError("a 'condition' health check needs apiVersion, kind and condition")
        return self


class Component(_Model):
    name: str
    layer: int = Field(ge=0, le=4)
    tier: int = Field(ge=1, le=4)
    depends_on: tuple[str, ...] = ()
    namespace: str | None = None
    files: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    health_checks: tuple[HealthCheck, ...] = ()
    source: Source
    rendered: bool = True
    needs: tuple[str, ...] = ()  # what the build lacked for this component, e.g. ("helm",)
    partial: tuple[str, ...] = ()  # what a rendered component lacks compared with its Helm pin
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"component name {v[:70]!r} is not a DNS label")
        return v

    @model_validator(mode="after")
    def _rendered(self) -> Component:
        if not self.rendered and self.files:
            raise ValueError(f"component {self.name}: an unrendered component carries no files")
        return self


class TierPolicy(_Model):
    priority_class_name: str | None = None
    tolerate_control_plane: bool = False
    spread: bool = False


class KubernetesRange(_Model):
    min: str = "1.28"
    max: str = "1.34"

    @field_validator("min", "max")
    @classmethod
    def _minor(cls, v: str) -> str:
        if not _KUBE_MINOR.match(v):
            raise ValueError(f"kubernetes version {v[:20]!r} is not of the form 1.N")
        return v

    def contains(self, version: str) -> bool:
        """``version`` may be "1.33", "v1.33.2" or "1.33.2+k3s1": only major.minor count."""
        m = re.match(r"^v?(\d+)\.(\d+)", version.strip())
        if not m:
            return False
        v = (int(m.group(1)), int(m.group(2)))
        return _minor_tuple(self.min) <= v <= _minor_tuple(self.max)


def _minor_tuple(v: str) -> tuple[int, int]:
    a, b = v.split(".")
    return int(a), int(b)


class Compat(_Model):
    kubernetes: KubernetesRange = KubernetesRange()
    architectures: tuple[str, ...] = ("amd64", "arm64")


class BaseRef(_Model):
    name: str
    version: str
    release: int = Field(ge=0)


class Manifest(_Model):
    schema_version: Literal[1] = 1
    name: str
    version: str
    release: int = Field(ge=0, le=2**53)
    channel: Literal["release", "development"] = "release"
    created: UtcDatetime
    expires: UtcDatetime
    compression: Literal["zstd", "none"] = "zstd"
    compat: Compat = Compat()
    files: tuple[FileEntry, ...] = ()
    components: tuple[Component, ...] = ()
    tiers: dict[int, TierPolicy] = Field(default_factory=dict)
    base: BaseRef | None = None
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"bundle name {v[:70]!r} is not a DNS label")
        return v

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError(f"version {v[:40]!r} is not semver")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.expires <= self.created:
            raise ValueError("expires must be after created")
        if len(self.files) > MAX_FILES or len(self.components) > MAX_COMPONENTS:
            raise ValueError("too many files or components")
        paths: set[str] = set()
        folded: set[str] = set()
        for f in self.files:
            if f.path.casefold() in folded:
                raise ValueError(f"file {f.path!r} is listed twice (paths compare case-insensitively)")
            paths.add(f.path)
            folded.add(f.path.casefold())
        for f in self.files:  # "a" and "a/b" cannot both be files
            parts = f.path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in paths:
                    raise ValueError(f"file {f.path!r} lies under another listed file")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError("component names are not unique")
        for c in self.components:
            for p in c.files:
                if p not in paths:
                    raise ValueError(f"component {c.name}: file {p!r} is not in the manifest's files")
            for d in c.depends_on:
                if d not in names:
                    raise ValueError(f"component {c.name}: dependsOn {d!r} is not a component")
            if c.tier not in self.tiers and self.tiers:
                raise ValueError(f"component {c.name}: tier {c.tier} has no tier policy")
        for t in self.tiers:
            if not 1 <= t <= 4:
                raise ValueError(f"tier {t} is not 1-4")
        _topological([(c.name, c.depends_on) for c in self.components])
        return self

    # -- helpers -----------------------------------------------------------------------------

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def payload_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def install_order(self) -> list[Component]:
        """Components ordered by layer, then dependencies, then profile order (stable)."""
        return order_components(self.components)

    def installable(self) -> list[Component]:
        """``install_order()`` minus unrendered components and anything depending on one."""
        blocked: set[str] = set()
        out = []
        for c in self.install_order():
            if not c.rendered or any(d in blocked for d in c.depends_on):
                blocked.add(c.name)
                continue
            out.append(c)
        return out

    def label(self) -> str:
        """``<name>-<version>``: the value of the ``edgefleet.io/bundle`` label."""
        return f"{self.name}-{self.version}"


def order_components(components: Iterable[Component]) -> list[Component]:
    """Layer first, then dependencies (a dependency always comes before its dependents), then input order."""
    comps = list(components)
    by_name = {c.name: c for c in comps}
    order = _topological([(c.name, c.depends_on) for c in comps], layers={c.name: c.layer for c in comps})
    return [by_name[n] for n in order]


def _topological(
    nodes: Iterable[tuple[str, Iterable[str]]], *, layers: dict[str, int] | None = None
) -> list[str]:
    items = [(n, tuple(d)) for n, d in nodes]
    index = {n: i for i, (n, _) in enumerate(items)}
    deps = dict(items)
    done: list[str] = []
    state: dict[str, int] = {}

    def order_key(x: str) -> tuple[int, int]:
        return (layers or {}).get(x, 0), index.get(x, 0)

    def visit(n: str, stack: tuple[str, ...]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ValueError(f"dependency cycle: {' -> '.join((*stack, n))}")
        state[n] = 1
        for d in sorted(deps.get(n, ()), key=order_key):
            if d in deps:
                visit(d, (*stack, n))
        state[n] = 2
        done.append(n)

    for n in sorted(deps, key=order_key):
        visit(n, ())
    return done


def canonical_json(value: BaseModel | dict[str, Any] | list[Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8, camelCase aliases, ``None`` fields omitted."""
    doc = value.model_dump(mode="json", by_alias=True, exclude_none=True) if isinstance(value, BaseModel) else value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k[:40]!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def loads_strict(data: bytes) -> Any:
    """``json.loads`` that rejects duplicate keys, NaN/Infinity and non-UTF-8."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def parse_manifest(data: bytes) -> Manifest:
    """Parse signed manifest bytes. Any defect raises ``errors.ManifestInvalid`` (one line)."""
    try:
        doc = loads_strict(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise errors.ManifestInvalid(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.ManifestInvalid("manifest is not a JSON object")
    if doc.get("schemaVersion") != SCHEMA_VERSION:
        raise errors.ManifestInvalid(f"manifest schemaVersion {str(doc.get('schemaVersion'))[:20]} is not 1")
    try:
        return Manifest.model_validate(doc)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = first.get("msg", "invalid")
        raise errors.ManifestInvalid(f"manifest invalid at {where or '<root>'}: {msg}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise errors.ManifestInvalid(f"manifest invalid: {exc}") from None


def now_utc() -> datetime:
    return datetime.now(UTC)
