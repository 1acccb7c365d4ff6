from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import protocol


def test_status_round_trip() -> None:
    status = protocol.Status(site="store-1", seq=3, state=protocol.SiteState.YELLOW)
    parsed = protocol.parse_site_message(protocol.topic("store-1", protocol.Channel.STATUS), status.to_bytes())
    assert isinstance(parsed, protocol.Status)
    assert parsed.state is protocol.SiteState.YELLOW and parsed.msg_id == status.msg_id


def test_unknown_fields_are_tolerated_and_unknown_schema_refused() -> None:
    doc = json.loads(protocol.Event(site="s1", seq=1, type="a.b", summary="x").to_bytes())
    doc["from_the_future"] = {"x": 1}
    topic = protocol.topic("s1", protocol.Channel.EVENTS)
    assert isinstance(protocol.parse_site_message(topic, json.dumps(doc).encode()), protocol.Event)
    doc["schema"] = 2
    with pytest.raises(protocol.UnknownSchema):
        protocol.parse_site_message(topic, json.dumps(doc).encode())


def test_spoofed_site_is_refused() -> None:
    event = protocol.Event(site="site-a", seq=1, type="a.b", summary="x")
    with pytest.raises(protocol.Spoofed):
        protocol.parse_site_message(protocol.topic("site-b", protocol.Channel.EVENTS), event.to_bytes())


def test_oversized_is_refused_before_parsing() -> None:
    with pytest.raises(protocol.Oversized):
        protocol.parse_site_message(
            protocol.topic("s1", protocol.Channel.EVENTS), b"{" + b" " * protocol.MAX_EVENT_BYTES + b"}"
        )


@given(topic=st.text(max_size=80), payload=st.binary(max_size=2048))
def test_any_input_parses_or_fails_cleanly(topic: str, payload: bytes) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        protocol.parse_site_message(topic, payload)


@given(payload=st.binary(max_size=2048))
def test_any_command_payload_parses_or_fails_cleanly(payload: bytes) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        protocol.parse_command_payload(payload)
