"""Signed commands from the hub to one site.

A command is a :class:`agent.protocol.Command` wrapped in a DSSE envelope signed with the hub's
Ed25519 command key (payload type ``protocol.COMMAND_PAYLOAD_TYPE``). Agents verify the signature
against ``trust_dir/hub-command.pub`` and refuse a sequence number not above the last one they
accepted, or a command past its expiry, so a compromised broker can neither forge nor replay one.

The sequence number is per site, strictly increasing and persisted (``command_counters``, taken
with an atomic upsert, so several replicas never hand out the same number). The command row is
written *before* publishing, in state ``pending``; it becomes ``published`` on the broker's PUBACK.
If the broker is unreachable the command stays ``pending`` and the sweeper publishes it when the
link returns (in sequence order), unless it expired first. Replies then move it forward
(``accepted`` → ``done``/``failed``, or ``rejected``); see :mod:`hub.store`.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from bundles import errors as bundle_errors
from bundles import keys
from hub import mqtt
from hub.context import HubContext
from hub.models import COMMANDS
from hub.notify import Change
from hub.store import utcnow

log = structlog.get_logger("edgefleet.hub.commands")

KEY_NAME = "hub-command"
#: Seconds a command must have been pending before the sweeper retries it.
PENDING_RETRY_AGE = 3.0


class CommandError(Exception):
    """A command the hub cannot issue (no key, bad arguments); one line for the API/CLI."""


def keygen(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Create ``hub-command.key`` (0600) and ``hub-command.pub``; return (key, pub, keyid).

    The public file goes to every site as ``trust_dir/hub-command.pub``.
    """
    try:
        return keys.keygen(out_dir, KEY_NAME, overwrite=overwrite)
    except bundle_errors.BundleError as exc:
        raise CommandError(exc.message) from None


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        return keys.load_private(path)
    except bundle_errors.BundleError as exc:
        raise CommandError(exc.message) from None


def build(*, site: str, seq: int, name: protocol.CommandName, args: dict[str, Any], ttl: timedelta) -> protocol.Command:
    issued = utcnow()
    return protocol.Command(site=site, seq=seq, name=name, args=args, issued=issued, expires=issued + ttl)


def _resolve_args(
    ctx: HubContext, name: protocol.CommandName, args: dict[str, Any], *, base_url: str | None
) -> dict[str, Any]:
    """Check arguments the hub can check; ``install-bundle {"bundle": sha256}`` becomes a URL on this hub."""
    args = dict(args)
    if name is protocol.CommandName.INSTALL_BUNDLE:
        ref = args.pop("bundle", None)
        if ref is not None:
            if not isinstance(ref, str) or not re.fullmatch(r"[0-9a-f]{64}", ref):
                raise CommandError("install-bundle args.bundle must be the sha256 of a bundle uploaded to this hub")
            if ctx.store.get_bundle(ref) is None:
                raise CommandError(f"no bundle {ref} on this hub (upload it first)")
            base = (ctx.config.api.public_url or base_url or "").rstrip("/")
            if not base:
                raise CommandError("api.public_url is not set, so the hub cannot tell the site where to fetch from")
            args.setdefault("url", f"{base}/api/v1/bundles/{ref}/download")
            args.setdefault("sha256", ref)
        url = args.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise CommandError("install-bundle needs args.bundle (sha256 of an uploaded bundle) or an http(s) args.url")
    return args


async def issue(
    ctx: HubContext,
    *,
    site: str,
    name: protocol.CommandName,
    args: dict[str, Any] | None = None,
    ttl_seconds: float | None = None,
    base_url: str | None = None,
) -> dict[str, Any]:
    """Record, sign and publish a command; return its row. Without a broker link it stays pending."""
    if ctx.command_key is None:
        raise CommandError("no command key configured (commands.key_file; create one with `edgefleet-hub keygen`)")
    args = await asyncio.to_thread(_resolve_args, ctx, name, args or {}, base_url=base_url)
    ttl = timedelta(seconds=ttl_seconds or ctx.config.commands.ttl_seconds)
    key = ctx.command_key
    store = ctx.store

    def _record() -> tuple[protocol.Command, bytes]:
        with store.begin() as conn:
            seq = store.next_command_seq(conn, site)
            command = build(site=site, seq=seq, name=name, args=args, ttl=ttl)
            envelope = protocol.sign_command(command, key=key)
            conn.execute(
                COMMANDS.insert().values(
                    cmd_id=command.cmd_id,
                    site=site,
                    seq=seq,
                    name=name.value,
                    args=args,
                    issued=command.issued,
                    expires=command.expires,
                    state="pending",
                    detail="",
                    envelope=envelope.decode("ascii"),
                    updated_at=command.issued,
                )
            )
        return command, envelope

    command, envelope = await asyncio.to_thread(_record)
    await publish(ctx, cmd_id=command.cmd_id, site=site, envelope=envelope, name=name.value)
    row = await asyncio.to_thread(store.get_command, command.cmd_id)
    assert row is not None
    return row


async def publish(
    ctx: HubContext, *, cmd_id: str, site: str, envelope: bytes, name: str
) -> Literal["published", "deferred", "unrouted", "busy"]:
    """Publish one recorded command (QoS 1, not retained).

    Anything but ``published`` leaves it pending, retried by :func:`publish_pending` until it
    expires: ``deferred`` (no broker link, or the publish failed), ``unrouted`` (the broker had no
    session subscribed to the site's commands and dropped it), ``busy`` (being published already)."""
    if cmd_id in ctx.publishing:
        return "busy"
    ctx.publishing.add(cmd_id)
    try:
        await ctx.link.publish(protocol.topic(site, protocol.Channel.COMMANDS), envelope)
    except (mqtt.NotConnected, mqtt.NotRouted) as exc:
        outcome: Literal["deferred", "unrouted"] = "unrouted" if isinstance(exc, mqtt.NotRouted) else "deferred"
        ctx.metrics.commands.labels(name=name, outcome=outcome).inc()
        log.warning("command not published yet; will retry", cmd_id=cmd_id, site=site, error=str(exc)[:200])
        return outcome
    finally:
        ctx.publishing.discard(cmd_id)
    await asyncio.to_thread(ctx.store.set_command_state, cmd_id, state="published", published_at=utcnow())
    ctx.metrics.commands.labels(name=name, outcome="published").inc()
    log.info("command published", cmd_id=cmd_id, site=site, command=name)
    ctx.notifier.publish(Change(kind="command", site=site, ref=cmd_id, detail={"state": "published"}))
    return "published"


async def publish_pending(ctx: HubContext) -> int:
    """Publish commands left pending (no broker at issue time), in per-site sequence order."""
    if ctx.link.client is None:
        return 0
    # Only commands pending for a while: a fresh one is still being published by whoever issued it
    # (this or another replica). A rare double publish is harmless: agents answer a known cmd_id
    # with their stored reply and never run it twice.
    rows = await asyncio.to_thread(ctx.store.pending_commands, min_age=timedelta(seconds=PENDING_RETRY_AGE))
    sent = 0
    held: set[str] = set()  # sites whose earlier command is still pending: keep their order
    for row in rows:
        if row["site"] in held:
            continue
        outcome = await publish(
            ctx, cmd_id=row["cmd_id"], site=row["site"], envelope=row["envelope"].encode("ascii"), name=row["name"]
        )
        if outcome == "deferred":  # the link is down or failing: try again on the next round
            break
        if outcome != "published":
            held.add(row["site"])
            continue
        sent += 1
    return sent
