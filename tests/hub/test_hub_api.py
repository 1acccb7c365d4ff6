"""REST API: reads (anonymous or token), writes (token required), signed commands, bundle upload."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
from hub_harness import Broker, event, hub_cfg, publish, publisher, status, wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol
from bundles import dsse, keys, pack, trust
from bundles.manifest import Manifest
from hub import commands, service

W = {"Authorization": "Bearer w-secret"}


async def _collect_commands(broker: Broker, site: str, out: list[bytes], ready: asyncio.Event) -> None:
    async with publisher(broker) as sub:
        await sub.subscribe(protocol.topic(site, protocol.Channel.COMMANDS), qos=1)
        ready.set()
        async for m in sub.messages:
            assert isinstance(m.payload, bytes)
            out.append(m.payload)


async def test_reads_and_token_protected_writes(broker: Broker, tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    key_path, pub_path, keyid = commands.keygen(keydir)
    cfg = hub_cfg(
        broker=broker, db_url=f"sqlite:///{tmp_path / 'h.db'}", tmp=tmp_path, commands={"key_file": str(key_path)}
    )
    async with service.running(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        async with publisher(broker) as pub:
            await publish(
                pub,
                status(
                    "site-a",
                    1,
                    state="red",
                    snapshot=protocol.SnapshotInfo(
                        last_success=datetime.now(UTC) - timedelta(hours=1), size_bytes=1234, revision=7
                    ),
                ),
                channel=protocol.Channel.STATUS,
            )
            await publish(pub, status("site-b", 1), channel=protocol.Channel.STATUS)
            for seq in range(2, 8):
                await publish(
                    pub,
                    event("site-a", seq, type="snapshot.failed" if seq == 7 else "install.done"),
                    channel=protocol.Channel.EVENTS,
                )
        await wait_until(lambda: len(hub.ctx.store.site_events("site-a")) == 6, what="events")

        # Reads are anonymous by default.
        r = await http.get("/api/v1/sites", params={"state": "red"})
        assert r.status_code == 200 and [s["site"] for s in r.json()["items"]] == ["site-a"]
        r = await http.get("/api/v1/sites", params={"sort": "-site"})
        assert [s["site"] for s in r.json()["items"]] == ["site-b", "site-a"]
        r = await http.get("/api/v1/sites/site-a")
        assert r.json()["status"]["state"] == "red"
        assert (await http.get("/api/v1/sites/nope")).status_code == 404
        assert (await http.get("/api/v1/sites/NOT_VALID")).status_code == 422
        r = await http.get("/api/v1/sites/site-a/events", params={"limit": 4})
        page = r.json()
        assert [e["seq"] for e in page["items"]] == [2, 3, 4, 5] and page["next"] == 5
        r = await http.get("/api/v1/sites/site-a/events", params={"limit": 4, "after_seq": page["next"]})
        assert [e["seq"] for e in r.json()["items"]] == [6, 7] and r.json()["next"] is None
        r = await http.get("/api/v1/events", params={"type": "snapshot."})
        assert [e["seq"] for e in r.json()["items"]] == [7]
        r = await http.get("/api/v1/sites/site-a/history")
        assert len(r.json()) == 1 and r.json()[0]["state"] == "red"
        r = await http.get("/api/v1/sites/site-a/snapshots")
        snaps = r.json()
        assert sorted((s["source"], s["ok"]) for s in snaps) == [("event", False), ("status", True)]
        assert (await http.get("/api/v1/fleet")).json()["by_state"] == {"red": 1, "green": 1}
        assert "edgefleet_hub_messages_stored_total" in (await http.get("/metrics")).text
        assert "/api/v1/sites/{site}/commands" in (await http.get("/openapi.json")).json()["paths"]

        # Writes need the token.
        body = {"name": "snapshot-now"}
        assert (await http.post("/api/v1/sites/site-a/commands", json=body)).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await http.post("/api/v1/sites/site-a/commands", json=body, headers=bad)).status_code == 403
        assert (await http.post("/api/v1/bundles", content=b"x", headers=bad)).status_code == 403
        assert hub.ctx.store.commands() == []

        # Commands: signed with the command key, seq strictly increasing, published QoS 1 on the site's topic.
        got: list[bytes] = []
        ready = asyncio.Event()
        listener = asyncio.create_task(_collect_commands(broker, "site-a", got, ready))
        await ready.wait()
        try:
            ids = []
            for name in ("snapshot-now", "report-now", "snapshot-now"):
                r = await http.post("/api/v1/sites/site-a/commands", json={"name": name}, headers=W)
                assert r.status_code == 202, r.text
                assert r.json()["state"] == "published"
                ids.append(r.json()["cmd_id"])
            r = await http.post("/api/v1/sites/site-a/commands", json={"name": "install-bundle"}, headers=W)
            assert r.status_code == 400 and "args" in r.json()["detail"]
            r = await http.post("/api/v1/sites/site-a/commands", json={"name": "self-destruct"}, headers=W)
            assert r.status_code == 422
            await wait_until(lambda: len(got) == 3, what="3 commands on the wire")
        finally:
            listener.cancel()
        pub_key = keys.load_public(pub_path)
        seqs = []
        for raw in got:
            env = dsse.parse(raw, max_bytes=protocol.MAX_COMMAND_ENVELOPE_BYTES)
            assert env.payload_type == protocol.COMMAND_PAYLOAD_TYPE
            assert dsse.valid_keyids(env, keys={keyid: pub_key}) == {keyid}
            cmd = protocol.parse_command_payload(env.payload)
            assert cmd.site == "site-a" and cmd.expires > cmd.issued
            seqs.append(cmd.seq)
        assert seqs == [1, 2, 3]
        # Tampering breaks the signature.
        env = dsse.parse(got[0], max_bytes=protocol.MAX_COMMAND_ENVELOPE_BYTES)
        forged = dsse.Envelope(env.payload_type, env.payload.replace(b"snapshot-now", b"report-now"), env.signatures)
        assert dsse.valid_keyids(forged, keys={keyid: pub_key}) == set()

        # Replies move the command forward, never back; a reply from another site changes nothing.
        async with publisher(broker) as pub:
            for seq, (site, st) in enumerate(
                [("site-a", "accepted"), ("site-a", "done"), ("site-a", "accepted"), ("site-b", "failed")], start=20
            ):
                rep = protocol.Reply(site=site, seq=seq, cmd_id=ids[0], status=protocol.ReplyStatus(st), detail=st)
                await publish(pub, rep, channel=protocol.Channel.REPLIES)
        await wait_until(lambda: len(hub.ctx.store.get_command(ids[0])["replies"]) == 4, what="replies")  # type: ignore[index]
        r = await http.get(f"/api/v1/commands/{ids[0]}")
        assert r.json()["state"] == "done" and len(r.json()["replies"]) == 4
        r = await http.get("/api/v1/sites/site-a/commands")
        assert [c["seq"] for c in r.json()] == [3, 2, 1]


async def test_read_tokens_and_no_write_tokens(broker: Broker, tmp_path: Path) -> None:
    cfg = hub_cfg(
        broker=broker,
        db_url=f"sqlite:///{tmp_path / 'h.db'}",
        tmp=tmp_path,
        api={"read_tokens": ["r-secret"], "write_tokens": []},
    )
    async with service.running(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        assert (await http.get("/api/v1/sites")).status_code == 401
        assert (await http.get("/api/v1/sites", headers={"Authorization": "Bearer r-secret"})).status_code == 200
        # No write token configured: writes are refused even with a read token.
        r = await http.post(
            "/api/v1/sites/site-a/commands", json={"name": "report-now"}, headers={"Authorization": "Bearer r-secret"}
        )
        assert r.status_code == 403


async def _site_session(broker: Broker, site: str) -> None:
    """What an agent leaves at the broker: a persistent MQTT 5 session subscribed to its commands."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"agent-{site}", protocol=aiomqtt.ProtocolVersion.V5,
                              clean_start=False, properties=props) as client:
        await client.subscribe(protocol.topic(site, protocol.Channel.COMMANDS), qos=1)


