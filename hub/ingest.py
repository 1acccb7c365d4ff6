"""Ingest: site messages from MQTT into the fleet store, validated, deduplicated and batched.

Delivery guarantee: a message is acknowledged to the broker (PUBACK) only after the batch holding
it is committed. aiomqtt acknowledges QoS 1 messages before application code sees them, so ingest
switches paho to manual acknowledgement; a hub that dies with an uncommitted batch leaves those
messages unacknowledged in its persistent broker session, and they are delivered again when it
reconnects (with the same client id). Redeliveries are harmless: an in-memory LRU drops most of them
and the store's unique constraints drop the rest.

Several replicas split the stream through MQTT shared subscriptions (``$share/<group>/...``).
Brokers without them (amqtt, MQTT 3.1.1) get plain subscriptions; run one replica then. Whatever
the broker delivers, every topic and payload is validated by :func:`agent.protocol.parse_site_message`;
refusals are counted per reason and logged at most once per interval per reason, never fatal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import aiomqtt
import structlog
from paho.mqtt import client as paho_client
from prometheus_client import Counter

from agent import protocol
from hub import mqtt, store
from hub.context import HubContext
from hub.notify import Change

log = structlog.get_logger("edgefleet.hub.ingest")

CHANNELS = (protocol.Channel.STATUS, protocol.Channel.EVENTS, protocol.Channel.ONLINE, protocol.Channel.REPLIES)


_CHANNELS = frozenset(ch.value for ch in CHANNELS)


def topic_filters(*, shared: bool, group: str) -> list[str]:
    base = [f"{protocol.TOPIC_ROOT}/+/{ch.value}" for ch in CHANNELS]
    return [f"$share/{group}/{t}" for t in base] if shared else base


_FAST_MODELS: dict[str, type[protocol.Message]] = {
    "status": protocol.Status,
    "events": protocol.Event,
    "online": protocol.Online,
    "replies": protocol.Reply,
}


def parse(topic: str, payload: bytes) -> protocol.Message:
    """:func:`agent.protocol.parse_site_message`, with a faster path for the common valid message.

    The fast path validates straight from JSON bytes (one pass in pydantic-core instead of
    ``json.loads`` then validation) and accepts only what the reference would accept: a known
    topic, within the size cap, the schema field present and current, the site matching the topic.
    Anything else, including every error, goes through the reference function, so refusals and
    their reasons are exactly the protocol's.
    """
    parts = topic.split("/")
    model = _FAST_MODELS.get(parts[-1]) if len(parts) == 5 else None
    if model is not None and len(payload) <= protocol.MAX_BYTES[protocol.Channel(parts[-1])]:
        try:
            message = model.model_validate_json(payload)
        except ValueError:
            message = None
        if (
            message is not None
            and "schema_version" in message.model_fields_set
            and message.schema_version == protocol.SCHEMA_VERSION
            and message.site == parts[3]
            and topic == protocol.topic(message.site, protocol.Channel(parts[-1]))
        ):
            return message
    return protocol.parse_site_message(topic, payload)


@dataclass(eq=False)
class Connection:
    """One broker connection, with its own window of unacknowledged deliveries.

    Acknowledgements are only valid on the connection that received the message. The window is our
    own flow control: we ask the broker (MQTT 5 Receive Maximum) to send at most ``window``
    unacknowledged messages, but Mosquitto 2.0 stops honouring that after the first PUBACKs on a
    resumed session with a backlog (measured: 53,000 unacknowledged deliveries against a window of
    4,000, 1.2 GB of hub memory, no commit for seconds), and an MQTT 3.1.1 broker is not told at all.
    So when ``window`` deliveries are unacknowledged we stop reading the socket until commits bring
    the count down; TCP then pushes back on the broker, which keeps the rest in our session.
    """

    client: aiomqtt.Client
    window: int
    open: bool = True
    unacked: int = 0
    paused: bool = False

    def received(self, qos: int) -> None:
        if qos > 0:
            self.unacked += 1
            if self.unacked >= self.window:
                self._pause()

    def ack(self, mid: int, qos: int) -> None:
        # After a reconnect the broker redelivers instead; a stale message id must not be acknowledged.
        if qos == 0 or not self.open:
            return
        # aiomqtt exposes no manual acknowledgement; paho does (manual_ack_set in connection()).
        self.client._client.ack(mid, qos)
        self.unacked -= 1
        if self.paused and self.unacked < self.window:
            self._resume()

    def _fd(self) -> int | None:
        sock = self.client._client.socket()
        return sock.fileno() if sock is not None and sock.fileno() >= 0 else None

    def _pause(self) -> None:
        fd = self._fd()
        if self.paused or not self.open or fd is None:
            return
        # This removes aiomqtt's reader (registered in its on_socket_open); _resume installs ours.
        asyncio.get_running_loop().remove_reader(fd)
        self.paused = True

    def _resume(self) -> None:
        self.paused = False
        fd = self._fd()
        if not self.open or fd is None:
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, self._read)
        # With TLS, records already decrypted into the SSL object wake no epoll: read once now.
        loop.call_soon(self._read)

    def _read(self) -> None:
        """What aiomqtt's socket reader does (read until the SSL buffer is empty), but stopping when paused."""
        paho = self.client._client
        try:
            while not self.paused:
                paho.loop_read()
                sock = paho.socket()
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except Exception as exc:  # a broken connection: let aiomqtt's owner see it, as its reader would
            if not self.client._disconnected.done():
                self.client._disconnected.set_exception(exc)


