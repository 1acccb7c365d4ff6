"""Hub commands on the agent: verify, admit exactly once, execute, reply.

The broker is not trusted, so a command counts only if it is a DSSE envelope whose payload
type is :data:`protocol.COMMAND_PAYLOAD_TYPE`, signed by the hub command key in
``trust_dir/hub-command.pub``, addressed to this site, inside its validity window and newer
than the last command accepted. Checks, in order (each failure is a ``command.rejected``
event plus a ``rejected`` reply, rate-limited so a hostile broker cannot flood the outbox):

1. size, envelope, payload type, signature (``forged``), payload schema (``malformed``);
2. ``site`` is this site (``wrong-site``);
3. ``cmd_id`` already admitted → a *duplicate*: the stored reply is sent again, nothing runs
   (aiomqtt acknowledges QoS 1 before we see a message, and the hub may re-send, so a
   duplicate is normal, not hostile);
4. ``seq`` must exceed the last accepted seq, persisted (``replay``);
5. ``issued`` not further in the future than the tolerated clock skew (``not-yet-valid``),
   ``expires`` not passed beyond it (``expired``), and ``expires - issued`` within
   ``command_max_lifetime_seconds`` (``lifetime``), so a captured command cannot live forever.

Admission (seq advance + record) is one transaction, so a crash can neither run a command
twice nor accept an older one later. A command admitted but not finished when the agent
died gets a ``failed`` reply on the next start (:func:`recover`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import Counter

from agent import outbox, protocol
from agent.context import AgentContext
from agent.state import StateStore
from bundles.errors import BundleError

log = structlog.get_logger("edgefleet.commands")

MIGRATIONS = [
    """CREATE TABLE commands (
        cmd_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        received REAL NOT NULL,
        status TEXT NOT NULL,
        final INTEGER NOT NULL DEFAULT 0,
        reply BLOB
    )""",
]
LAST_SEQ_KEY = "commands.last_seq"
REJECTED_EVENT = "command.rejected"
#: Rejection reports: a burst, then one per this many seconds; the rest are counted and summarised.
REJECT_BURST = 10
REJECT_REFILL_SECONDS = 6.0

COMMANDS = Counter("edgefleet_commands_total", "Hub commands received, by outcome", ["outcome"])


class Rejected(Exception):
    """A command that must not run. ``reason`` is a short stable label (events, metrics, replies)."""

    def __init__(self, reason: str, detail: str, *, command: protocol.Command | None = None,
                 claimed_cmd_id: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.command = command
        #: For correlation only when ``command`` is None: the cmd_id the unverified envelope claims.
        self.claimed_cmd_id = claimed_cmd_id


class Failed(Exception):
    """A command that was admitted and ran, but did not achieve its effect."""


Outcome = tuple[protocol.ReplyStatus, str, dict[str, Any]]


def setup(store: StateStore) -> None:
    store.migrate("commands", MIGRATIONS)


# --- verification (pure) ---------------------------------------------------------------------------------------


def verify(payload: bytes, *, trust_dir: Path, site: str) -> protocol.Command:
    """Signature, schema and addressee: everything that needs no agent state.

    The key, the envelope and the signature are checked in a short-lived child
    (:mod:`agent.verifyproc`): cryptography costs ~7 MiB RSS that the daemon would keep for life
    after its first command. The child takes ~0.1 s; a child that dies refuses the command
    (``verifier-failed``). The payload it vouches for is parsed here.
    """
    from agent import verifyproc

    # No child for what cannot be an envelope (the first checks of bundles.dsse.parse, same
    # messages): junk from a hostile broker costs a JSON decode, not a process.
    if len(payload) > protocol.MAX_COMMAND_ENVELOPE_BYTES:
        raise Rejected("malformed", f"not a command envelope: envelope is {len(payload)} bytes, over the "
                                    f"{protocol.MAX_COMMAND_ENVELOPE_BYTES}-byte cap")
    try:
        json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("malformed", f"not a command envelope: envelope is not JSON: {exc}") from None
    request = {"op": "command", "trust_dir": str(trust_dir), "payload": base64.b64encode(payload).decode("ascii")}
    try:
        result = verifyproc.run(request)
    except verifyproc.VerifierFailed as exc:
        raise Rejected("verifier-failed", exc.message, claimed_cmd_id=_claimed_cmd_id(payload)) from None
    if "rejected" in result:
        doc = result["rejected"]
        raise Rejected(str(doc["reason"]), str(doc["detail"]), claimed_cmd_id=str(doc.get("cmd_id") or "")[:64])
    verified = base64.b64decode(result["payload"])
    try:
        command = protocol.parse_command_payload(verified)
    except protocol.ProtocolError as exc:
        raise Rejected("malformed", str(exc), claimed_cmd_id=_claimed_cmd_id(payload)) from None
    if command.site != site:
        raise Rejected("wrong-site", f"command is for site {command.site!r}, this is {site!r}", command=command)
    return command


def check_window(command: protocol.Command, *, now: datetime, skew: float, max_lifetime: float) -> None:
    tolerance = timedelta(seconds=skew)
    if command.issued > now + tolerance:
        raise Rejected(
            "not-yet-valid", f"issued {command.issued.isoformat()} is in the future (clock skew?)", command=command
        )
    if command.expires < now - tolerance:
        raise Rejected("expired", f"expired at {command.expires.isoformat()}", command=command)
    if (command.expires - command.issued).total_seconds() > max_lifetime:
        raise Rejected("lifetime", f"validity exceeds the {max_lifetime:.0f} s this agent allows", command=command)


# --- admission (stateful) --------------------------------------------------------------------------------------


#: Signature checks (child processes) allowed in a burst, and the refill: commands are rare, a broker
#: flooding the topic with signed-looking junk must not make the agent fork without bound.
VERIFY_BURST = 20
VERIFY_REFILL_SECONDS = 3.0
_verify_budget: weakref.WeakKeyDictionary[StateStore, list[float]] = weakref.WeakKeyDictionary()


async def receive(ctx: AgentContext, payload: bytes) -> protocol.Command | None:
    """:func:`admit` for the link: the signature check (a child process, ~0.1 s) runs off the event
    loop, within a budget of checks per time (over it, the message is rejected as ``rate-limited``)."""
    if not _spend(_verify_budget, ctx.store, burst=VERIFY_BURST, refill_seconds=VERIFY_REFILL_SECONDS):
        setup(ctx.store)
        _report_rejection(ctx, Rejected("rate-limited", "too many messages on the commands topic: not checked",
                                        claimed_cmd_id=_claimed_cmd_id(payload)), payload)
        return None
    try:
        verified = await asyncio.to_thread(verify, payload, trust_dir=ctx.config.trust_dir, site=ctx.site)
    except Rejected as exc:
        setup(ctx.store)
        _report_rejection(ctx, exc, payload)
        return None
    return admit(ctx, payload, verified=verified)


def admit(
    ctx: AgentContext, payload: bytes, *, now: datetime | None = None, verified: protocol.Command | None = None
) -> protocol.Command | None:
    """Decide about one message from the commands topic. Returns the command to execute, or
    None when it was a duplicate (reply re-sent) or rejected (reported). ``verified``: the result of
    :func:`verify` for this payload, when the caller ran it already (see :func:`receive`)."""
    setup(ctx.store)
    cfg = ctx.config.link
    now = now or datetime.now(UTC)
    try:
        command = verified or verify(payload, trust_dir=ctx.config.trust_dir, site=ctx.site)
        with ctx.store.transaction() as db:
            row = db.execute("SELECT reply FROM commands WHERE cmd_id=?", (command.cmd_id,)).fetchone()
            if row is not None:
                COMMANDS.labels(outcome="duplicate").inc()
                log.info("duplicate command: reply sent again", cmd_id=command.cmd_id, seq=command.seq)
                if row["reply"] is not None:
                    reply = protocol.Reply.model_validate_json(bytes(row["reply"]))
                    outbox.enqueue(ctx.store, reply, channel=protocol.Channel.REPLIES)
                return None
            last = int(ctx.store.get(LAST_SEQ_KEY, 0))
            if command.seq <= last:
                raise Rejected("replay", f"seq {command.seq} is not above the last accepted {last}", command=command)
            check_window(
                command, now=now, skew=cfg.command_clock_skew_seconds, max_lifetime=cfg.command_max_lifetime_seconds
            )
            ctx.store.put(LAST_SEQ_KEY, command.seq)
            db.execute(
                "INSERT INTO commands(cmd_id, seq, name, received, status) VALUES(?, ?, ?, ?, 'admitted')",
                (command.cmd_id, command.seq, command.name.value, time.time()),
            )
            _prune(ctx, now=time.time())
    except Rejected as exc:
        _report_rejection(ctx, exc, payload)
        return None
    COMMANDS.labels(outcome="admitted").inc()
    log.info("command admitted", cmd_id=command.cmd_id, seq=command.seq, command=command.name.value)
    return command


def _prune(ctx: AgentContext, *, now: float) -> None:
    # Past the longest lifetime (plus skew) a command is rejected as expired anyway, so its record can go.
    horizon = ctx.config.link.command_max_lifetime_seconds + 2 * ctx.config.link.command_clock_skew_seconds
    ctx.store.db.execute("DELETE FROM commands WHERE final=1 AND received < ?", (now - horizon,))


_reject_budget: weakref.WeakKeyDictionary[StateStore, list[float]] = weakref.WeakKeyDictionary()
_reject_suppressed: weakref.WeakKeyDictionary[StateStore, int] = weakref.WeakKeyDictionary()


def _spend(
    budgets: weakref.WeakKeyDictionary[StateStore, list[float]], store: StateStore, *, burst: int,
    refill_seconds: float,
) -> bool:
    """Take a token from ``store``'s bucket (``burst`` tokens, one back per ``refill_seconds``); False if empty."""
    tokens, stamp = budgets.get(store, [float(burst), time.monotonic()])
    now = time.monotonic()
    tokens = min(float(burst), tokens + (now - stamp) / refill_seconds)
    ok = tokens >= 1
    budgets[store] = [tokens - 1 if ok else tokens, now]
    return ok


