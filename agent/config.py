"""Agent configuration: a pydantic model loaded from YAML, with environment overrides.

Environment variables win over the file, named ``EDGEFLEET_AGENT_<FIELD>`` and
``EDGEFLEET_AGENT_<SECTION>__<FIELD>`` (e.g. ``EDGEFLEET_AGENT_LINK__HOST=hub.example``).
Unknown keys are errors, not silently ignored: a typo in a config file must not become a
default that nobody asked for. Any mistake is reported as one line naming the field.

The overrides are read here (:func:`environment`) rather than by pydantic-settings, which the hub
uses: with its dotenv, cloud-secret and CLI sources it costs every agent process ~3.5 MiB of RSS
(``docs/operations.md``, "Memory") for the twenty lines below. The rules are pydantic-settings'
(``env_prefix``, ``env_nested_delimiter="__"``): names are case-insensitive, a value for a list,
mapping or section is JSON, anything else is a string pydantic converts, and the overrides are
merged into the file's sections key by key.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent import protocol

DEFAULT_PATH = Path("/etc/edgefleet/agent.yaml")


class ConfigError(Exception):
    """A config problem, already phrased as one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpConfig(_Section):
    """Local health and metrics endpoint (agent/http.py). Keep it on loopback: it is unauthenticated."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests); the chosen port is logged and stored under ``daemon.http``.
    port: int = Field(default=9477, ge=0, le=65535)


class DaemonConfig(_Section):
    """Task supervision and lifecycle of ``edgefleet-agent run`` (agent/daemon.py)."""

    #: Restart backoff of a crashed task: doubles from ``initial`` up to ``max``, with +-20 % jitter.
    restart_initial_seconds: float = Field(default=1.0, gt=0)
    restart_max_seconds: float = Field(default=60.0, gt=0)
    #: A task that ran this long before crashing starts its backoff over.
    restart_reset_seconds: float = Field(default=300.0, gt=0)
    #: On SIGTERM, how long tasks get to finish after being cancelled (keep below systemd's TimeoutStopSec).
    drain_seconds: float = Field(default=10.0, ge=0)
    #: How often the daemon asks the API server for /version (feeds /readyz and ``kube_up``).
    kube_probe_interval_seconds: float = Field(default=15.0, gt=0)
    #: /readyz fails when the last successful API answer is older than this.
    kube_contact_max_age_seconds: float = Field(default=60.0, gt=0)
    #: How often STATUS= (systemd) and the derived metrics are refreshed.
    status_interval_seconds: float = Field(default=10.0, gt=0)


class InstallConfig(_Section):
    #: Components applied at once within one layer (the dependsOn DAG permitting).
    parallelism: int = Field(default=4, ge=1, le=64)
    #: Of those, how many send their objects at once. Applying holds documents and the API
    #: server's answers in memory; waiting at a health gate (most of an install's time on a real
    #: site) holds next to nothing. So up to ``parallelism`` components wait at their gates while
    #: this many apply (each still 8 objects at once): the daemon's install peak measured
    #: -1.6 MiB at 2 vs 4 and another ~0.5 at 1; inbox-to-commit on the sim 9.4-9.5 s -> 9.7-10.0 s
    #: (docs/operations.md, "Memory").
    apply_parallelism: int = Field(default=1, ge=1, le=64)
    #: Health-gate timeout for components whose bundle entry names none.
    default_gate_timeout_seconds: float = Field(default=300.0, gt=0)
    drift_interval_seconds: float = Field(default=60.0, gt=0)
    #: How often the committed bundle's component health is re-evaluated (one LIST per workload kind).
    health_interval_seconds: float = Field(default=15.0, gt=0)
    #: How often the daemon looks into the inbox for new bundle files (a stat of one directory).
    inbox_poll_seconds: float = Field(default=5.0, gt=0)
    image_loader: Literal["none", "k3s-airgap", "registry"] = "none"


class ImagesConfig(_Section):
    """Container image delivery (docs/images.md); the loader itself is ``install.image_loader``."""

    #: The site-local OCI registry the ``registry`` loader pushes to (containerd mirrors point here).
    registry_url: str = "http://127.0.0.1:5000"
    #: "prefixed": repository ``<source registry>/<path>`` (no collisions; k3s ``rewrite``), "flat": ``<path>``.
    repo_layout: Literal["prefixed", "flat"] = "prefixed"
    tls_verify: bool = True
    ca_file: Path | None = None
    #: Blobs uploaded at once; memory stays at ~256 KiB per upload whatever the blob size.
    concurrency: int = Field(default=3, ge=1, le=32)
    #: Attempts per blob/manifest (exponential backoff, capped) before the load fails.
    retries: int = Field(default=10, ge=1, le=100)
    backoff_max_seconds: float = Field(default=20.0, gt=0)
    request_timeout_seconds: float = Field(default=600.0, gt=0)
    #: Delete manifests no longer used by the current or the last good bundle after each commit.
    gc: bool = False
    #: Run after deletions to free the blobs,
    #: e.g. ["docker-registry", "garbage-collect", "/etc/docker/registry/config.yml"].
    gc_command: list[str] = Field(default_factory=list)
    #: ``k3s-airgap`` loader: where k3s picks image archives up at start.
    k3s_images_dir: Path = Path("/var/lib/rancher/k3s/agent/images")


class DegradationConfig(_Section):
    enabled: bool = True
    #: How long a worse state must persist before acting on it.
    degrade_dwell_seconds: float = Field(default=5.0, ge=0)
    #: How long a better state must persist before restoring (hysteresis against flapping).
    recover_dwell_seconds: float = Field(default=60.0, ge=0)
    #: Delay between restoring one tier and the next.
    restore_stagger_seconds: float = Field(default=10.0, ge=0)
    #: A node whose Lease was not renewed for this long counts as down (kubelets renew every 10 s;
    #: Kubernetes itself waits 40 s before NotReady). Measured on the agent's clock.
    lease_timeout_seconds: float = Field(default=20.0, gt=0)
    #: Re-evaluation period while watches are not streaming or something is unsettled. On a settled
    #: site with live watches the controller instead sleeps until the earliest moment a lease could
    #: go stale (plus this period); Node events and news in Lease events wake it earlier.
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    #: Force-delete tier 2-4 pods on nodes the agent considers lost, instead of letting them sit
    #: there until Kubernetes evicts them (300 s), so their replacements start now.
    evict_lost_pods: bool = True
    #: Watch Nodes and Leases to react between polls.
    watch: bool = True


class SnapshotConfig(_Section):
    """etcd snapshots (see docs/runbooks/etcd-restore.md). Binaries left unset are searched on PATH."""

    enabled: bool = True
    #: Cron expression (5 fields), evaluated in ``timezone``.
    schedule: str = "0 */6 * * *"
    timezone: str = "UTC"
    backend: Literal["etcdctl", "k3s"] = "etcdctl"
    #: Which distribution's etcd: picks the endpoint and client certificates (``custom``: set them all).
    preset: Literal["k3s", "kubeadm", "custom"] = "k3s"
    endpoint: str | None = None
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    etcdctl: Path | None = None
    etcdutl: Path | None = None
    k3s: Path | None = None
    directory: Path | None = None  # default: <state_dir>/snapshots
    #: Our own limit on every external command (``etcdctl snapshot save`` can hang forever).
    timeout_seconds: float = Field(default=600.0, gt=0)
    #: zstd-compress stored snapshots (in the same read pass as verification). Off by default: it
    #: roughly doubles the snapshot time on a small node, and disk is usually cheaper than CPU there.
    compress: bool = False
    zstd_level: int = Field(default=3, ge=1, le=19)
    #: Retention: keep the newest N and/or nothing older than this; the newest verified one is always kept.
    keep: int | None = Field(default=14, ge=1)
    max_age_days: float | None = Field(default=None, gt=0)
    #: Disk guard: refuse when free space would drop below this, or below twice the last snapshot's size.
    min_free_bytes: int = Field(default=1 << 30, ge=0)
    #: Delay before the catch-up snapshot after a start that missed a scheduled time (lets etcd come up).
    catchup_delay_seconds: float = Field(default=60.0, ge=0)
    retry_initial_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=1800.0, gt=0)
    #: Copy the newest verified snapshot to the hub (hub/snapshot_upload.py). Off: it costs bandwidth.
    upload_enabled: bool = False
    #: The hub's API base, e.g. ``https://hub.example:8443/api/v1``.
    upload_url: str | None = None
    #: File holding this site's upload bearer token (kept out of the config and the logs).
    upload_token_file: Path | None = None
    #: CA bundle for the hub's certificate (default: the system's).
    upload_cacert: Path | None = None
    upload_chunk_bytes: int = Field(default=4 << 20, ge=64 << 10, le=16 << 20)

    @model_validator(mode="after")
    def _upload_target(self) -> SnapshotConfig:
        if self.upload_enabled and (not self.upload_url or self.upload_token_file is None):
            raise ValueError("upload_enabled needs upload_url and upload_token_file")
        return self

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class LinkConfig(_Section):
    """The MQTT link to the hub (agent/link.py, agent/commands.py; see docs/protocol.md)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    #: mTLS: the fleet CA that signed the broker's certificate, and this site's client certificate and key.
    #: With ``tls_ca`` unset the link is plain TCP (tests and labs only; production brokers require mTLS).
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Check that the broker certificate names ``host`` (leave on outside labs).
    tls_check_hostname: bool = True
    #: MQTT client id; default ``edgefleet-<site_id>``. Must be stable: the broker keeps the session under it.
    client_id: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_seconds: int = Field(default=30, ge=5, le=3600)
    #: How long the broker keeps this site's session (subscription + queued commands) while it is offline.
    #: MQTT 5 only; with 3.1.1 the broker's ``persistent_client_expiration`` decides.
    session_expiry_seconds: int = Field(default=7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    #: Reconnect backoff: full jitter, uniform in [0, min(max, min * 2**attempt)].
    backoff_min_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)
    #: Seconds to wait for a PUBACK before treating the connection as broken.
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Outbox drain rate (token bucket), so a fleet coming back after an outage does not flood the hub.
    replay_rate_per_second: float = Field(default=20.0, gt=0)
    replay_burst: int = Field(default=50, ge=1)
    #: QoS 1 publishes in flight at once while draining the outbox.
    max_inflight: int = Field(default=10, ge=1, le=1000)
    #: Outbox bounds; beyond them the oldest events are dropped and reported (``outbox.overflow``).
    outbox_max_messages: int = Field(default=100_000, ge=10)
    outbox_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    outbox_max_age_seconds: float = Field(default=30 * 24 * 3600.0, gt=0)
    status_interval_seconds: float = Field(default=30.0, gt=0)
    #: Status interval while the site is Red (limp-home): less telemetry on a struggling node.
    limp_status_interval_seconds: float = Field(default=120.0, gt=0)
    #: Commands: tolerated clock difference between hub and site, and the longest validity a command may claim.
    command_clock_skew_seconds: float = Field(default=300.0, ge=0)
    command_max_lifetime_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    #: ``install-bundle``: largest bundle the agent downloads, and the CA for an https hub (default: system CAs).
    fetch_max_bytes: int = Field(default=16 * 1024**3, ge=1024)
    fetch_timeout_seconds: float = Field(default=3600.0, gt=0)
    fetch_ca: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LinkConfig:
        if self.backoff_min_seconds > self.backoff_max_seconds:
            raise ValueError("backoff_min_seconds must not exceed backoff_max_seconds")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (the site's client certificate and its key)")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert needs tls_ca (the fleet CA that signed the broker's certificate)")
        return self


