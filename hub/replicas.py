"""Replica heartbeats and adoption of a dead replica's broker session.

With MQTT shared subscriptions, Mosquitto keeps routing a share of the stream to a member whose
persistent session is offline (it queues the messages for it), and the messages that member held
unacknowledged stay in its session. So when a replica dies and stays dead, the survivors alone
would see only part of the traffic. Each replica therefore writes a heartbeat to the store; when
one has been silent for ``replica_takeover_seconds``, one live replica (claimed atomically in the
store) connects *with the dead replica's client id*: the broker resumes that session, delivers
what was queued and unacknowledged, and keeps routing its share, which the adopter ingests like
its own. When the dead replica starts again it heartbeats first and then connects with its own id,
which takes the session over; the adopter sees the heartbeat and lets go (no tug of war).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from datetime import datetime, timedelta

import aiomqtt
import structlog

from hub import mqtt
from hub.context import HubContext
from hub.ingest import Ingest
from hub.store import utcnow

log = structlog.get_logger("edgefleet.hub.replicas")


async def register(ctx: HubContext) -> datetime:
    """The first heartbeat, written *before* ingest connects, so an adopter lets go when we take our session back."""
    started = utcnow()
    cfg = ctx.config
    await asyncio.to_thread(
        ctx.store.replica_heartbeat,
        mqtt.client_id(cfg.mqtt),
        group=cfg.mqtt.shared_group,
        hostname=socket.gethostname(),
        started=started,
    )
    return started


async def run(ctx: HubContext, *, pipeline: Ingest, started: datetime) -> None:
    cfg = ctx.config
    me = mqtt.client_id(cfg.mqtt)
    group = cfg.mqtt.shared_group
    takeover = timedelta(seconds=cfg.replica_takeover_seconds)
    host = socket.gethostname()
    adopted: dict[str, asyncio.Task[None]] = {}
    unadoptable: set[str] = set()
    try:
        while True:
            try:
                await asyncio.to_thread(ctx.store.replica_heartbeat, me, group=group, hostname=host, started=started)
                if cfg.mqtt.shared_subscriptions and cfg.mqtt.protocol == "5":
                    dead = await asyncio.to_thread(
                        ctx.store.claim_dead_replicas, me, group=group, stale_before=utcnow() - takeover
                    )
                    for peer in dead:
                        if cfg.mqtt.tls and peer not in cfg.mqtt.peer_identities:
                            if peer not in unadoptable:
                                unadoptable.add(peer)
                                log.error(
                                    "a replica is silent but its session cannot be adopted: no certificate for it "
                                    "(mqtt.peer_identities); its share waits at the broker until it returns",
                                    replica=peer,
                                )
                            continue
                        if peer not in adopted or adopted[peer].done():
                            adopted[peer] = asyncio.create_task(_adopt(ctx, pipeline, peer), name=f"adopt-{peer}")
            except Exception as exc:  # the store may be briefly unavailable; keep trying
                log.error("replica heartbeat failed", error=str(exc)[:300])
            await asyncio.sleep(takeover.total_seconds() / 3)
    finally:
        for task in adopted.values():
            task.cancel()
        for task in adopted.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _adopt(ctx: HubContext, pipeline: Ingest, peer: str) -> None:
    takeover = timedelta(seconds=ctx.config.replica_takeover_seconds)
    me = mqtt.client_id(ctx.config.mqtt)
    log.warning("adopting the broker session of a silent replica", replica=peer)
    while True:
        try:
            await pipeline.connection(identifier=peer)
        except aiomqtt.MqttError as exc:
            log.info("adopted session disconnected", replica=peer, error=str(exc)[:200])
        except Exception as exc:  # keep trying while we hold the claim
            log.error("adopted session failed", replica=peer, error=f"{type(exc).__name__}: {exc}"[:300])
        holder = await asyncio.to_thread(ctx.store.replica_adopted_by, peer, stale_before=utcnow() - takeover)
        if holder != me:
            log.info("replica is back (or adopted elsewhere); released its session", replica=peer)
            return
        await asyncio.sleep(1.0)