@dataclass
class _Item:
    received: store.Received
    mid: int
    qos: int
    conn: Connection


class _RejectLog:
    """At most one log line per reason per interval; the counters count every refusal."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.suppressed: collections.Counter[str] = collections.Counter()

    def __call__(self, exc: protocol.ProtocolError, *, topic: str) -> None:
        now = time.monotonic()
        if now - self.last.get(exc.reason, -1e9) < self.interval:
            self.suppressed[exc.reason] += 1
            return
        self.last[exc.reason] = now
        log.warning(
            "refused message",
            reason=exc.reason,
            error=str(exc),
            topic=topic[:200],
            suppressed_since_last=self.suppressed.pop(exc.reason, 0),
        )


class _Dedupe:
    """LRU of message ids known to be committed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self.ids

    def add(self, msg_id: str) -> None:
        if self.size <= 0:
            return
        self.ids[msg_id] = None
        if len(self.ids) > self.size:
            self.ids.popitem(last=False)


class Ingest:
    """One ingest pipeline: a broker reader and a batch writer, both owned by :func:`run`."""

    def __init__(self, ctx: HubContext) -> None:
        self.ctx = ctx
        cfg = ctx.config.ingest
        self.batch: list[_Item] = []
        self.full = asyncio.Event()
        self.dedupe = _Dedupe(cfg.dedupe_cache)
        self.reject_log = _RejectLog(cfg.reject_log_interval_seconds)
        #: Set while subscribed (tests and the demo wait for it); cleared when the connection drops.
        self.subscribed = asyncio.Event()
        #: Labelled children of the received counter, per channel (``labels()`` per message is not free).
        self._received: dict[str, Counter] = {}

    # ---- reading ---------------------------------------------------------------------------

    def on_message(self, message: paho_client.MQTTMessage, *, conn: Connection) -> None:
        """paho's message callback (runs on the event loop, inside aiomqtt's socket reader)."""
        self.handle(
            topic=message.topic,
            payload=bytes(message.payload),
            mid=message.mid,
            qos=message.qos,
            retain=message.retain,
            conn=conn,
        )

    def handle(self, *, topic: str, payload: bytes, mid: int, qos: int, retain: bool, conn: Connection) -> None:
        """Validate one delivery and queue it for the next batch (or acknowledge it right away)."""
        m = self.ctx.metrics
        channel = topic.rsplit("/", 1)[-1]
        counter = self._received.get(channel)
        if counter is None:
            counter = self._received[channel] = m.received.labels(channel=channel if channel in _CHANNELS else "other")
        counter.inc()
        conn.received(qos)
        try:
            parsed = parse(topic, payload)
        except protocol.ProtocolError as exc:
            m.rejected.labels(reason=exc.reason).inc()
            self.reject_log(exc, topic=topic)
            conn.ack(mid, qos)
            return
        if parsed.msg_id in self.dedupe:
            m.duplicates.labels(kind=str(getattr(parsed, "kind", channel))).inc()
            conn.ack(mid, qos)
            return
        received = store.Received(message=parsed, received_at=datetime.now(UTC), retained=retain, raw=payload)
        self.batch.append(_Item(received=received, mid=mid, qos=qos, conn=conn))
        m.pending.set(len(self.batch))
        if len(self.batch) >= self.ctx.config.ingest.batch_size:
            self.full.set()

    # ---- writing ---------------------------------------------------------------------------

    async def flusher(self) -> None:
        """Commit batches (by size or interval), then acknowledge, remember and notify; forever."""
        cfg = self.ctx.config.ingest
        backoff = 0.5
        while True:
            if len(self.batch) < cfg.batch_size:
                self.full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), timeout=cfg.flush_interval_seconds)
            if not self.batch:
                continue
            # At most one batch per transaction: under a flood (a session backlog) the reader outpaces
            # the writer, and one ever-growing transaction would delay every commit and acknowledgement.
            items, self.batch = self.batch[: cfg.batch_size], self.batch[cfg.batch_size :]
            while True:
                try:
                    result = await self.write(items)
                    backoff = 0.5
                    break
                except Exception as exc:  # the database is down or refused: keep the batch, retry
                    self.ctx.metrics.db_errors.inc()
                    log.error("batch write failed; retrying", error=str(exc)[:300], messages=len(items))
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
                    backoff = min(backoff * 2, 30.0)
            for item in items:
                item.conn.ack(item.mid, item.qos)
                self.dedupe.add(item.received.message.msg_id)
            self.ctx.metrics.pending.set(len(self.batch))
            self._notify(result)

    async def write(self, items: list[_Item]) -> store.BatchResult:
        m = self.ctx.metrics
        started = time.perf_counter()
        result = await asyncio.to_thread(
            self.ctx.store.write_batch,
            [i.received for i in items],
            history_min_interval=self.ctx.config.history.min_interval_seconds,
        )
        m.batch_seconds.observe(time.perf_counter() - started)
        for kind, n in result.stored.items():
            m.stored.labels(kind=kind).inc(n)
        for kind, n in result.duplicates.items():
            m.duplicates.labels(kind=kind).inc(n)
        for latency in result.latencies:
            m.latency.observe(max(latency, 0.0))
        return result

    def _notify(self, result: store.BatchResult) -> None:
        n = self.ctx.notifier
        if not n.subscribers:
            return
        for site in sorted(result.sites):
            n.publish(Change(kind="site", site=site))
        for site, event_id, event_type in result.events:
            n.publish(Change(kind="event", site=site, ref=str(event_id), detail={"type": event_type}))
        for cmd_id in sorted(result.commands):
            n.publish(Change(kind="command", ref=cmd_id))

    # ---- connection ------------------------------------------------------------------------

    async def connection(self, *, identifier: str | None = None) -> None:
        """One broker connection: subscribe, then read until it drops (raises :class:`aiomqtt.MqttError`).

        ``identifier`` other than our own is a dead replica's session being adopted (hub/replicas.py):
        then the connection only drains and ingests, and is not the link commands publish on.
        """
        cfg = self.ctx.config.mqtt
        primary = identifier is None
        client = mqtt.make_client(cfg, identifier=identifier)
        # Acknowledge after commit, not on receipt (see the module docstring).
        client._client.manual_ack_set(True)
        conn = Connection(client, window=cfg.receive_maximum)
        # Deliveries go straight from paho's callback into the batch, bypassing aiomqtt's message queue
        # and iterator (a queue item, a task and an asyncio.wait per message: a fifth of the hub's CPU).
        # Set before connecting: a persistent session starts delivering right after CONNACK.
        client._client.on_message = lambda _client, _userdata, message: self.on_message(message, conn=conn)
        async with client:
            if primary:
                self.ctx.link.attach(client)
                self.ctx.metrics.connected.set(1)
            try:
                filters = topic_filters(shared=cfg.shared_subscriptions and cfg.protocol == "5", group=cfg.shared_group)
                await client.subscribe([(f, 1) for f in filters])
                log.info("subscribed", broker=f"{cfg.host}:{cfg.port}", filters=filters, client_id=client.identifier)
                if primary:
                    self.subscribed.set()
                try:  # shielded: cancelling us must not cancel aiomqtt's own future
                    await asyncio.shield(client._disconnected)
                except Exception as exc:
                    raise aiomqtt.MqttError("disconnected from the broker") from exc
                raise aiomqtt.MqttError("disconnected from the broker")
            finally:
                conn.open = False
                # Its deliveries not yet taken by the writer are unacknowledged: the broker redelivers them on
                # the next connection, so keeping them would only hold memory (a window per reconnect while
                # the database is down) and write them twice.
                self.batch = [item for item in self.batch if item.conn is not conn]
                self.ctx.metrics.pending.set(len(self.batch))
                if primary:
                    self.subscribed.clear()
                    self.ctx.link.detach()
                    self.ctx.metrics.connected.set(0)