ENV_PREFIX = "EDGEFLEET_AGENT_"


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    site_id: str = Field(pattern=protocol.SITE_ID_PATTERN)
    state_dir: Path = Path("/var/lib/edgefleet")
    trust_dir: Path = Path("/etc/edgefleet/trust")
    inbox_dir: Path | None = None  # default: <state_dir>/inbox
    #: None: in-cluster config if present, else the default kubeconfig.
    kubeconfig: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    http: HttpConfig = HttpConfig()
    daemon: DaemonConfig = DaemonConfig()
    install: InstallConfig = InstallConfig()
    degradation: DegradationConfig = DegradationConfig()
    snapshots: SnapshotConfig = SnapshotConfig()
    link: LinkConfig = LinkConfig()
    images: ImagesConfig = ImagesConfig()

    @property
    def inbox(self) -> Path:
        return self.inbox_dir or self.state_dir / "inbox"

    @property
    def trust_chain(self) -> Path:
        """The rotations of the trust root this site accepted (``trust_dir`` holds only the seed
        ``root.json`` and is read-only under the systemd unit): see ``bundles.trust.load_effective``."""
        return self.state_dir / "trust" / "root-chain.json"

    @property
    def snapshot_dir(self) -> Path:
        return self.snapshots.directory or self.state_dir / "snapshots"


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML config file that must be a mapping; raise :class:`ConfigError` with one clear line.

    Shared by the agent's and the hub's loaders, so both report a bad file the same way."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: config must be a mapping of fields, got {type(doc).__name__}")
    return doc