def _report_rejection(ctx: AgentContext, exc: Rejected, payload: bytes) -> None:
    COMMANDS.labels(outcome=f"rejected-{exc.reason}").inc()
    log.warning("command rejected", reason=exc.reason, detail=exc.detail)
    # Token bucket per store: a hostile broker replaying garbage must not evict real events from the outbox.
    if not _spend(_reject_budget, ctx.store, burst=REJECT_BURST, refill_seconds=REJECT_REFILL_SECONDS):
        _reject_suppressed[ctx.store] = _reject_suppressed.get(ctx.store, 0) + 1
        return
    suppressed = _reject_suppressed.pop(ctx.store, 0)
    command = exc.command
    cmd_id = command.cmd_id if command else exc.claimed_cmd_id
    data: dict[str, Any] = {
        "reason": exc.reason,
        "cmd_id": cmd_id,
        "verified": command is not None,
        "suppressed_since_last_report": int(suppressed),
    }
    if command is not None:
        data.update(cmd_seq=command.seq, command=command.name.value, issued=command.issued.isoformat())
    ctx.emit(
        REJECTED_EVENT, f"command rejected ({exc.reason}): {exc.detail}"[:2000],
        severity=protocol.Severity.WARNING, data=data,
    )
    _enqueue_reply(ctx, cmd_id=cmd_id, status=protocol.ReplyStatus.REJECTED, detail=exc.detail, data={
        "reason": exc.reason
    })