_GC_GEN0 = 20_000


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for ingest's allocation pattern.

    Every message allocates a few dozen container objects (the validated model and its lists) that
    live for exactly one batch. With CPython's defaults they get promoted and trigger full
    collections that re-scan every long-lived object of the process (modules, FastAPI, SQLAlchemy):
    measured at a large share of the CPU per message. So: freeze what exists after startup (it is
    never garbage) and collect the young generation every 20,000 allocations instead of 700
    (a few MB at most). Process-wide on purpose: the hub's hot path is ingest. Once per process
    (tests start many hubs in one), after a collection so no garbage is frozen with the rest.
    """
    if gc.get_threshold()[0] == _GC_GEN0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0, 10, 10)


async def run(ctx: HubContext, *, pipeline: Ingest | None = None) -> None:
    """Ingest until cancelled: reconnect with exponential backoff and jitter; batches survive reconnects."""
    pipe = pipeline or Ingest(ctx)
    _tune_gc()
    flusher = asyncio.create_task(pipe.flusher(), name="hub-ingest-flusher")
    delay = 0.5
    try:
        while True:
            try:
                await pipe.connection()
                delay = 0.5
            except aiomqtt.MqttError as exc:
                log.warning("broker connection lost", error=str(exc)[:200], retry_in=round(delay, 2))
            except Exception as exc:  # never let one odd failure end ingest for good
                log.error(
                    "ingest connection failed", error=f"{type(exc).__name__}: {exc}"[:300], retry_in=round(delay, 2)
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, ctx.config.mqtt.reconnect_max_seconds)
    finally:
        # What the writer has not taken is unacknowledged: the broker redelivers it to the next run.
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
