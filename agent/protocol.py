"""The fleet wire protocol between agents and the hub, over MQTT (see docs/protocol.md).

Topics live under ``edgefleet/v1/sites/{site}/``:

* ``status``   site → hub, retained, QoS 1: the site's current health (:class:`Status`).
* ``events``   site → hub, QoS 1: transitions and results (:class:`Event`).
* ``online``   site → hub, retained: ``online=true`` on connect, ``false`` via the Last Will.
* ``commands`` hub → site, QoS 1: a DSSE envelope signed by the hub's command key over a :class:`Command`.
* ``replies``  site → hub, QoS 1: results of commands (:class:`Reply`).

Every message carries a schema version, a unique id, a per-site sequence number and a
timestamp. Parsing is strict about what matters (schema version, site, sizes) and lenient
about the rest: unknown *fields* from a newer agent are ignored, an unknown *schema version*
is refused with a clear error. The broker is not trusted: the hub checks that the site in the
topic is the site in the payload, and agents accept commands only with a valid hub signature.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgefleet/v1/sites"
#: Caps, checked before any JSON parsing. Status carries every component, so it gets more room.
MAX_STATUS_BYTES = 256 * 1024
MAX_EVENT_BYTES = 64 * 1024
MAX_COMMAND_BYTES = 32 * 1024
MAX_REPLY_BYTES = 64 * 1024
MAX_ONLINE_BYTES = 1024
#: A command travels as a DSSE envelope: base64 payload (4/3 of MAX_COMMAND_BYTES) plus signatures.
MAX_COMMAND_ENVELOPE_BYTES = 64 * 1024
COMMAND_PAYLOAD_TYPE = "application/vnd.edgefleet.command+json; version=1"
#: Where the agent looks for the hub's command key (PEM Ed25519 public key) inside ``trust_dir``.
HUB_COMMAND_KEY_FILE = "hub-command.pub"

SITE_ID_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_SITE_RE = re.compile(SITE_ID_PATTERN)


class Channel(enum.StrEnum):
    STATUS = "status"
    EVENTS = "events"
    ONLINE = "online"
    COMMANDS = "commands"
    REPLIES = "replies"


MAX_BYTES: dict[Channel, int] = {
    Channel.STATUS: MAX_STATUS_BYTES,
    Channel.EVENTS: MAX_EVENT_BYTES,
    Channel.ONLINE: MAX_ONLINE_BYTES,
    Channel.COMMANDS: MAX_COMMAND_ENVELOPE_BYTES,  # the envelope; its payload is capped at MAX_COMMAND_BYTES
    Channel.REPLIES: MAX_REPLY_BYTES,
}


class SiteState(enum.StrEnum):
    """The degradation states of a site (see docs/architecture.md)."""

    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"
    BLACK = "black"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ProtocolError(ValueError):
    """A message that must be refused. ``reason`` is a short stable label for counters."""

    reason = "malformed"


class UnknownTopic(ProtocolError):
    reason = "topic"


class Oversized(ProtocolError):
    reason = "oversized"


class Malformed(ProtocolError):
    reason = "malformed"


class UnknownSchema(ProtocolError):
    reason = "schema"


class Spoofed(ProtocolError):
    reason = "spoofed"


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def topic(site: str, channel: Channel) -> str:
    if not _SITE_RE.match(site):
        raise ValueError(f"invalid site id {site!r}: must match {SITE_ID_PATTERN}")
    return f"{TOPIC_ROOT}/{site}/{channel.value}"


def parse_topic(value: str) -> tuple[str, Channel]:
    """Split ``edgefleet/v1/sites/{site}/{channel}``; anything else is :class:`UnknownTopic`."""
    parts = value.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != TOPIC_ROOT or not _SITE_RE.match(parts[3]):
        raise UnknownTopic(f"not an edgefleet v1 site topic: {value[:200]!r}")
    try:
        return parts[3], Channel(parts[4])
    except ValueError:
        raise UnknownTopic(f"unknown channel {parts[4][:50]!r} in topic {value[:200]!r}") from None


class _Model(BaseModel):
    # Unknown future fields are tolerated (ignored), so a newer agent can talk to an older hub.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Message(_Model):
    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")
    msg_id: str = Field(default_factory=new_id, min_length=8, max_length=64)
    site: str = Field(pattern=SITE_ID_PATTERN)
    seq: int = Field(ge=0)
    ts: datetime = Field(default_factory=now)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")


class BundleRef(_Model):
    name: str
    version: str
    release: int = Field(ge=0)


class ComponentHealth(_Model):
    name: str
    layer: int = Field(ge=0, le=4)
    tier: int = Field(ge=1, le=4)
    healthy: bool
    reason: str = ""
    #: Scaled down by the degradation controller (desired replicas below the bundle's).
    degraded: bool = False


class NodeHealth(_Model):
    name: str
    ready: bool
    control_plane: bool = False


class SnapshotInfo(_Model):
    last_success: datetime | None = None
    age_seconds: float | None = None
    size_bytes: int | None = None
    revision: int | None = None
    schedule: str | None = None
    #: Longest allowed age before the hub should highlight the snapshot as overdue.
    max_age_seconds: float | None = None
    failures: int = 0


class ScaledWorkload(_Model):
    kind: str
    namespace: str
    name: str
    tier: int
    original_replicas: int
    replicas: int
    reason: str = ""


class Status(Message):
    kind: Literal["status"] = "status"
    state: SiteState
    state_reason: str = ""
    bundle: BundleRef | None = None
    install_state: str = "idle"
    components: list[ComponentHealth] = Field(default_factory=list, max_length=500)
    nodes: list[NodeHealth] = Field(default_factory=list, max_length=500)
    scaled_down: list[ScaledWorkload] = Field(default_factory=list, max_length=500)
    snapshot: SnapshotInfo | None = None
    agent_version: str = ""
    #: Seconds between status reports, so the hub can judge staleness per site.
    interval_seconds: float = Field(default=30.0, gt=0)


JSONScalar = str | int | float | bool | None


class Event(Message):
    kind: Literal["event"] = "event"
    #: Dotted type, e.g. ``install.succeeded``, ``bundle.rejected``, ``degradation.transition``,
    #: ``snapshot.succeeded``, ``snapshot.failed``, ``command.rejected``, ``outbox.overflow``.
    type: str = Field(pattern=r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)+$", max_length=100)
    severity: Severity = Severity.INFO
    summary: str = Field(max_length=2000)
    data: dict[str, Any] = Field(default_factory=dict)


class Online(Message):
    kind: Literal["online"] = "online"
    online: bool


class CommandName(enum.StrEnum):
    SNAPSHOT_NOW = "snapshot-now"
    INSTALL_BUNDLE = "install-bundle"
    REPORT_NOW = "report-now"
    ROLLBACK = "rollback"
    CLEAR_BAD = "clear-bad-version"


class Command(_Model):
    """Signed by the hub; the DSSE payload on ``commands``."""

    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")
    cmd_id: str = Field(default_factory=new_id, min_length=8, max_length=64)
    site: str = Field(pattern=SITE_ID_PATTERN)
    #: Per-site, strictly increasing; the agent refuses anything not above the last accepted.
    seq: int = Field(ge=1)
    issued: datetime = Field(default_factory=now)
    expires: datetime
    name: CommandName
    args: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")


class ReplyStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


class Reply(Message):
    kind: Literal["reply"] = "reply"
    cmd_id: str = Field(max_length=64)
    status: ReplyStatus
    detail: str = Field(default="", max_length=2000)
    data: dict[str, Any] = Field(default_factory=dict)


SiteMessage = Annotated[Status | Event | Online | Reply, Field(discriminator="kind")]
_MODEL_BY_CHANNEL: dict[Channel, type[Message]] = {
    Channel.STATUS: Status,
    Channel.EVENTS: Event,
    Channel.ONLINE: Online,
    Channel.REPLIES: Reply,
}


def parse_site_message(topic_name: str, payload: bytes) -> Message:
    """Validate a site → hub message as the hub must: topic, size, JSON, schema, site match.

    Raises a :class:`ProtocolError` subclass naming what was wrong; never anything else.
    """
    site, channel = parse_topic(topic_name)
    if channel is Channel.COMMANDS:
        raise UnknownTopic("commands flow hub → site; a site cannot publish one")
    cap = MAX_BYTES[channel]
    if len(payload) > cap:
        raise Oversized(f"{channel.value} message of {len(payload)} bytes exceeds the {cap}-byte cap")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise Malformed(f"{channel.value} message is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise Malformed(f"{channel.value} message is not a JSON object")
    version = doc.get("schema")
    if version != SCHEMA_VERSION:
        raise UnknownSchema(f"unsupported schema version {str(version)[:20]!r} (this side speaks {SCHEMA_VERSION})")
    model = _MODEL_BY_CHANNEL[channel]
    try:
        message = model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise Malformed(f"{channel.value} message: {where}: {first['msg']}") from None
    if message.site != site:
        raise Spoofed(f"topic names site {site!r} but the payload claims {message.site!r}")
    return message


def parse_command_payload(payload: bytes) -> Command:
    """Parse the (already signature-checked) DSSE payload of a command."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise Oversized(f"command of {len(payload)} bytes exceeds the {MAX_COMMAND_BYTES}-byte cap")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise Malformed(f"command is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise Malformed("command is not a JSON object")
    if doc.get("schema") != SCHEMA_VERSION:
        raise UnknownSchema(f"unsupported command schema {str(doc.get('schema'))[:20]!r}")
    try:
        return Command.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "command"
        raise Malformed(f"command: {where}: {first['msg']}") from None


def sign_command(command: Command, *, key: Any) -> bytes:
    """The wire form of a command: a DSSE envelope over :meth:`Command.to_bytes`, signed by the
    hub's command key (an Ed25519 private key). What the hub publishes on ``commands``."""
    from bundles import dsse  # local: parsing site messages on the hub must not need the crypto stack loaded

    payload = command.to_bytes()
    if len(payload) > MAX_COMMAND_BYTES:
        raise Oversized(f"command of {len(payload)} bytes exceeds the {MAX_COMMAND_BYTES}-byte cap")
    return dsse.sign(payload_type=COMMAND_PAYLOAD_TYPE, payload=payload, keys=[key]).to_json()