def _claimed_cmd_id(payload: bytes) -> str:
    """Best effort, for correlation only: the cmd_id a DSSE envelope claims, read without
    verifying anything (the signature check is the child's)."""
    try:
        envelope = json.loads(payload)
        doc = json.loads(base64.b64decode(envelope["payload"], validate=True))
        value = doc.get("cmd_id") if isinstance(doc, dict) else None
    except (ValueError, TypeError, KeyError):  # binascii.Error is a ValueError
        return ""
    return value[:64] if isinstance(value, str) else ""


def _enqueue_reply(
    ctx: AgentContext, *, cmd_id: str, status: protocol.ReplyStatus, detail: str, data: dict[str, Any]
) -> protocol.Reply:
    with ctx.store.transaction():
        reply = protocol.Reply(
            site=ctx.site, seq=outbox.next_seq(ctx.store), cmd_id=cmd_id, status=status, detail=detail[:2000],
            data=data,
        )
        outbox.enqueue(ctx.store, reply, channel=protocol.Channel.REPLIES)
    return reply


def reply(
    ctx: AgentContext, command: protocol.Command, status: protocol.ReplyStatus, detail: str = "", *,
    data: dict[str, Any] | None = None, final: bool = True,
) -> protocol.Reply:
    """Record and queue a reply; the stored reply is what a duplicate of the command gets."""
    with ctx.store.transaction() as db:
        sent = _enqueue_reply(ctx, cmd_id=command.cmd_id, status=status, detail=detail, data=data or {})
        db.execute(
            "UPDATE commands SET status=?, final=?, reply=? WHERE cmd_id=?",
            (status.value, int(final), sent.to_bytes(), command.cmd_id),
        )
    return sent


