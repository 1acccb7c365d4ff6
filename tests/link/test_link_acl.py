"""The shipped broker config (deploy/mosquitto) with the real mosquitto: mTLS and per-site ACLs.

"Not received" is proven by ordering, not by waiting: each forbidden publish is followed on the
same connection by an allowed marker; once the marker arrived, the forbidden message would
have arrived before it had the broker let it through.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiomqtt
import pytest
from link_harness import HUB, PKI, Broker, Collector, collect, load_fleetca, mqtt_client, running, tls_context

from agent import protocol


def _event(site: str, seq: int, summary: str) -> bytes:
    return protocol.Event(site=site, seq=seq, type="test.marker", summary=summary).to_bytes()


@pytest.mark.parametrize("version", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_site_cannot_publish_as_another_site(broker: Broker, version: aiomqtt.ProtocolVersion) -> None:
    collector = Collector()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        async with mqtt_client(broker, "site-a", protocol=version) as a:
            for channel in ("events", "status", "online", "replies"):
                await a.publish(f"{protocol.TOPIC_ROOT}/site-b/{channel}", _event("site-b", 1, "forged"), qos=1)
            # Not even into the command channel of its own site, nor outside the tree.
            await a.publish(f"{protocol.TOPIC_ROOT}/site-a/commands", b"{}", qos=1)
            await a.publish(protocol.topic("site-a", protocol.Channel.EVENTS), _event("site-a", 2, "marker"), qos=1)
        await collector.wait_for(lambda c: any(e.summary == "marker" for e in c.events()))
    topics = [t for t, _ in collector.raw]
    assert topics == [f"{protocol.TOPIC_ROOT}/site-a/events"], topics


async def test_site_cannot_read_another_sites_commands(broker: Broker) -> None:
    got_a: list[str] = []
    got_b: list[str] = []
    ready = asyncio.Event()

    async def listen(name: str, subs: list[str], sink: list[str], count: int) -> None:
        async with mqtt_client(broker, name) as client:
            for sub in subs:
                await client.subscribe(sub, qos=1)
            ready.set() if name == "site-a" else None
            async for message in client.messages:
                sink.append(f"{message.topic}:{message.payload!r}")
                if len(sink) >= count:
                    return

    # site-a tries every way to see site-b's commands; it is allowed only its own.
    a_subs = [f"{protocol.TOPIC_ROOT}/site-b/commands", f"{protocol.TOPIC_ROOT}/+/commands", "#",
              f"{protocol.TOPIC_ROOT}/site-a/commands"]
    task_a = asyncio.create_task(listen("site-a", a_subs, got_a, 1))
    task_b = asyncio.create_task(listen("site-b", [f"{protocol.TOPIC_ROOT}/site-b/commands"], got_b, 1))
    await asyncio.wait_for(ready.wait(), 10)
    await asyncio.sleep(0.3)  # site-b's subscription too
    async with mqtt_client(broker, HUB) as hub:
        await hub.publish(f"{protocol.TOPIC_ROOT}/site-b/commands", b"for-b", qos=1)
        await hub.publish(f"{protocol.TOPIC_ROOT}/site-a/commands", b"for-a", qos=1)
    await asyncio.wait_for(asyncio.gather(task_a, task_b), 10)
    assert got_b == [f"{protocol.TOPIC_ROOT}/site-b/commands:b'for-b'"]
    # The first (and only) thing site-a saw is its own command: site-b's, published earlier, never came.
    assert got_a == [f"{protocol.TOPIC_ROOT}/site-a/commands:b'for-a'"]


async def test_hub_identity_reads_all_sites_and_writes_commands(broker: Broker) -> None:
    collector = Collector()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        for site in ("site-a", "site-b"):
            async with mqtt_client(broker, site) as client:
                await client.publish(protocol.topic(site, protocol.Channel.EVENTS), _event(site, 1, site), qos=1)
        await collector.wait_for(lambda c: len(c.events()) == 2)
    assert sorted(e.site for e in collector.events()) == ["site-a", "site-b"]


async def test_client_without_fleet_certificate_is_refused(broker: Broker, pki: PKI, tmp_path: Path) -> None:
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=anonymous, timeout=2):
            pass
    fleetca = load_fleetca()
    fleetca.init_ca(tmp_path / "rogue")
    cert, key = fleetca.issue(tmp_path / "rogue", cn="site-b", kind="site", out_dir=tmp_path / "rogue-site")
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    rogue.load_cert_chain(str(cert), str(key))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=rogue, timeout=2):
            pass
    with pytest.raises(aiomqtt.MqttError):  # and no plain TCP at all
        async with aiomqtt.Client("127.0.0.1", broker.port, timeout=2):
            pass
    # Each listener takes only its own CA's certificates: no site on the hub listener, no hub on the sites one.
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.hub_port, tls_context=tls_context(pki, "site-a"), timeout=2):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=tls_context(pki, HUB), timeout=2):
            pass


async def test_site_cannot_take_over_another_sites_session(broker: Broker) -> None:
    """The client id is forced to the certificate CN, so claiming site-b's id kicks nobody."""
    async with mqtt_client(broker, "site-b") as b:
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="site-b", tls_context=tls_context(broker.pki, "site-a")
        ):
            await asyncio.sleep(0.3)
        # site-b's connection is still alive: a QoS 1 publish completes.
        await b.publish(protocol.topic("site-b", protocol.Channel.EVENTS), _event("site-b", 1, "alive"), qos=1)
    assert "site-b" in broker.log()


