"""Hub configuration: a pydantic-settings model loaded from YAML, with environment overrides.

Environment variables win over the file, named ``EDGEFLEET_HUB_<FIELD>`` and
``EDGEFLEET_HUB_<SECTION>__<FIELD>`` (e.g. ``EDGEFLEET_HUB_DB_URL=postgresql+psycopg://...``,
``EDGEFLEET_HUB_MQTT__HOST=broker``). Unknown keys are errors: a typo must not silently become a
default. Tokens are :class:`pydantic.SecretStr`, so they never show up in a repr or a log line.
Token lists can be given in the environment as JSON (``EDGEFLEET_HUB_API__WRITE_TOKENS='["t1"]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent import config as agent_config

DEFAULT_PATH = Path("/etc/edgefleet/hub.yaml")


ConfigError = agent_config.ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeerIdentity(_Section):
    """Another replica's client certificate, for adopting its session when it dies (hub/replicas.py)."""

    cert_file: Path
    key_file: Path


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    #: "5" (default) or "3.1.1". Brokers without MQTT 5 (e.g. amqtt) need 3.1.1.
    protocol: Literal["5", "3.1.1"] = "5"
    #: Client identifier; a stable one per replica lets the broker keep the session (and the
    #: unacknowledged messages) across a restart of that replica. Default: edgefleet-hub-<hostname>.
    client_id: str | None = None
    #: MQTT shared subscriptions (``$share/<group>/...``) so several replicas split the stream. Off by
    #: default: a single hub is better served by a plain subscription in a persistent session, which
    #: Mosquitto restores after a broker restart (it does not restore shared ones; see docs/hub.md).
    #: Needs MQTT 5 and a broker that has them (not amqtt).
    shared_subscriptions: bool = False
    shared_group: str = Field(default="edgefleet-hub", pattern=r"^[A-Za-z0-9_.-]+$")
    #: How many unacknowledged messages the broker may send us at once (MQTT 5 Receive Maximum).
    #: Messages are acknowledged only after they are committed to the store, so this bounds memory.
    receive_maximum: int = Field(default=4000, ge=1, le=65535)
    #: Broker session expiry (MQTT 5): how long the broker keeps our queue while we are away.
    session_expiry_seconds: int = Field(default=3600, ge=0)
    keepalive_seconds: int = Field(default=30, ge=5)
    username: str | None = None
    password: SecretStr | None = None
    #: TLS: CA bundle to verify the broker, and our client certificate + key (mTLS).
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    reconnect_max_seconds: float = Field(default=30.0, gt=0)
    #: Replicas behind an mTLS broker with ``use_username_as_clientid`` can only resume a dead peer's
    #: session with that peer's certificate: client id -> its cert and key. Without an entry, a dead
    #: peer's share waits at the broker until it returns (logged as an error).
    peer_identities: dict[str, PeerIdentity] = Field(default_factory=dict)


class IngestConfig(_Section):
    #: A batch is committed when it holds this many messages, or after ``flush_interval_seconds``.
    batch_size: int = Field(default=1000, ge=1)
    flush_interval_seconds: float = Field(default=0.1, gt=0)
    #: In-memory LRU of recently stored message ids (the unique constraints remain the authority).
    dedupe_cache: int = Field(default=200_000, ge=0)
    #: At most one log line per reason per this many seconds for refused messages (counters count all).
    reject_log_interval_seconds: float = Field(default=10.0, gt=0)


class HistoryConfig(_Section):
    """Status history retention (see docs/hub.md for the volume arithmetic)."""

    #: Record a history sample at most this often per site (0: every status). State changes are always recorded.
    min_interval_seconds: float = Field(default=0.0, ge=0)
    #: Every sample is kept for this long ...
    full_resolution_hours: float = Field(default=24.0, gt=0)
    #: ... then one sample per site per bucket (plus every state change) ...
    bucket_minutes: float = Field(default=15.0, gt=0)
    #: ... and nothing after this many days. Events, commands and snapshots are kept.
    retention_days: float = Field(default=90.0, gt=0)
    #: How often the downsampling job runs.
    sweep_interval_seconds: float = Field(default=600.0, gt=0)


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: Tokens accepted on write endpoints (``Authorization: Bearer <token>``). No token: no writes.
    write_tokens: list[SecretStr] = Field(default_factory=list)
    #: Tokens for read endpoints; empty means reads are anonymous. Write tokens may also read.
    read_tokens: list[SecretStr] = Field(default_factory=list)
    #: Base URL sites use to fetch bundles (``install-bundle`` commands carry ``<public_url>/api/v1/bundles/...``).
    public_url: str | None = None
    #: Largest accepted bundle upload.
    max_bundle_bytes: int = Field(default=4 * 1024**3, gt=0)


class CommandConfig(_Section):
    #: The hub's Ed25519 command key (``edgefleet-hub keygen``). Without it the hub cannot send commands.
    key_file: Path | None = None
    #: A command is valid for this long after it is issued (agents add their own clock-skew tolerance).
    ttl_seconds: float = Field(default=900.0, gt=0)


class SnapshotUploadConfig(_Section):
    """Optional etcd snapshot uploads from sites (hub/snapshot_upload.py). Off by default."""

    enabled: bool = False
    #: Uploads land in ``<storage_dir>/<site>/`` (default ``<data_dir>/snapshots``).
    storage_dir: Path | None = None
    #: One file per site, named after the site id, holding that site's upload token; read on every
    #: request, so adding or rotating a site's token needs no restart (default ``<data_dir>/snapshot-tokens``).
    token_dir: Path | None = None


class HubConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_HUB_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    #: SQLAlchemy URL. SQLite needs no setup; PostgreSQL (``postgresql+psycopg://...``) for scale and replicas.
    db_url: str = "sqlite:///edgefleet-hub.db"
    #: Run Alembic migrations to head at start (``edgefleet-hub migrate`` does it explicitly).
    migrate_on_start: bool = True
    data_dir: Path = Path("/var/lib/edgefleet-hub")
    #: Bundle trust root (``root.json`` from ``edgefleet-bundle``): uploads are verified against it.
    trust_root: Path | None = None
    #: A site is stale when no status arrived within ``staleness_factor`` x its reported interval.
    staleness_factor: float = Field(default=3.0, ge=1.0)
    staleness_check_seconds: float = Field(default=5.0, gt=0)
    #: A replica silent (no heartbeat in the store) this long has its broker session adopted by a live one.
    replica_takeover_seconds: float = Field(default=15.0, ge=1.0)
    log_format: Literal["auto", "json", "console"] = "auto"
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    history: HistoryConfig = HistoryConfig()
    api: ApiConfig = ApiConfig()
    commands: CommandConfig = CommandConfig()
    snapshot_upload: SnapshotUploadConfig = SnapshotUploadConfig()

    @model_validator(mode="after")
    def _check_urls(self) -> HubConfig:
        if not self.db_url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"db_url must be a sqlite:// or postgresql+psycopg:// URL, got {self.db_url[:12]!r}...")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the YAML file (passed as init kwargs).
        return (env_settings, init_settings)

    @property
    def bundle_dir(self) -> Path:
        return self.data_dir / "bundles"


def load(path: Path | None, **overrides: Any) -> HubConfig:
    """Load and validate the config (file optional); raise :class:`ConfigError` with one clear line."""
    doc = agent_config.read_mapping(path) if path is not None else {}
    doc.update(overrides)
    try:
        return HubConfig(**doc)
    except ValidationError as exc:
        raise ConfigError(agent_config.describe(exc, where=str(path) if path else "config")) from None
