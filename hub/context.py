"""What every part of a running hub shares: config, store, metrics, notifications, broker link."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.config import HubConfig
from hub.metrics import Metrics
from hub.mqtt import Link
from hub.notify import Notifier
from hub.store import Store


@dataclass
class HubContext:
    config: HubConfig
    store: Store
    metrics: Metrics = field(default_factory=Metrics)
    notifier: Notifier = field(default_factory=Notifier)
    link: Link = field(default_factory=Link)
    #: The command signing key; None when not configured (command endpoints then answer 503).
    command_key: Ed25519PrivateKey | None = None
    #: Commands this process is publishing right now (so the retry sweep does not publish them twice).
    publishing: set[str] = field(default_factory=set)
