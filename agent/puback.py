"""PUBACK reason codes, which aiomqtt receives from paho and drops.

aiomqtt's ``publish(qos=1)`` returns once the PUBACK arrives, whatever it says. Under MQTT 5 the
broker may accept a message and still report that it went nowhere (0x10, no matching
subscribers: it was dropped) or refuse it (>= 0x80: not authorized, quota exceeded, ...). The
link (agent) and the command publisher (hub) must tell those apart from a delivery, so
:func:`track` wraps the paho client's ``on_publish`` (aiomqtt's callback still runs) and
``publish`` (to learn the message id of each publish, per task, through a context variable), and
:func:`publish` returns the code. MQTT 3.1.1 has no reason codes: paho reports success, 0.
"""

from __future__ import annotations

import contextvars
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

#: Accepted, but no subscription matched: the broker dropped the message (a retained one is kept).
NO_MATCHING_SUBSCRIBERS = 0x10

#: The message ids of the paho publishes made by the current task (see :func:`publish`).
_MIDS: contextvars.ContextVar[list[int]] = contextvars.ContextVar("edgefleet_puback_mids")

Codes = dict[int, int]


def track(client: aiomqtt.Client) -> Codes:
    """Start recording ``client``'s PUBACK reason codes; pass the result to :func:`publish`.

    Call it once per client, before publishing. Codes of publishes that time out stay in the
    mapping until the client is dropped (a client lives for one connection)."""
    codes: Codes = {}
    paho = client._client
    on_publish: Any = paho.on_publish  # aiomqtt's (a VERSION2 callback: it takes the reason code)
    paho_publish = paho.publish

    def recording_on_publish(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        codes[mid] = reason_code.value if isinstance(reason_code, ReasonCode) else int(reason_code)
        on_publish(c, userdata, mid, reason_code, properties)

    def recording_publish(*args: Any, **kwargs: Any) -> Any:
        info = paho_publish(*args, **kwargs)
        sink = _MIDS.get(None)
        if sink is not None:
            sink.append(info.mid)
        return info

    paho.on_publish = recording_on_publish
    paho.publish = recording_publish  # type: ignore[method-assign]
    return codes


async def publish(
    client: aiomqtt.Client, codes: Codes, topic: str, payload: bytes, *, retain: bool, timeout: float | None = None
) -> int:
    """``client.publish`` at QoS 1 (same errors), returning the PUBACK's reason code."""
    mids: list[int] = []
    token = _MIDS.set(mids)
    try:
        await client.publish(topic, payload, qos=1, retain=retain, timeout=timeout)
    finally:
        _MIDS.reset(token)
    return codes.pop(mids[0], 0) if mids else 0


def reason_name(code: int) -> str:
    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=code))
    except Exception:  # an unknown code: the number says it
        return "unknown"
