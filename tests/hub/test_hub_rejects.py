"""Garbage, oversized, wrong-schema and spoofed messages are refused, counted, and ingest carries on."""

from __future__ import annotations

import json
from pathlib import Path

from hub_harness import Broker, counter, event, hub_cfg, publish, publisher, status, wait_until

from agent import protocol
from hub import service


async def test_bad_messages_are_counted_and_ingest_keeps_going(broker: Broker, db_url: str, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=db_url, tmp=tmp_path)
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        reg = hub.ctx.metrics.registry
        good = event("site-a", 1)
        spoofed = event("site-b", 2)  # payload claims site-b ...
        wrong_schema = json.loads(event("site-a", 3).to_bytes())
        wrong_schema["schema"] = 99
        bad_field = json.loads(status("site-a", 4).to_bytes())
        bad_field["state"] = "purple"
        async with publisher(broker) as pub:
            await pub.publish("edgefleet/v1/sites/site-a/events", b"\x00\xffnot json", qos=1)
            await pub.publish("edgefleet/v1/sites/site-a/events", b"[1, 2, 3]", qos=1)
            await pub.publish("edgefleet/v1/sites/site-a/events", b"{" * 100_000, qos=1)  # over the 64 KiB cap
            await pub.publish("edgefleet/v1/sites/site-a/status", b"x" * (protocol.MAX_STATUS_BYTES + 1), qos=1)
            await pub.publish("edgefleet/v1/sites/site-a/events", json.dumps(wrong_schema).encode(), qos=1)
            await pub.publish("edgefleet/v1/sites/site-a/status", json.dumps(bad_field).encode(), qos=1)
            await pub.publish("edgefleet/v1/sites/site-a/events", spoofed.to_bytes(), qos=1)  # ... on site-a's topic
            await pub.publish("edgefleet/v1/sites/Bad_Site/events", good.to_bytes(), qos=1)
            await pub.publish("edgefleet/v1/sites/site-a/commands", good.to_bytes(), qos=1)  # not subscribed
            await publish(pub, good, channel=protocol.Channel.EVENTS)
            for seq in range(10, 20):
                await publish(pub, event("site-a", seq), channel=protocol.Channel.EVENTS)

        def stored() -> float:
            return counter(reg, "edgefleet_hub_messages_stored_total", kind="event")

        await wait_until(lambda: stored() == 11, what="good events stored")
        assert counter(reg, "edgefleet_hub_messages_rejected_total", reason="malformed") == 3  # bytes, array, bad state
        assert counter(reg, "edgefleet_hub_messages_rejected_total", reason="oversized") == 2
        assert counter(reg, "edgefleet_hub_messages_rejected_total", reason="schema") == 1
        assert counter(reg, "edgefleet_hub_messages_rejected_total", reason="spoofed") == 1
        assert counter(reg, "edgefleet_hub_messages_rejected_total", reason="topic") == 1
        assert hub.ctx.store.get_site("site-b") is None  # the spoofed event created nothing
        assert [e["seq"] for e in hub.ctx.store.site_events("site-a")] == [1, *range(10, 20)]


async def test_topic_validated_even_if_broker_delivers_anything(broker: Broker, tmp_path: Path) -> None:
    """A broker may deliver whatever it likes; the hub checks every topic itself."""
    from hub import ingest

    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'h.db'}", tmp=tmp_path)
    async with service.running(cfg, serve_api=False) as hub:
        pipe: ingest.Ingest = hub.ingest
        closed = ingest.Connection(client=None, window=10, open=False)  # type: ignore[arg-type]
        pipe.handle(
            topic="edgefleet/v1/sites/site-a/../site-b/status",
            payload=status("site-a", 1).to_bytes(),
            mid=0,
            qos=0,
            retain=False,
            conn=closed,
        )
        pipe.handle(topic="other/topic", payload=b"{}", mid=0, qos=0, retain=False, conn=closed)
        assert counter(hub.ctx.metrics.registry, "edgefleet_hub_messages_rejected_total", reason="topic") == 2
        assert not pipe.batch


def _outcome(fn: object, topic: str, payload: bytes) -> object:
    try:
        message = fn(topic, payload)  # type: ignore[operator]
        # ts and msg_id have default factories: compare them only when the payload carried them.
        return message.model_dump(exclude={k for k in ("ts", "msg_id") if f'"{k}"'.encode() not in payload})
    except protocol.ProtocolError as exc:
        return ("refused", exc.reason)


def test_fast_parse_agrees_with_the_protocol_reference() -> None:
    """The hub's fast path must accept and refuse exactly what agent.protocol.parse_site_message does."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from hub import ingest

    base = json.loads(status("site-a", 5).to_bytes())
    values = st.one_of(
        st.none(),
        st.integers(-2, 3),
        st.text(max_size=5),
        st.booleans(),
        st.just("site-b"),
        st.just([]),
        st.just({}),
        st.just("green"),
        st.just(1.5),
    )
    topics = st.sampled_from(
        [
            "edgefleet/v1/sites/site-a/status",
            "edgefleet/v1/sites/site-b/status",
            "edgefleet/v1/sites/site-a/events",
            "edgefleet/v2/sites/site-a/status",
            "edgefleet/v1/sites/site-a/status/x",
        ]
    )

    @settings(max_examples=150, deadline=None)
    @given(
        topic=topics,
        drop=st.sets(st.sampled_from(sorted(base))),
        change=st.dictionaries(st.sampled_from([*sorted(base), "extra"]), values, max_size=3),
    )
    def check(topic: str, drop: set[str], change: dict[str, object]) -> None:
        doc = {k: v for k, v in base.items() if k not in drop}
        doc.update(change)
        payload = json.dumps(doc).encode()
        assert _outcome(ingest.parse, topic, payload) == _outcome(protocol.parse_site_message, topic, payload)

    check()
