"""The agent link against a real mosquitto (mTLS, shipped ACLs): delivery, outages, restarts.

The "hub" here is a plain persistent subscriber with the hub certificate; it records every
message as delivered, so duplicates are visible and the tests dedupe by msg_id as the hub must.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from link_harness import Broker, Collector, collect, running

from agent import link, outbox, protocol

PROTOCOLS = ["5", "3.1.1"]


def _dedupe(events: list[protocol.Event]) -> list[protocol.Event]:
    seen: set[str] = set()
    out = []
    for event in events:
        if event.msg_id not in seen:
            seen.add(event.msg_id)
            out.append(event)
    return out


def _emitted(agent: Any, n: int, start: int = 0) -> list[protocol.Event]:
    return [agent.ctx.emit("test.outage", f"event {i}", data={"i": i}) for i in range(start, start + n)]


@pytest.mark.parametrize("version", PROTOCOLS)
async def test_events_status_and_online_reach_the_hub(broker: Broker, make_agent: Any, version: str) -> None:
    agent = make_agent(broker, protocol=version)
    collector = Collector()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        async with running(link.run(agent.ctx)):
            emitted = _emitted(agent, 20)
            await collector.wait_for(lambda c: len(c.events()) >= 20 and c.of_type(protocol.Status))
            online = collector.of_type(protocol.Online)
            assert online and online[0].online is True
        # Shut down cleanly: the link says offline itself (a clean DISCONNECT suppresses the will).
        await collector.wait_for(lambda c: c.of_type(protocol.Online)[-1].online is False)
    assert [e.msg_id for e in _dedupe(collector.events())] == [e.msg_id for e in emitted]
    status = collector.of_type(protocol.Status)[0]
    assert status.site == "site-a" and status.interval_seconds == 30
    assert outbox.stats(agent.ctx.store).messages == 0  # everything acknowledged and deleted


async def test_status_and_online_are_retained_for_late_subscribers(broker: Broker, make_agent: Any) -> None:
    agent = make_agent(broker)
    async with running(link.run(agent.ctx)) as task:
        await asyncio.sleep(0.5)
        collector = Collector()
        async with running(collect(broker, collector)):
            await collector.wait_for(lambda c: c.of_type(protocol.Status) and c.of_type(protocol.Online))
            assert collector.of_type(protocol.Online)[-1].online is True
            # report-now (from a command or a state change) publishes a fresh status at once.
            count = len(collector.of_type(protocol.Status))
            agent.ctx.report_now.set()
            await collector.wait_for(lambda c: len(c.of_type(protocol.Status)) > count)
        assert not task.done()


async def test_limp_home_slows_status_reports(broker: Broker, make_agent: Any) -> None:
    agent = make_agent(broker, status_interval_seconds=30, limp_status_interval_seconds=300)
    agent.ctx.limp_home.set()
    collector = Collector()
    async with running(collect(broker, collector)), running(link.run(agent.ctx)):
        await collector.wait_for(lambda c: c.of_type(protocol.Status))
    # The hub judges staleness by the interval the site announces.
    assert collector.of_type(protocol.Status)[0].interval_seconds == 300


@pytest.mark.parametrize("version", PROTOCOLS)
async def test_outage_every_event_delivered_once_in_order(broker: Broker, make_agent: Any, version: str) -> None:
    """Broker really down while events accumulate; after it returns: all there, in order."""
    agent = make_agent(broker, protocol=version)
    collector = Collector()
    async with running(collect(broker, collector)), running(link.run(agent.ctx)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        before = _emitted(agent, 10)
        await collector.wait_for(lambda c: len(_dedupe(c.events())) >= 10)
        broker.stop()
        during = []
        for i in range(10, 60):  # the outage: events keep coming while nothing can be delivered
            during.append(agent.ctx.emit("test.outage", f"event {i}", data={"i": i}))
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # several failed reconnect attempts
        assert outbox.stats(agent.ctx.store).messages >= 50
        broker.start()
        after = _emitted(agent, 10, start=60)
        await collector.wait_for(lambda c: len(_dedupe(c.events())) >= 70, timeout=30)
    got = _dedupe(collector.events())
    assert [e.msg_id for e in got] == [e.msg_id for e in before + during + after]
    assert [e.data["i"] for e in got] == list(range(70))


async def test_duplicates_after_lost_pubacks_are_identical_and_dedupable(broker: Broker, make_agent: Any) -> None:
    """Freeze the broker mid-stream: PUBACKs time out, the agent reconnects and re-sends, and the
    frozen broker later delivers the first copies too. Every copy carries the same msg_id and
    bytes, so the hub's msg_id dedupe yields each event once, in order."""
    agent = make_agent(broker, publish_timeout_seconds=0.5, max_inflight=5, replay_rate_per_second=200)
    collector = Collector()
    async with running(collect(broker, collector)), running(link.run(agent.ctx)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        await collector.wait_for(lambda c: c.of_type(protocol.Status))
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        emitted = _emitted(agent, 30)
        await asyncio.sleep(2.0)  # publishes time out; reconnect attempts hang on the frozen broker
        broker.proc.send_signal(signal.SIGCONT)
        await collector.wait_for(lambda c: len(_dedupe(c.events())) >= 30, timeout=60)
        await asyncio.sleep(0.5)
    first_copy: dict[str, bytes] = {}
    for topic, payload in collector.raw:
        message = protocol.parse_site_message(topic, payload)
        if isinstance(message, protocol.Event):
            assert first_copy.setdefault(message.msg_id, payload) == payload
    assert [e.msg_id for e in _dedupe(collector.events())] == [e.msg_id for e in emitted]


@pytest.mark.parametrize("version", PROTOCOLS)
async def test_command_sent_while_site_offline_is_delivered_on_reconnect(
    broker: Broker, make_agent: Any, version: str
) -> None:
    """Persistent session: the broker queues QoS 1 commands for the offline site."""
    from link_harness import HUB2, mqtt_client, sign

    agent = make_agent(broker, protocol=version)
    collector = Collector()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        async with running(link.run(agent.ctx)):
            await collector.wait_for(lambda c: c.of_type(protocol.Online))
        # The agent is gone (session kept by the broker); the hub sends a command now.
        async with mqtt_client(broker, HUB2) as hub:
            await hub.publish(
                protocol.topic("site-a", protocol.Channel.COMMANDS),
                sign(agent, seq=1, name=protocol.CommandName.SNAPSHOT_NOW), qos=1,
            )
        assert not agent.ctx.snapshot_now.is_set()
        async with running(link.run(agent.ctx)):
            await asyncio.wait_for(agent.ctx.snapshot_now.wait(), 20)
            await collector.wait_for(lambda c: c.replies())
    (reply,) = collector.replies()
    assert reply.status is protocol.ReplyStatus.ACCEPTED


async def test_replay_after_outage_is_rate_limited(broker: Broker, make_agent: Any) -> None:
    agent = make_agent(broker, replay_rate_per_second=40, replay_burst=5)
    collector = Collector()
    broker.stop()
    emitted = _emitted(agent, 45)
    broker.start()
    async with running(collect(broker, collector)):
        await asyncio.wait_for(collector.ready.wait(), 10)
        async with running(link.run(agent.ctx)):
            started = time.monotonic()
            await collector.wait_for(lambda c: len(_dedupe(c.events())) >= 45, timeout=30)
            elapsed = time.monotonic() - started
    # 45 events + 1 status through a 5-token burst at 40/s cannot take less than ~1 s.
    assert elapsed >= (46 - 5) / 40 * 0.9
    assert [e.msg_id for e in _dedupe(collector.events())] == [e.msg_id for e in emitted]


def test_backoff_has_full_jitter_and_a_cap() -> None:
    delays = [link.backoff_delay(attempt, base=1.0, cap=30.0) for attempt in range(12) for _ in range(50)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert max(delays) > 20.0  # grows to the cap
    first = [link.backoff_delay(0, base=1.0, cap=30.0) for _ in range(200)]
    assert max(first) <= 1.0 and len(set(first)) > 150  # jittered, not lockstep


async def test_events_nobody_subscribed_to_stay_in_the_outbox(
    broker: Broker, make_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT 5 PUBACK "no matching subscribers": the broker dropped the message, so the event stays.

    (As after a Mosquitto restart, which forgets shared subscriptions until the hub replicas
    resubscribe.) The retained status counts as delivered; events wait and are retried from the
    oldest once a subscriber is back, all of them, in order.
    """
    monkeypatch.setattr(link, "UNROUTED_HOLD_MIN", 0.3)
    agent = make_agent(broker, protocol="5")
    before = link.UNROUTED._value.get()
    async with running(link.run(agent.ctx)):
        emitted = _emitted(agent, 5)
        deadline = time.monotonic() + 10
        while link.UNROUTED._value.get() == before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert link.UNROUTED._value.get() > before
        assert outbox.stats(agent.ctx.store).messages >= 5  # the events (and maybe a fresh status) are kept
        collector = Collector()
        async with running(collect(broker, collector)):
            await collector.wait_for(lambda c: len(_dedupe(c.events())) >= 5, timeout=20)
    assert [e.msg_id for e in _dedupe(collector.events())] == [e.msg_id for e in emitted]


async def test_shutdown_does_not_wait_on_a_hung_broker(broker: Broker, make_agent: Any) -> None:
    """SIGTERM while the broker is frozen: the link gives up saying goodbye after a bounded wait.

    The offline publish is bounded (2 s); paho reports the DISCONNECT done once it is written, so
    leaving the client does not wait for the broker. The will announces the site offline anyway."""
    agent = make_agent(broker, publish_timeout_seconds=10)
    collector = Collector()
    async with running(collect(broker, collector)):
        task = asyncio.create_task(link.run(agent.ctx))
        await collector.wait_for(lambda c: c.of_type(protocol.Online))
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            task.cancel()
            await asyncio.wait({task}, timeout=30)
            took = time.monotonic() - started
        finally:
            broker.proc.send_signal(signal.SIGCONT)
    assert task.cancelled()
    assert took < 7.0, f"shutdown took {took:.1f} s"