def describe(exc: ValidationError, *, where: str) -> str:
    """One line naming the first invalid field (``where: field: message (and N more)``)."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {field + ': ' if field else ''}{msg}{more}"


def _is_structured(annotation: Any) -> bool:
    """Whether an env value for a field of this type is JSON (lists, mappings, sections)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_structured(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return origin in (list, dict, tuple, set, frozenset)


def environment(env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``EDGEFLEET_AGENT_*`` overrides as a nested mapping, and which variable set each field.

    A name that is not a field of :class:`AgentConfig` at its top level is ignored, as
    pydantic-settings does (other software may share the prefix); below the top level the
    sections forbid unknown keys, so ``EDGEFLEET_AGENT_LINK__HOTS`` is an error naming it.
    """
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, value in sorted((os.environ if env is None else env).items()):
        if not name.upper().startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        field = AgentConfig.model_fields.get(path[0])
        if field is None or not all(path):
            continue
        annotation: Any = field.annotation
        for key in path[1:]:
            section = next((a for a in (annotation, *typing.get_args(annotation))
                            if isinstance(a, type) and issubclass(a, BaseModel)), None)
            sub = section.model_fields.get(key) if section is not None else None
            annotation = sub.annotation if sub is not None else None
        parsed: Any = value
        if _is_structured(annotation):
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"environment {name}: not valid JSON: {exc}") from None
        node = overrides
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        leaf = node.get(path[-1])
        if isinstance(leaf, dict) and isinstance(parsed, dict):  # ..._LINK='{...}' and ..._LINK__HOST
            parsed = _merged(parsed, leaf)
        node[path[-1]] = parsed
        origins[".".join(path)] = name
    return overrides, origins


def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        out[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def load(path: Path, **overrides: Any) -> AgentConfig:
    """Load and validate the config file, the environment overriding it; raise :class:`ConfigError`
    with one clear line (naming the variable when the bad value came from the environment)."""
    doc = _merged(read_mapping(path), overrides)
    env, origins = environment()
    doc = _merged(doc, env)
    try:
        return AgentConfig(**doc)
    except ValidationError as exc:
        loc = [str(p) for p in exc.errors()[0]["loc"]]
        source = next((origins[k] for k in (".".join(loc[:n]) for n in range(len(loc), 0, -1)) if k in origins), None)
        where = f"{path} (environment {source})" if source else str(path)
        raise ConfigError(describe(exc, where=where)) from None