def test_fleetca_refuses_bad_identities(tmp_path: Path) -> None:
    fleetca = load_fleetca()
    fleetca.init_ca(tmp_path / "ca")
    for cn, kind in [("Site_A", "site"), ("hub", "hub"), ("a.edgefleet", "site"), ("x" * 64, "site")]:
        with pytest.raises(fleetca.CAError):
            fleetca.issue(tmp_path / "ca", cn=cn, kind=kind, out_dir=tmp_path / "out")
    assert fleetca.main(["issue", "--dir", str(tmp_path / "ca"), "--kind", "site", "--cn", "BAD",
                         "--out", str(tmp_path / "o")]) == 3
    assert fleetca.main(["issue", "--dir", str(tmp_path / "nope"), "--kind", "site", "--cn", "ok",
                         "--out", str(tmp_path / "o")]) == 4
    with pytest.raises(fleetca.CAError):  # no silent overwrite of the CA key
        fleetca.init_ca(tmp_path / "ca")


async def test_hub_replicas_choose_their_client_ids(broker: Broker) -> None:
    """A hub replica adopts a dead replica's session by its client id (hub/replicas.py): the hub
    listener must not force client id = CN, and two connections of one identity coexist."""
    collector = Collector()
    async with mqtt_client(broker, HUB, identifier="edgefleet-hub-a") as first, \
            mqtt_client(broker, HUB, identifier="edgefleet-hub-b") as second:
        await first.subscribe(f"{protocol.TOPIC_ROOT}/+/events", qos=1)
        await second.subscribe(f"{protocol.TOPIC_ROOT}/+/events", qos=1)
        async with mqtt_client(broker, "site-a") as site:
            await site.publish(protocol.topic("site-a", protocol.Channel.EVENTS), _event("site-a", 1, "x"), qos=1)
        for client in (first, second):
            async with asyncio.timeout(10):
                async for message in client.messages:
                    collector.raw.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]
                    break
    assert len(collector.raw) == 2


async def test_revoked_site_certificate_is_refused(broker: Broker, pki: PKI, tmp_path: Path) -> None:
    async with mqtt_client(broker, "site-c"):  # valid until revoked
        pass
    fleetca = load_fleetca()
    crl = fleetca.revoke(pki.ca.parent, cn="site-c")
    with_crl = Broker(workdir=tmp_path / "broker-crl", pki=pki, crl=crl)
    with_crl.workdir.mkdir()
    with_crl.start()
    try:
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt_client(with_crl, "site-c", timeout=2):
                pass
        async with mqtt_client(with_crl, "site-a") as site:  # everyone else is unaffected
            await site.publish(protocol.topic("site-a", protocol.Channel.EVENTS), _event("site-a", 1, "ok"), qos=1)
    finally:
        with_crl.stop()