def recover(ctx: AgentContext) -> int:
    """After a restart: commands admitted but never finished get a ``failed`` reply."""
    setup(ctx.store)
    rows = ctx.store.db.execute("SELECT cmd_id, seq, name FROM commands WHERE final=0").fetchall()
    for row in rows:
        command = protocol.Command(
            cmd_id=row["cmd_id"], site=ctx.site, seq=row["seq"], name=protocol.CommandName(row["name"]),
            expires=datetime.now(UTC),
        )
        reply(ctx, command, protocol.ReplyStatus.FAILED,
              "interrupted by an agent restart; re-issue it if still wanted (an install resumes from its own journal)")
    return len(rows)


# --- execution -------------------------------------------------------------------------------------------------

_install_lock: weakref.WeakKeyDictionary[StateStore, asyncio.Lock] = weakref.WeakKeyDictionary()


async def execute(ctx: AgentContext, command: protocol.Command) -> protocol.Reply:
    """Run an admitted command and queue its final reply. Never raises (but for cancellation)."""
    handler = _HANDLERS[command.name]
    try:
        status, detail, data = await handler(ctx, command)
    except Failed as exc:
        status, detail, data = protocol.ReplyStatus.FAILED, str(exc), {}
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("command failed unexpectedly", cmd_id=command.cmd_id, command=command.name.value)
        status, detail, data = protocol.ReplyStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}", {}
    COMMANDS.labels(outcome=status.value).inc()
    log.info("command finished", cmd_id=command.cmd_id, command=command.name.value, status=status.value,
             detail=detail)
    return reply(ctx, command, status, detail, data=data)


async def _snapshot_now(ctx: AgentContext, command: protocol.Command) -> Outcome:
    if not ctx.config.snapshots.enabled:
        raise Failed("snapshots are disabled in this agent's config")
    ctx.snapshot_now.set()
    return protocol.ReplyStatus.ACCEPTED, "snapshot requested; its result follows as a snapshot.* event", {}


async def _report_now(ctx: AgentContext, command: protocol.Command) -> Outcome:
    ctx.report_now.set()
    return protocol.ReplyStatus.DONE, "fresh status queued", {}


async def _install_bundle(ctx: AgentContext, command: protocol.Command) -> Outcome:
    from agent import intake  # the installer stack loads only when a command needs it

    reply(ctx, command, protocol.ReplyStatus.ACCEPTED, "downloading bundle", final=False)
    lock = _install_lock.setdefault(ctx.store, asyncio.Lock())
    async with lock:
        path = await fetch(ctx, command)
        try:
            result = await intake.import_bundle(ctx, path, explicit=True)
        except BundleError as exc:  # already reported by the intake as bundle.rejected
            raise Failed(f"bundle rejected ({exc.reason}): {exc.message}") from None
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)  # the intake staged its own verified copy
    return protocol.ReplyStatus.DONE, f"bundle {result.bundle} verified and queued for install", _jsonable(result)


