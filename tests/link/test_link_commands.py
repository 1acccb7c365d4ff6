"""Signed commands on the agent: forged, replayed, expired, wrong-site → rejected and reported;
valid → executed once, replied; duplicates → same reply, no re-execution. The last test runs
the whole path through mosquitto."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from link_harness import HUB2, Broker, Collector, collect, mqtt_client, running, sign

from agent import commands, link, outbox, protocol
from agent.context import AgentContext
from agent.state import StateStore
from bundles import dsse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent_install"))


class _NoBroker:
    """make_agent needs only a port and PKI paths for these broker-less tests."""

    def __init__(self, pki: Any) -> None:
        self.pki = pki
        self.port = 1


@pytest.fixture
def agent(make_agent: Any, pki: Any) -> Any:
    return make_agent(_NoBroker(pki))


def _queued(ctx: AgentContext) -> tuple[list[protocol.Event], list[protocol.Reply]]:
    events, replies = [], []
    for row in outbox.pending(ctx.store, limit=10_000):
        if row.channel is protocol.Channel.EVENTS:
            events.append(protocol.Event.model_validate_json(row.payload))
        elif row.channel is protocol.Channel.REPLIES:
            replies.append(protocol.Reply.model_validate_json(row.payload))
    return events, replies


def _rejections(ctx: AgentContext) -> list[str]:
    events, replies = _queued(ctx)
    reasons = [e.data["reason"] for e in events if e.type == commands.REJECTED_EVENT]
    assert [r.data["reason"] for r in replies if r.status is protocol.ReplyStatus.REJECTED] == reasons
    return reasons


def _drain(ctx: AgentContext) -> None:
    for row in outbox.pending(ctx.store, limit=10_000):
        outbox.ack(ctx.store, row.id)


async def test_valid_snapshot_now_sets_the_event_and_replies(agent: Any) -> None:
    envelope = sign(agent, seq=1, name=protocol.CommandName.SNAPSHOT_NOW)
    command = commands.admit(agent.ctx, envelope)
    assert command is not None and command.name is protocol.CommandName.SNAPSHOT_NOW
    reply = await commands.execute(agent.ctx, command)
    assert agent.ctx.snapshot_now.is_set()
    assert reply.status is protocol.ReplyStatus.ACCEPTED and reply.cmd_id == command.cmd_id
    assert _queued(agent.ctx)[1] == [reply]
    assert _rejections(agent.ctx) == []


async def test_duplicate_gets_the_same_reply_and_does_not_run_again(agent: Any) -> None:
    envelope = sign(agent, seq=1, name=protocol.CommandName.SNAPSHOT_NOW)
    command = commands.admit(agent.ctx, envelope)
    assert command is not None
    first = await commands.execute(agent.ctx, command)
    _drain(agent.ctx)  # the reply was published and acknowledged
    agent.ctx.snapshot_now.clear()
    assert commands.admit(agent.ctx, envelope) is None  # redelivered (QoS 1, broker restart, hub retry)
    assert not agent.ctx.snapshot_now.is_set()
    _, replies = _queued(agent.ctx)
    assert replies == [first]  # byte-identical, same msg_id: the hub dedupes it
    assert commands.admit(agent.ctx, envelope) is None  # while still unsent: no second copy queued
    assert len(_queued(agent.ctx)[1]) == 1
    assert _rejections(agent.ctx) == []


async def test_forged_commands_are_rejected_and_reported(agent: Any) -> None:
    ctx = agent.ctx
    stranger = Ed25519PrivateKey.generate()
    assert commands.admit(ctx, sign(agent, seq=1, name=protocol.CommandName.SNAPSHOT_NOW, key=stranger)) is None
    # A valid envelope with its payload swapped (signature no longer matches).
    good = json.loads(sign(agent, seq=2, name=protocol.CommandName.REPORT_NOW))
    evil = protocol.Command(site="site-a", seq=3, name=protocol.CommandName.SNAPSHOT_NOW,
                            expires=datetime.now(UTC) + timedelta(minutes=5))
    good["payload"] = base64.b64encode(evil.to_bytes()).decode()
    assert commands.admit(ctx, json.dumps(good).encode()) is None
    # Signed by the hub key, but not as a command (payload type binds the purpose).
    other = dsse.sign(payload_type="application/vnd.edgefleet.manifest+json", payload=evil.to_bytes(),
                      keys=[agent.hub_key])
    assert commands.admit(ctx, other.to_json()) is None
    assert commands.admit(ctx, b"\xff garbage") is None
    assert commands.admit(ctx, b"{" * (protocol.MAX_COMMAND_ENVELOPE_BYTES + 1)) is None
    assert not ctx.snapshot_now.is_set() and not ctx.report_now.is_set()
    assert _rejections(ctx) == ["forged", "forged", "forged", "malformed", "malformed"]
    events, replies = _queued(ctx)
    assert events[0].severity is protocol.Severity.WARNING and events[0].data["verified"] is False
    assert replies[1].cmd_id == evil.cmd_id  # unverified, echoed for correlation only
    assert int(ctx.store.get(commands.LAST_SEQ_KEY, 0)) == 0  # nothing forged moved the sequence


async def test_replayed_commands_are_rejected_even_after_restart(agent: Any, tmp_path: Path) -> None:
    ctx = agent.ctx
    assert commands.admit(ctx, sign(agent, seq=5, name=protocol.CommandName.REPORT_NOW)) is not None
    assert commands.admit(ctx, sign(agent, seq=5, name=protocol.CommandName.REPORT_NOW)) is None
    assert commands.admit(ctx, sign(agent, seq=4, name=protocol.CommandName.SNAPSHOT_NOW)) is None
    # The last accepted seq is persisted: a restarted agent still refuses the old ones.
    reopened = AgentContext(config=ctx.config, store=StateStore.open(ctx.config.state_dir))
    try:
        assert commands.admit(reopened, sign(agent, seq=3, name=protocol.CommandName.SNAPSHOT_NOW)) is None
        assert commands.admit(reopened, sign(agent, seq=6, name=protocol.CommandName.SNAPSHOT_NOW)) is not None
        assert _rejections(reopened) == ["replay", "replay", "replay"]
    finally:
        reopened.store.close()


async def test_expired_future_overlong_and_wrong_site_commands_are_rejected(agent: Any) -> None:
    ctx = agent.ctx
    skew = ctx.config.link.command_clock_skew_seconds
    now = datetime.now(UTC)
    name = protocol.CommandName.SNAPSHOT_NOW
    cases = [
        sign(agent, seq=1, name=name, issued=now - timedelta(hours=1), expires=now - timedelta(seconds=skew + 5)),
        sign(agent, seq=2, name=name, issued=now + timedelta(seconds=skew + 60), expires=now + timedelta(hours=1)),
        sign(agent, seq=3, name=name, expires=now + timedelta(days=30)),
        sign(agent, seq=4, name=name, site="site-b"),
    ]
    for envelope in cases:
        assert commands.admit(ctx, envelope) is None
    assert _rejections(ctx) == ["expired", "not-yet-valid", "lifetime", "wrong-site"]
    # Within the tolerated skew both ways, it is accepted (hub and site clocks differ a little).
    ok = sign(agent, seq=5, name=name, issued=now + timedelta(seconds=skew - 30),
              expires=now - timedelta(seconds=skew - 30) + timedelta(minutes=1))
    assert commands.admit(ctx, ok) is not None


async def test_missing_hub_key_refuses_everything(agent: Any) -> None:
    (agent.ctx.config.trust_dir / protocol.HUB_COMMAND_KEY_FILE).unlink()
    assert commands.admit(agent.ctx, sign(agent, seq=1, name=protocol.CommandName.REPORT_NOW)) is None
    assert _rejections(agent.ctx) == ["no-key"]


async def test_a_killed_verifier_refuses_the_command(agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The signature is checked in a child process (agent.verifyproc); one that dies answers nothing,
    # and nothing unverified may pass: the command is refused, the sequence does not move.
    monkeypatch.setenv("EDGEFLEET_FAILPOINT", "verifier:command")
    envelope = sign(agent, seq=1, name=protocol.CommandName.REPORT_NOW)
    assert commands.admit(agent.ctx, envelope) is None
    assert _rejections(agent.ctx) == ["verifier-failed"]
    events, replies = _queued(agent.ctx)
    assert "SIGKILL" in events[0].summary and events[0].data["verified"] is False
    assert replies[0].cmd_id == json.loads(base64.b64decode(json.loads(envelope)["payload"]))["cmd_id"]
    assert int(agent.ctx.store.get(commands.LAST_SEQ_KEY, 0)) == 0
    monkeypatch.delenv("EDGEFLEET_FAILPOINT")
    assert commands.admit(agent.ctx, envelope) is not None  # the same command, once verified, runs


async def test_rejection_reports_are_rate_limited(agent: Any) -> None:
    for _ in range(commands.REJECT_BURST * 3):
        commands.admit(agent.ctx, b"junk")
    assert len(_rejections(agent.ctx)) == commands.REJECT_BURST
    commands._reject_budget[agent.ctx.store][0] = 1.0  # time passes: one token back
    commands.admit(agent.ctx, b"junk")
    events, _ = _queued(agent.ctx)
    assert events[-1].data["suppressed_since_last_report"] == commands.REJECT_BURST * 2


async def test_interrupted_command_gets_a_failed_reply_after_restart(agent: Any) -> None:
    command = commands.admit(agent.ctx, sign(agent, seq=1, name=protocol.CommandName.INSTALL_BUNDLE))
    assert command is not None  # admitted, then the agent died before finishing
    assert commands.recover(agent.ctx) == 1
    _, replies = _queued(agent.ctx)
    assert [r.status for r in replies] == [protocol.ReplyStatus.FAILED] and replies[0].cmd_id == command.cmd_id
    assert commands.recover(agent.ctx) == 0


@pytest.fixture
async def bundle_server(tmp_path: Path) -> Any:
    files: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            return web.Response(status=404)
        return web.Response(body=files[name])

    app = web.Application()
    app.router.add_get("/bundles/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield files, f"http://127.0.0.1:{port}/bundles"
    await runner.cleanup()


async def test_install_bundle_downloads_verifies_and_queues(agent: Any, bundle_server: Any, tmp_path: Path) -> None:
    from install_kit import build_bundle, make_trust, site_v1

    from agent.install import journal

    files, base = bundle_server
    keys = make_trust(agent.ctx.config.trust_dir)
    bundle = build_bundle(tmp_path / "v1.bundle", k=keys, comps=site_v1(), version="1.0.0", release=1)
    data = bundle.read_bytes()
    files["v1.bundle"] = data
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF
    files["bad.bundle"] = bytes(tampered)
    sha = hashlib.sha256(data).hexdigest()

    async def run(seq: int, **args: Any) -> protocol.Reply:
        command = commands.admit(agent.ctx, sign(agent, seq=seq, name=protocol.CommandName.INSTALL_BUNDLE,
                                                 args=args))
        assert command is not None
        return await commands.execute(agent.ctx, command)

    bad = await run(1, url=f"{base}/bad.bundle")
    assert bad.status is protocol.ReplyStatus.FAILED and "rejected" in bad.detail
    wrong_hash = await run(2, url=f"{base}/v1.bundle", sha256="0" * 64)
    assert wrong_hash.status is protocol.ReplyStatus.FAILED and "sha256" in wrong_hash.detail
    missing = await run(3, url=f"{base}/nope.bundle")
    assert missing.status is protocol.ReplyStatus.FAILED and "404" in missing.detail
    assert journal.active_run(agent.ctx.store) is None  # nothing half-applied
    good = await run(4, url=f"{base}/v1.bundle", sha256=sha)
    assert good.status is protocol.ReplyStatus.DONE, good.detail
    assert good.data["bundle"] == "site-1.0.0"
    run_ = journal.active_run(agent.ctx.store)
    assert run_ is not None and run_.state == "staged"
    # Every install-bundle got an "accepted" reply first, then exactly one final reply.
    _, replies = _queued(agent.ctx)
    assert [r.status.value for r in replies] == ["accepted", "failed"] * 3 + ["accepted", "done"]
    assert list((agent.ctx.config.inbox / ".incoming").iterdir()) == []  # no download left behind


async def test_install_bundle_respects_the_size_cap(agent: Any, bundle_server: Any, make_agent: Any,
                                                    pki: Any) -> None:
    files, base = bundle_server
    files["big.bundle"] = b"x" * 5000
    capped = make_agent(_NoBroker(pki), site="site-b", fetch_max_bytes=4096)
    command = commands.admit(capped.ctx, sign(capped, seq=1, name=protocol.CommandName.INSTALL_BUNDLE,
                                              args={"url": f"{base}/big.bundle"}))
    assert command is not None
    reply = await commands.execute(capped.ctx, command)
    assert reply.status is protocol.ReplyStatus.FAILED and "cap" in reply.detail


async def test_commands_end_to_end_through_mosquitto(broker: Broker, make_agent: Any) -> None:
    """The hub publishes a forged and a valid command; the agent runs only the valid one and the
    hub sees both outcomes (the rejection as an event and a reply)."""
    agent = make_agent(broker)
    collector = Collector()
    topic = protocol.topic("site-a", protocol.Channel.COMMANDS)
    async with running(collect(broker, collector)), running(link.run(agent.ctx)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        await collector.wait_for(lambda c: c.of_type(protocol.Online))
        forged = sign(agent, seq=1, name=protocol.CommandName.SNAPSHOT_NOW, key=Ed25519PrivateKey.generate())
        valid = sign(agent, seq=2, name=protocol.CommandName.SNAPSHOT_NOW)
        async with mqtt_client(broker, HUB2) as hub:
            await hub.publish(topic, forged, qos=1)
            await hub.publish(topic, valid, qos=1)
            await hub.publish(topic, valid, qos=1)  # duplicate delivery
        await collector.wait_for(lambda c: len(c.replies()) >= 2)
        assert agent.ctx.snapshot_now.is_set()
        await asyncio.sleep(0.5)
    replies = collector.replies()
    # The duplicate is answered with the stored reply: either a second identical copy, or none if
    # the first copy was still waiting in the outbox (same msg_id, queued once).
    assert len({r.msg_id for r in replies}) == 2
    assert [r.status for r in replies[:2]] == [protocol.ReplyStatus.REJECTED, protocol.ReplyStatus.ACCEPTED]
    assert all(r.msg_id == replies[1].msg_id for r in replies[2:])
    rows = agent.ctx.store.db.execute("SELECT status FROM commands").fetchall()
    assert [r["status"] for r in rows] == ["accepted"]  # executed once
    rejected = [e for e in collector.events() if e.type == commands.REJECTED_EVENT]
    assert len(rejected) == 1 and rejected[0].data["reason"] == "forged"


async def test_a_flood_on_the_commands_topic_is_checked_within_a_budget(
    agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each signature check is a child process, so the link checks at most a burst, then a trickle:
    a broker flooding the topic gets ``rate-limited`` rejections, not a fork per message; the
    checks run off the event loop, and a valid command within the budget still runs."""
    from agent import verifyproc

    monkeypatch.setattr(commands, "VERIFY_BURST", 3)
    monkeypatch.setattr(commands, "VERIFY_REFILL_SECONDS", 3600.0)
    spawned = []
    real_run = verifyproc.run

    def counting_run(request: dict[str, Any]) -> dict[str, Any]:
        spawned.append(request["op"])
        return real_run(request)

    monkeypatch.setattr(verifyproc, "run", counting_run)
    ctx = agent.ctx
    forged = sign(agent, seq=1, name=protocol.CommandName.SNAPSHOT_NOW, key=Ed25519PrivateKey.generate())
    before = commands.COMMANDS.labels(outcome="rejected-rate-limited")._value.get()
    valid = await commands.receive(ctx, sign(agent, seq=2, name=protocol.CommandName.REPORT_NOW))
    assert valid is not None and valid.seq == 2
    results = [await commands.receive(ctx, forged) for _ in range(10)]
    assert results == [None] * 10
    assert len(spawned) == 3  # the valid one and two forged; the other eight were not checked
    assert commands.COMMANDS.labels(outcome="rejected-rate-limited")._value.get() - before == 8
