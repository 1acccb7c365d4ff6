"""The hub's broker connection: client construction (TLS, session, protocol) and a shared handle.

Ingest owns the connection's lifetime (it reconnects with backoff); :class:`Link` lets the rest of
the hub (commands) publish on whatever connection is current, or learn that there is none.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiomqtt
from paho.mqtt import client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import puback
from hub.config import MqttConfig


class NotConnected(RuntimeError):
    """No broker connection right now; the caller keeps the message and retries later."""


class NotRouted(RuntimeError):
    """The broker accepted the message but refused it or had no subscriber for it (MQTT 5 PUBACK reason).

    For a command: no session subscribes to the site's command topic (the site never connected, or
    its session expired), so the broker dropped it; the caller keeps it pending and retries."""


class Link:
    """The current broker connection (or none). ``generation`` changes on every reconnect."""

    def __init__(self) -> None:
        self.client: aiomqtt.Client | None = None
        self.codes: puback.Codes = {}
        self.generation = 0
        self.connected = asyncio.Event()

    def attach(self, client: aiomqtt.Client) -> int:
        self.client = client
        self.codes = puback.track(client)
        self.generation += 1
        self.connected.set()
        return self.generation

    def detach(self) -> None:
        self.client = None
        self.connected.clear()

    async def publish(self, topic: str, payload: bytes, *, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK.

        Raises :class:`NotConnected` when there is no link or the publish failed, :class:`NotRouted`
        when the PUBACK says the message went nowhere or was refused."""
        client = self.client
        if client is None:
            raise NotConnected("not connected to the broker")
        try:
            code = await puback.publish(client, self.codes, topic, payload, retain=False, timeout=timeout)
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"publish failed: {exc}") from exc
        if code == puback.NO_MATCHING_SUBSCRIBERS:
            raise NotRouted("no subscriber: the site has no broker session (never connected, or it expired)")
        if code >= 0x80:
            raise NotRouted(f"refused by the broker: PUBACK reason {code:#04x} {puback.reason_name(code)}")


def client_id(config: MqttConfig) -> str:
    return config.client_id or f"edgefleet-hub-{socket.gethostname()}"[:64]


def tls_context(config: MqttConfig, *, identifier: str | None = None) -> ssl.SSLContext | None:
    """TLS with our client certificate, or (adopting a dead replica's session) that replica's."""
    if not config.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    peer = config.peer_identities.get(identifier) if identifier else None
    if peer is not None:
        ctx.load_cert_chain(str(peer.cert_file), str(peer.key_file))
    elif config.cert_file is not None:
        ctx.load_cert_chain(str(config.cert_file), str(config.key_file) if config.key_file else None)
    return ctx


def make_client(config: MqttConfig, *, identifier: str | None = None) -> aiomqtt.Client:
    """A client with a persistent session, so the broker keeps what we have not acknowledged.

    MQTT 5: ``clean_start=False`` plus a session expiry (aiomqtt's default would start clean on the
    first connect of each process and lose what queued while the hub was down), and a Receive
    Maximum that bounds how many unacknowledged messages the broker sends us (our memory bound,
    since ingest acknowledges only after commit). MQTT 3.1.1: ``clean_session=False``.
    """
    v5 = config.protocol == "5"
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = config.session_expiry_seconds
        properties.ReceiveMaximum = config.receive_maximum
    return aiomqtt.Client(
        config.host,
        config.port,
        identifier=identifier or client_id(config),
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else False,
        # paho refuses clean_start on 3.1.1 (clean_session=False does the job there).
        clean_start=False if v5 else paho_client.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        keepalive=config.keepalive_seconds,
        username=config.username,
        password=config.password.get_secret_value() if config.password else None,
        tls_context=tls_context(config, identifier=identifier),
        timeout=10.0,
        max_inflight_messages=100,
    )
