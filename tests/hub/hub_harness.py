"""Helpers of the hub tests: private mosquitto instances, per-test PostgreSQL schemas, publishers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import brokers
import pytest
import sqlalchemy as sa
from brokers import free_port  # tests import it from here too

from agent import protocol
from hub import config as hub_config

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass
class Broker:
    """A private mosquitto (plain TCP, anonymous) that a test may stop, kill and restart on its port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    persistence: bool = True

    @property
    def host(self) -> str:
        return brokers.HOST

    def start(self) -> None:
        lines = [
            f"listener {self.port} {brokers.HOST}",
            "allow_anonymous true",
            "max_queued_messages 100000",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
        ]
        self.proc = brokers.start_mosquitto(self.workdir, "\n".join(lines), port=self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            brokers.stop(self.proc, sig)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(workdir=tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@dataclass
class PgSchema:
    url: str
    schema: str


def pg_schema_url(schema: str) -> str:
    return f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the shared PostgreSQL for this test, dropped afterwards."""
    schema = f"hubtest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.orig}")
    try:
        yield pg_schema_url(schema)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def hub_cfg(*, broker: Broker, db_url: str, tmp: Path, **overrides: Any) -> hub_config.HubConfig:
    doc: dict[str, Any] = {
        "db_url": db_url,
        "data_dir": str(tmp / "hubdata"),
        "log_format": "json",
        "staleness_check_seconds": 0.2,
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"hub-{uuid.uuid4().hex[:8]}"},
        "ingest": {"flush_interval_seconds": 0.05, "reject_log_interval_seconds": 0.5},
        "api": {"host": "127.0.0.1", "port": 0, "write_tokens": ["w-secret"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return hub_config.HubConfig(**doc)


def status(site: str, seq: int, *, state: str = "green", interval: float = 30.0, **fields: Any) -> protocol.Status:
    return protocol.Status(site=site, seq=seq, state=protocol.SiteState(state), interval_seconds=interval, **fields)


def event(site: str, seq: int, *, type: str = "test.happened", **fields: Any) -> protocol.Event:
    return protocol.Event(site=site, seq=seq, type=type, summary=f"event {seq}", **fields)


def publisher(broker: Broker, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, identifier=f"pub-{uuid.uuid4().hex[:8]}", **kwargs)


async def publish(client: aiomqtt.Client, message: protocol.Message, *, channel: protocol.Channel) -> None:
    await client.publish(protocol.topic(message.site, channel), message.to_bytes(), qos=1)


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], *, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if asyncio.iscoroutine(got) or isinstance(got, Awaitable):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.05)


def counter(registry: Any, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return float(value or 0.0)


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


@dataclass
class HubProcess:
    """``edgefleet-hub run`` as a real process (so it can be SIGKILLed), configured by a YAML file."""

    workdir: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.config['api']['port']}"

    def start(self) -> None:
        import yaml

        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "hub.yaml"
        path.write_text(yaml.safe_dump(self.config))
        log = open(self.workdir / "hub.log", "ab")  # noqa: SIM115
        exe = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "edgefleet-hub"
        self.proc = subprocess.Popen([str(exe), "--config", str(path), "run"], stdout=log, stderr=log)
        log.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        async def ok() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                async with httpx.AsyncClient() as http:
                    r = await http.get(f"{self.api_url}/healthz", timeout=1)
                    return bool(r.status_code == 200 and r.json()["mqtt_connected"])
            except httpx.HTTPError:
                return False

        await wait_until(ok, timeout=timeout, what="hub process ready")

    async def metric(self, name: str, **labels: str) -> float:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.api_url}/metrics", timeout=5)).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def log(self) -> str:
        p = self.workdir / "hub.log"
        return p.read_text(errors="replace") if p.exists() else ""


def hub_process_config(*, broker: Broker, db_url: str, client_id: str, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "db_url": db_url,
        "log_format": "json",
        "staleness_check_seconds": 1,
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": client_id, "reconnect_max_seconds": 1},
        "ingest": {"flush_interval_seconds": 0.05},
        "api": {"host": "127.0.0.1", "port": free_port()},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc
