"""The agent's MQTT link to the hub: status, events and replies out; signed commands in.

Nothing here is allowed to lose a message, and nothing here trusts the broker:

* Every outgoing message is first a row in the outbox (agent/outbox.py). The link drains the
  outbox in order and deletes a row only after its PUBACK. aiomqtt's ``publish(qos=1)`` raises
  on a PUBACK timeout (the message may still arrive, so a duplicate may follow) and at once
  while disconnected; either way the row stays and is sent again after reconnecting. The hub
  deduplicates by ``msg_id``, which is fixed when the row is written, so a re-send is the
  identical message.
* PUBACKs arrive in order on one connection, so acknowledging rows as their PUBACKs come back
  keeps the published order even with several messages in flight. After any publish failure
  the connection is dropped and the drain restarts from the oldest unacknowledged row.
* Draining goes through a token bucket (``replay_rate_per_second``/``replay_burst``): a fleet
  returning from an outage sends its backlog at a bounded rate instead of all at once.
* The session is persistent (MQTT 5: ``clean_start=False`` plus a session expiry; 3.1.1:
  ``clean_session=False``) under a stable client id, so commands the hub sent while the site
  was offline are delivered on reconnect. aiomqtt acknowledges an incoming QoS 1 message before
  we see it, so commands are made idempotent (agent/commands.py) rather than relying on the ack.
* ``online`` is retained: ``true`` after connecting, ``false`` as the Last Will and, since a
  clean DISCONNECT suppresses the will, also published explicitly on shutdown.
* Reconnects back off exponentially with full jitter, so sites that lost the broker together
  do not come back in lockstep.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter, Gauge

from agent import commands, outbox, protocol, puback, sitestatus
from agent.config import LinkConfig
from agent.context import AgentContext

log = structlog.get_logger("edgefleet.link")

#: Idle poll of the outbox when no wakeup arrives (rows written by another process).
POLL_SECONDS = 1.0
#: A connection that lasted this long resets the backoff.
STABLE_SECONDS = 60.0

CONNECTED = Gauge("edgefleet_link_connected", "1 while connected to the broker")
CONNECTS = Counter("edgefleet_link_connects_total", "Successful connections to the broker")
FAILURES = Counter("edgefleet_link_failures_total", "Lost or failed connections to the broker")
PUBLISHED = Counter("edgefleet_link_published_total", "Messages acknowledged by the broker", ["channel"])
UNROUTED = Counter(
    "edgefleet_link_unrouted_total", "Times the broker had no subscriber for an event or reply (kept, retried later)"
)

#: Hold-off before retrying an event nobody subscribed to, doubling up to the maximum.
UNROUTED_HOLD_MIN, UNROUTED_HOLD_MAX = 5.0, 300.0
#: Retained channels: the broker keeps the latest even without a subscriber.
_RETAINED = frozenset({protocol.Channel.STATUS, protocol.Channel.ONLINE})


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 62))))


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, *, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


def client_id(ctx: AgentContext) -> str:
    return ctx.config.link.client_id or f"edgefleet-{ctx.site}"


def _tls_context(cfg: LinkConfig) -> ssl.SSLContext | None:
    if cfg.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = cfg.tls_check_hostname
    if cfg.tls_cert is not None:
        context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key) if cfg.tls_key else None)
    return context


def make_client(ctx: AgentContext) -> aiomqtt.Client:
    """A fresh client per connection attempt (no paho state carried across connections)."""
    cfg = ctx.config.link
    will = protocol.Online(site=ctx.site, seq=outbox.next_seq(ctx.store), online=False)
    kwargs: dict[str, Any] = {}
    if cfg.protocol == "5":
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = cfg.session_expiry_seconds
        kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=properties)
    else:
        kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=False)
    tls = _tls_context(cfg)
    if tls is not None:
        kwargs.update(tls_context=tls, tls_insecure=not cfg.tls_check_hostname)
    return aiomqtt.Client(
        cfg.host,
        cfg.port,
        identifier=client_id(ctx),
        will=aiomqtt.Will(
            topic=protocol.topic(ctx.site, protocol.Channel.ONLINE), payload=will.to_bytes(), qos=1, retain=True
        ),
        keepalive=cfg.keepalive_seconds,
        timeout=cfg.publish_timeout_seconds,
        max_inflight_messages=cfg.max_inflight,
        **kwargs,
    )


async def run(ctx: AgentContext) -> None:
    """The daemon task: sample status, keep the connection, drain the outbox, take commands."""
    cfg = ctx.config.link
    outbox.configure(
        ctx.store,
        outbox.Limits(
            max_messages=cfg.outbox_max_messages, max_bytes=cfg.outbox_max_bytes,
            max_age_seconds=cfg.outbox_max_age_seconds,
        ),
    )
    commands.setup(ctx.store)
    commands.recover(ctx)
    if not cfg.enabled:
        log.info("link disabled in config; events stay in the outbox")
        await asyncio.Future()  # run forever (until cancelled) like every other task
    if cfg.tls_ca is None and cfg.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "link to a remote broker without TLS: site traffic can be read and forged on the way "
            "(commands still need the hub signature); set link.tls_ca, tls_cert, tls_key",
            host=cfg.host,
        )
    running: set[asyncio.Task[Any]] = set()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_status_loop(ctx))
            group.create_task(_connection_loop(ctx, running))
    finally:
        for task in running:
            task.cancel()


async def _status_loop(ctx: AgentContext) -> None:
    """A fresh status into the outbox every interval (slower in limp-home), at once on report_now.

    It runs whether or not the link is up: the unsent status is compacted (latest wins), so
    after an outage the hub gets the current status, not history."""
    cfg = ctx.config.link
    while True:
        interval = cfg.limp_status_interval_seconds if ctx.limp_home.is_set() else cfg.status_interval_seconds
        ctx.report_now.clear()
        try:
            with ctx.store.transaction():
                status = sitestatus.build(ctx.store, site=ctx.site, interval_seconds=interval)
                outbox.enqueue(ctx.store, status, channel=protocol.Channel.STATUS)
            outbox.enforce(ctx.store, site=ctx.site)  # the age bound, even when nothing is written
            outbox.stats(ctx.store)
        except Exception:  # a bad kv entry must not stop status reporting for good
            log.exception("could not build the site status")
        await _wait(ctx.report_now, interval)


async def _connection_loop(ctx: AgentContext, running: set[asyncio.Task[Any]]) -> None:
    cfg = ctx.config.link
    bucket = TokenBucket(rate=cfg.replay_rate_per_second, burst=cfg.replay_burst)
    with outbox.watch(ctx.store) as wake:
        await _connect_forever(ctx, running, bucket=bucket, wake=wake)


async def _connect_forever(
    ctx: AgentContext, running: set[asyncio.Task[Any]], *, bucket: TokenBucket, wake: asyncio.Event
) -> None:
    cfg = ctx.config.link
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            client = make_client(ctx)
            async with client:
                CONNECTED.set(1)
                CONNECTS.inc()
                log.info("connected to the broker", host=cfg.host, port=cfg.port, protocol=cfg.protocol,
                         client_id=client_id(ctx))
                await _session(ctx, client, bucket=bucket, wake=wake, running=running)
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
            FAILURES.inc()
            log.warning("broker link down", error=str(exc) or type(exc).__name__, host=cfg.host, port=cfg.port)
        finally:
            CONNECTED.set(0)
        if time.monotonic() - started >= STABLE_SECONDS:
            attempt = 0
        delay = backoff_delay(attempt, base=cfg.backoff_min_seconds, cap=cfg.backoff_max_seconds)
        attempt += 1
        log.info("reconnecting", in_seconds=round(delay, 2), attempt=attempt)
        await asyncio.sleep(delay)


async def _session(
    ctx: AgentContext, client: aiomqtt.Client, *, bucket: TokenBucket, wake: asyncio.Event,
    running: set[asyncio.Task[Any]],
) -> None:
    online = protocol.topic(ctx.site, protocol.Channel.ONLINE)
    await client.publish(
        online, protocol.Online(site=ctx.site, seq=outbox.next_seq(ctx.store), online=True).to_bytes(),
        qos=1, retain=True,
    )
    granted = await client.subscribe(protocol.topic(ctx.site, protocol.Channel.COMMANDS), qos=1)
    codes = [code.value if isinstance(code, ReasonCode) else int(code) for code in granted]
    if any(code >= 0x80 for code in codes):
        # The link still delivers status and events; only commands are cut off. Say so loudly.
        log.error("broker refused the commands subscription (check the broker ACL for this site's certificate)",
                  codes=codes)
    ctx.report_now.set()  # a fresh status right after (re)connecting
    try:
        await _first_failure(_drain(ctx, client, bucket=bucket, wake=wake), _receive(ctx, client, running=running))
    except asyncio.CancelledError:
        # Shutting down: a clean DISCONNECT suppresses the will, so say offline ourselves.
        try:
            offline = protocol.Online(site=ctx.site, seq=outbox.next_seq(ctx.store), online=False)
            async with asyncio.timeout(2):
                await client.publish(online, offline.to_bytes(), qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError):
            pass
        raise


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that races with the
    event being set (gh-86296), which left the drain loop running forever on shutdown."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def _first_failure(*coros: Awaitable[None]) -> None:
    """Run until the first of ``coros`` ends; cancel the rest; re-raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


async def _drain(ctx: AgentContext, client: aiomqtt.Client, *, bucket: TokenBucket, wake: asyncio.Event) -> None:
    """Drain the outbox for the life of the connection, holding back while nobody subscribes.

    A PUBACK with MQTT 5 reason "no matching subscribers" means the broker accepted the message
    and dropped it: no hub session subscribes (a replica set whose shared subscriptions Mosquitto
    lost in a restart, a hub session that expired). For status and online, which are retained,
    the broker still keeps the latest, so that counts as delivered; an event or a reply stays in the
    outbox and the drain retries from it after a hold-off that doubles up to ``UNROUTED_HOLD_MAX``.
    (The hub deduplicates the retried rows that did reach it.)
    """
    codes = puback.track(client)
    hold = UNROUTED_HOLD_MIN
    while True:
        try:
            await _drain_pass(ctx, client, codes=codes, bucket=bucket, wake=wake)
        except _Unrouted as exc:
            UNROUTED.inc()
            log.warning("the broker has no subscriber for this site's messages (is the hub subscribed?); "
                        "keeping them in the outbox", channel=exc.channel.value, retry_in=hold)
            await asyncio.sleep(hold)
            hold = min(hold * 2, UNROUTED_HOLD_MAX)


class _Unrouted(Exception):
    def __init__(self, channel: protocol.Channel) -> None:
        super().__init__(channel.value)
        self.channel = channel


async def _drain_pass(
    ctx: AgentContext, client: aiomqtt.Client, *, codes: puback.Codes, bucket: TokenBucket, wake: asyncio.Event
) -> None:
    """Publish outbox rows in order, ``max_inflight`` at a time, deleting each on its PUBACK."""
    cfg = ctx.config.link
    inflight: deque[tuple[outbox.Pending, asyncio.Task[int]]] = deque()

    async def settle_oldest() -> None:
        row, task = inflight.popleft()
        code = await task  # raises MqttError on timeout/disconnect: the row stays for the next connection
        if code >= 0x80:  # refused (not authorized, quota exceeded, ...): keep the row, drop the connection
            raise aiomqtt.MqttError(f"the broker refused a {row.channel.value} message: PUBACK reason "
                                    f"{code:#04x} {puback.reason_name(code)}")
        if code == puback.NO_MATCHING_SUBSCRIBERS and row.channel not in _RETAINED:
            raise _Unrouted(row.channel)
        outbox.ack(ctx.store, row.id)
        PUBLISHED.labels(channel=row.channel.value).inc()

    def start(row: outbox.Pending) -> None:
        topic = protocol.topic(ctx.site, row.channel)
        task = asyncio.ensure_future(puback.publish(client, codes, topic, row.payload, retain=row.channel in _RETAINED))
        inflight.append((row, task))

    try:
        cursor = 0
        status = outbox.latest_status(ctx.store)
        if status is not None:
            await bucket.take()
            start(status)
            await settle_oldest()
        while True:
            wake.clear()
            rows = outbox.pending(ctx.store, limit=cfg.max_inflight * 4, after=cursor)
            if not rows:
                while inflight:
                    await settle_oldest()
                if not outbox.pending(ctx.store, limit=1, after=cursor):
                    await _wait(wake, POLL_SECONDS)
                continue
            for row in rows:
                cursor = row.id
                await bucket.take()
                while len(inflight) >= cfg.max_inflight or (inflight and inflight[0][1].done()):
                    await settle_oldest()
                start(row)
    finally:
        for _, task in inflight:
            task.cancel()
        await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)


async def _receive(ctx: AgentContext, client: aiomqtt.Client, *, running: set[asyncio.Task[Any]]) -> None:
    mine = protocol.topic(ctx.site, protocol.Channel.COMMANDS)
    async for message in client.messages:
        if str(message.topic) != mine:
            log.warning("message on an unexpected topic ignored", topic=str(message.topic)[:200])
            continue
        payload = message.payload
        data = payload if isinstance(payload, bytes) else bytes(payload) if isinstance(payload, bytearray) else (
            str(payload).encode()
        )
        command = await commands.receive(ctx, data)
        if command is not None:
            # Commands outlive the connection that brought them (an install may take minutes).
            task = asyncio.create_task(commands.execute(ctx, command), name=f"command-{command.cmd_id}")
            running.add(task)
            task.add_done_callback(running.discard)
