"""Link test harness: a fleet PKI and real Mosquitto instances on free ports.

The broker runs the repository's deploy/mosquitto/mosquitto.conf and acl, with only the
paths, the port and the privilege drop rewritten, so the tests exercise the shipped config.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiomqtt
import brokers
import pytest
from brokers import free_port  # tests import it from here too
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.state import StateStore

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mosquitto"
HUB = "hub-1.edgefleet"
#: A second hub identity: the broker forces client id = CN, so two connections need two CNs.
HUB2 = "hub-2.edgefleet"
SITES = ("site-a", "site-b")


def load_fleetca() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgefleet_fleetca", DEPLOY / "fleetca.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class PKI:
    dir: Path
    ca: Path  # the fleet CA: sites and the broker (clients of both listeners verify the broker with it)
    hub_ca: Path
    broker: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    fleetca = load_fleetca()
    base = tmp_path_factory.mktemp("pki")
    fleetca.init_ca(base / "fleet-ca")
    fleetca.init_ca(base / "hub-ca", name="edgefleet hub CA")
    broker = fleetca.issue(base / "fleet-ca", cn="broker", kind="broker", sans=("127.0.0.1", "localhost"),
                           out_dir=base / "broker")
    clients = {hub: fleetca.issue(base / "hub-ca", cn=hub, kind="hub", out_dir=base / hub) for hub in (HUB, HUB2)}
    for site in (*SITES, "site-c"):
        clients[site] = fleetca.issue(base / "fleet-ca", cn=site, kind="site", out_dir=base / site)
    return PKI(dir=base, ca=base / "fleet-ca" / "ca.crt", hub_ca=base / "hub-ca" / "ca.crt", broker=broker,
               clients=clients)


@dataclass
class Broker:
    """One Mosquitto process with the shipped config; stop/start keep the port and the persistence."""

    workdir: Path
    pki: PKI
    port: int = field(default_factory=free_port)  # the sites listener
    hub_port: int = field(default_factory=free_port)  # the hub listener
    crl: Path | None = None  # enables the shipped (commented) crlfile line
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The shipped config with its paths and ports replaced (the rest verbatim)."""
        etc = "/etc/mosquitto/edgefleet/"
        replacements = {
            f"{etc}fleet-ca.crt": str(self.pki.ca),
            f"{etc}hub-ca.crt": str(self.pki.hub_ca),
            f"{etc}broker.crt": str(self.pki.broker[0]),
            f"{etc}broker.key": str(self.pki.broker[1]),
            f"{etc}acl-sites": str(DEPLOY / "acl-sites"),
            f"{etc}acl-hub": str(DEPLOY / "acl-hub"),
            "persistence_location /var/lib/mosquitto/": f"persistence_location {self.workdir}/",
            "listener 8883": f"listener {self.port} 127.0.0.1",
            "listener 8884": f"listener {self.hub_port} 127.0.0.1",
        }
        if self.crl is not None:
            replacements[f"#crlfile {etc}crl.pem"] = f"crlfile {self.crl}"
        text = (DEPLOY / "mosquitto.conf").read_text()
        for old, new in replacements.items():
            assert old in text, old
            text = text.replace(old, new)
        return text

    def start(self) -> None:
        assert self.proc is None
        self.proc = brokers.start_mosquitto(self.workdir, self.config(), port=self.hub_port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            brokers.stop(self.proc, sig)
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def broker(tmp_path: Path, pki: PKI) -> Iterator[Broker]:
    b = Broker(workdir=tmp_path / "broker", pki=pki)
    b.workdir.mkdir()
    b.start()
    try:
        yield b
    finally:
        b.stop()


def tls_context(pki: PKI, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(*(str(p) for p in pki.clients[name]))
    return context


def mqtt_client(broker: Broker, name: str, *, persistent: bool = False, **kwargs: Any) -> aiomqtt.Client:
    """A test-side client with ``name``'s certificate: hub names on the hub listener, sites on the sites one."""
    extra: dict[str, Any] = {"clean_session": False} if persistent else {}
    port = broker.hub_port if name.endswith(".edgefleet") else broker.port
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=kwargs.pop("identifier", name), tls_context=tls_context(broker.pki, name),
        **extra, **kwargs,
    )


@dataclass
class Agent:
    ctx: AgentContext
    hub_key: Ed25519PrivateKey


def agent_config(tmp: Path, broker: Broker, *, site: str = "site-a", **link: Any) -> AgentConfig:
    cert, key = broker.pki.clients[site]
    settings: dict[str, Any] = {
        "host": "127.0.0.1", "port": broker.port, "tls_ca": broker.pki.ca, "tls_cert": cert, "tls_key": key,
        "backoff_min_seconds": 0.05, "backoff_max_seconds": 0.5, "publish_timeout_seconds": 3,
        "replay_rate_per_second": 500, "replay_burst": 100, "status_interval_seconds": 30,
    }
    settings.update(link)
    return AgentConfig(site_id=site, state_dir=tmp / "state", trust_dir=tmp / "trust", link=settings)


def write_hub_key(trust_dir: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    trust_dir.mkdir(parents=True, exist_ok=True)
    (trust_dir / protocol.HUB_COMMAND_KEY_FILE).write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Any]:
    stores: list[StateStore] = []

    def make(broker: Broker, *, site: str = "site-a", **link: Any) -> Agent:
        config = agent_config(tmp_path / site, broker, site=site, **link)
        key = write_hub_key(config.trust_dir)
        store = StateStore.open(config.state_dir)
        stores.append(store)
        return Agent(ctx=AgentContext(config=config, store=store), hub_key=key)

    yield make
    for store in stores:
        store.close()


@contextlib.asynccontextmanager
async def running(coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Collector:
    """A hub-side subscriber that records (topic, parsed message) in arrival order."""

    received: list[tuple[str, protocol.Message]] = field(default_factory=list)
    raw: list[tuple[str, bytes]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self) -> list[protocol.Event]:
        return [m for _, m in self.received if isinstance(m, protocol.Event)]

    def replies(self) -> list[protocol.Reply]:
        return [m for _, m in self.received if isinstance(m, protocol.Reply)]

    def of_type(self, kind: type[protocol.Message]) -> list[Any]:
        return [m for _, m in self.received if isinstance(m, kind)]

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received {len(self.received)} messages; errors {self.errors}")
            await asyncio.sleep(0.05)


async def collect(broker: Broker, collector: Collector, *, topic: str = f"{protocol.TOPIC_ROOT}/+/+") -> None:
    """Subscribe as the hub with a persistent session, reconnecting across broker restarts."""
    while True:
        try:
            async with mqtt_client(broker, HUB, persistent=True) as client:
                for channel in ("status", "events", "online", "replies"):
                    await client.subscribe(f"{protocol.TOPIC_ROOT}/+/{channel}", qos=1)
                collector.ready.set()
                async for message in client.messages:
                    payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
                    collector.raw.append((str(message.topic), payload))
                    try:
                        parsed = protocol.parse_site_message(str(message.topic), payload)
                    except protocol.ProtocolError as exc:
                        collector.errors.append(f"{message.topic}: {exc}")
                        continue
                    collector.received.append((str(message.topic), parsed))
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


def sign(agent: Agent, **fields: Any) -> bytes:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    doc: dict[str, Any] = {"site": agent.ctx.site, "issued": now, "expires": now + timedelta(minutes=10)}
    doc.update(fields)
    key = doc.pop("key", agent.hub_key)
    return protocol.sign_command(protocol.Command(**doc), key=key)