def _jsonable(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    elif hasattr(result, "__dataclass_fields__"):
        from dataclasses import asdict

        result = asdict(result)
    if not isinstance(result, dict):
        result = {"result": result}
    try:
        return dict(json.loads(json.dumps(result, default=str)))
    except (TypeError, ValueError):
        return {"result": str(result)[:1000]}


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


async def fetch(ctx: AgentContext, command: protocol.Command) -> Path:
    """Download ``args.url`` into the inbox staging area: size-capped, optionally hash-checked,
    fsynced, then renamed into place, so a crash never leaves a half file that looks whole.
    Trust comes later from the bundle's own signatures, not from this download."""
    import aiohttp

    cfg = ctx.config.link
    url = command.args.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise Failed("install-bundle needs args.url, an http(s) URL")
    expected = command.args.get("sha256")
    if expected is not None and (not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected)):
        raise Failed("install-bundle args.sha256 must be 64 lowercase hex digits")
    name = _SAFE_NAME.sub("_", Path(urlsplit(url).path).name)[:120].lstrip(".") or f"bundle-{command.cmd_id}"
    staging = ctx.config.inbox / ".incoming"
    await asyncio.to_thread(staging.mkdir, mode=0o700, parents=True, exist_ok=True)
    part = staging / f"{command.cmd_id}.part"
    final = staging / f"{command.cmd_id}-{name}"
    sslctx: ssl.SSLContext | bool = True
    if cfg.fetch_ca is not None:
        sslctx = ssl.create_default_context(cafile=str(cfg.fetch_ca))
    digest = hashlib.sha256()
    size = 0
    fd = await asyncio.to_thread(os.open, part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.fetch_timeout_seconds, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, ssl=sslctx) as response:
            if response.status != 200:
                raise Failed(f"fetching {url}: HTTP {response.status}")
            if (response.content_length or 0) > cfg.fetch_max_bytes:
                raise Failed(f"bundle of {response.content_length} bytes exceeds the {cfg.fetch_max_bytes}-byte cap")
            async for chunk in response.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > cfg.fetch_max_bytes:
                    raise Failed(f"bundle exceeds the {cfg.fetch_max_bytes}-byte cap")
                digest.update(chunk)
                await asyncio.to_thread(os.write, fd, chunk)
        await asyncio.to_thread(os.fsync, fd)
    except aiohttp.ClientError as exc:
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise Failed(f"fetching {url}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise
    finally:
        os.close(fd)
    if expected is not None and digest.hexdigest() != expected:
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise Failed(f"downloaded bundle sha256 {digest.hexdigest()} does not match the command's {expected}")
    await asyncio.to_thread(os.replace, part, final)
    log.info("bundle downloaded", url=url, bytes=size, sha256=digest.hexdigest(), path=str(final))
    return final


async def _rollback(ctx: AgentContext, command: protocol.Command) -> Outcome:
    from agent import intake

    async with _install_lock.setdefault(ctx.store, asyncio.Lock()):
        result = await intake.rollback(ctx)
    return protocol.ReplyStatus.ACCEPTED, "rollback to the last good bundle queued", _jsonable(result)


async def _clear_bad(ctx: AgentContext, command: protocol.Command) -> Outcome:
    from agent import intake

    version = command.args.get("version")
    if not isinstance(version, str) or not version:
        raise Failed("clear-bad-version needs args.version (<bundle name>-<version>)")
    result = await intake.clear_bad_version(ctx, version)
    if not result.get("cleared"):
        return protocol.ReplyStatus.DONE, f"{version} was not marked bad", _jsonable(result)
    return protocol.ReplyStatus.DONE, f"{version} may be installed again", _jsonable(result)


_HANDLERS: dict[protocol.CommandName, Callable[[AgentContext, protocol.Command], Awaitable[Outcome]]] = {
    protocol.CommandName.SNAPSHOT_NOW: _snapshot_now,
    protocol.CommandName.REPORT_NOW: _report_now,
    protocol.CommandName.INSTALL_BUNDLE: _install_bundle,
    protocol.CommandName.ROLLBACK: _rollback,
    protocol.CommandName.CLEAR_BAD: _clear_bad,
}