async def test_command_without_broker_stays_pending_then_publishes(broker: Broker, tmp_path: Path) -> None:
    key_path, _pub, _kid = commands.keygen(tmp_path / "keys")
    await _site_session(broker, "site-a")
    cfg = hub_cfg(
        broker=broker,
        db_url=f"sqlite:///{tmp_path / 'h.db'}",
        tmp=tmp_path,
        commands={"key_file": str(key_path)},
        mqtt={"reconnect_max_seconds": 0.5},
    )
    async with service.running(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        broker.stop()
        await wait_until(lambda: hub.ctx.link.client is None, what="link down")
        r = await http.post("/api/v1/sites/site-a/commands", json={"name": "report-now"}, headers=W)
        assert r.status_code == 202 and r.json()["state"] == "pending"
        cmd_id = r.json()["cmd_id"]
        broker.start()
        await wait_until(
            lambda: hub.ctx.store.get_command(cmd_id)["state"] == "published",
            timeout=20,  # type: ignore[index]
            what="published after reconnect",
        )


def _make_bundle(tmp: Path, *, signer: Any, name: str = "site", version: str = "1.2.3") -> Path:
    src = tmp / "payload.txt"
    src.write_text("hello edge\n")
    now = datetime.now(UTC)
    manifest = Manifest(
        name=name,
        version=version,
        release=3,
        created=now - timedelta(minutes=5),
        expires=now + timedelta(days=30),
        files=(pack.file_entry("payload.txt", src),),
    )
    out = tmp / f"{name}-{version}.bundle"
    pack.write_bundle(out, manifest=manifest, sources={"payload.txt": src}, keys=[signer])
    return out


async def test_bundle_upload_is_verified_before_it_is_offered(broker: Broker, tmp_path: Path) -> None:
    signer = keys.generate()
    root = trust.make_root(release=[signer.public_key()], threshold=1, expires=datetime.now(UTC) + timedelta(days=30))
    root_path = tmp_path / "trust" / "root.json"
    trust.save_root(root_path, trust.sign_root(root, keys=[signer]).to_json())
    key_path, _pub, _kid = commands.keygen(tmp_path / "keys")
    cfg = hub_cfg(
        broker=broker,
        db_url=f"sqlite:///{tmp_path / 'h.db'}",
        tmp=tmp_path,
        trust_root=str(root_path),
        commands={"key_file": str(key_path)},
    )
    good = _make_bundle(tmp_path, signer=signer)
    (tmp_path / "other").mkdir()
    stranger = _make_bundle(tmp_path / "other", signer=keys.generate(), version="9.9.9")
    tampered = tmp_path / "tampered.bundle"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    async with service.running(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        r = await http.post("/api/v1/bundles", content=good.read_bytes())
        assert r.status_code == 401
        r = await http.post("/api/v1/bundles", content=stranger.read_bytes(), headers=W)
        assert r.status_code == 422, r.text
        assert "rejected" in r.json()["detail"] and r.json()["reason"]
        r = await http.post("/api/v1/bundles", content=tampered.read_bytes(), headers=W)
        assert r.status_code == 422, r.text
        r = await http.post("/api/v1/bundles", content=b"", headers=W)
        assert r.status_code == 400
        assert (await http.get("/api/v1/bundles")).json() == []
        assert [p.name for p in cfg.bundle_dir.iterdir()] == []  # nothing half-written left behind

        r = await http.post("/api/v1/bundles", content=good.read_bytes(), headers=W)
        assert r.status_code == 201, r.text
        offered = r.json()
        assert offered["name"] == "site" and offered["version"] == "1.2.3" and offered["release"] == 3
        r = await http.get(f"/api/v1/bundles/{offered['sha256']}/download")
        assert r.status_code == 200 and r.content == good.read_bytes()
        assert (await http.get(f"/api/v1/bundles/{'0' * 64}/download")).status_code == 404

        # install-bundle by reference resolves to this hub's download URL and the bundle's digest.
        r = await http.post(
            "/api/v1/sites/site-a/commands",
            headers=W,
            json={"name": "install-bundle", "args": {"bundle": offered["sha256"]}},
        )
        assert r.status_code == 202, r.text
        args = r.json()["args"]
        assert args["sha256"] == offered["sha256"]
        assert args["url"].endswith(f"/api/v1/bundles/{offered['sha256']}/download")
        r = await http.post(
            "/api/v1/sites/site-a/commands", headers=W, json={"name": "install-bundle", "args": {"bundle": "f" * 64}}
        )
        assert r.status_code == 400 and "no bundle" in r.json()["detail"]


async def test_commands_without_key_are_refused(broker: Broker, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'h.db'}", tmp=tmp_path)
    async with service.running(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        r = await http.post("/api/v1/sites/site-a/commands", json={"name": "report-now"}, headers=W)
        assert r.status_code == 503 and "keygen" in r.json()["detail"]


async def test_command_for_a_site_without_a_session_stays_pending(broker: Broker, tmp_path: Path) -> None:
    """MQTT 5 PUBACK "no matching subscribers": the broker dropped the command, so it is not "published".

    It stays pending (counted as unrouted) and goes out once the site has a session."""
    key_path, _pub, _kid = commands.keygen(tmp_path / "keys")
    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'h.db'}", tmp=tmp_path,
                  commands={"key_file": str(key_path)})
    async with service.running(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        r = await http.post("/api/v1/sites/site-new/commands", json={"name": "report-now"}, headers=W)
        assert r.status_code == 202 and r.json()["state"] == "pending"
        cmd_id = r.json()["cmd_id"]
        reg = hub.ctx.metrics.registry
        unrouted = reg.get_sample_value("edgefleet_hub_commands_total", {"name": "report-now", "outcome": "unrouted"})
        assert unrouted is not None and unrouted >= 1
        await _site_session(broker, "site-new")
        await wait_until(
            lambda: hub.ctx.store.get_command(cmd_id)["state"] == "published",  # type: ignore[index]
            timeout=20,
            what="published once the site has a session",
        )
