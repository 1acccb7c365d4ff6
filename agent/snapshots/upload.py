"""Optional copy of the newest verified snapshot to the hub: chunked, resumable, hash-verified.

Off by default (``snapshots.upload_enabled``): a 100 MB snapshot every six hours is a lot for a
site on a metered or satellite link. The hub side is hub/snapshot_upload.py.

The hub is asked how much it already has (``PUT`` declares size and sha256 and answers the
received offset), so an upload interrupted by a dropped link, an agent restart or a hub restart
resumes where it stopped. Each chunk carries its own sha256; the hub hashes the whole file
before accepting it. Uploads run beside the schedule, never in its way: a slow link cannot
delay a snapshot, and nothing uploads while the site is Red.

Plain ``urllib`` in a worker thread: one small sequential client does not earn an HTTP
library dependency on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import structlog

from agent import protocol
from agent.config import SnapshotConfig
from agent.context import AgentContext
from agent.snapshots import catalog

log = structlog.get_logger("edgefleet.snapshots.upload")

RETRY_SECONDS = 900.0
#: While the site is Red, how often to look whether it still is: the deferred upload starts this
#: soon after Red clears (nothing signals the clearing itself), not a whole RETRY_SECONDS later.
LIMP_RECHECK_SECONDS = 5.0
REQUEST_TIMEOUT = 120.0


class UploadFailed(Exception):
    """One line: what went wrong talking to the hub. ``answered``: the hub refused (vs unreachable)."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


def _request(
    cfg: SnapshotConfig, token: str, method: str, url: str, *, body: bytes | None = None, headers: dict[str, str]
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(cfg.upload_cacert) if cfg.upload_cacert else None)
    auth = {"Authorization": f"Bearer {token}", **headers}
    req = urllib.request.Request(url, data=body, method=method, headers=auth)  # noqa: S310 - scheme checked by caller
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT, context=context) as resp:  # noqa: S310
            doc: dict[str, Any] = json.loads(resp.read() or b"{}")
            return doc
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except (ValueError, AttributeError):
            detail = None
        if exc.code == 409 and isinstance(detail, dict) and "received" in detail:
            return {"conflict": True, "received": int(detail["received"])}
        raise UploadFailed(f"hub answered {exc.code} to {method}: {str(detail)[:200]}", answered=True) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UploadFailed(f"hub unreachable: {getattr(exc, 'reason', exc)}") from None


def upload_file(cfg: SnapshotConfig, *, site: str, entry: catalog.Entry) -> int:
    """Upload ``entry`` (blocking; run in a thread). Returns the bytes actually sent."""
    assert cfg.upload_url and cfg.upload_token_file is not None
    if not cfg.upload_url.startswith(("https://", "http://")):
        raise UploadFailed(f"upload_url must be http(s), got {cfg.upload_url[:80]!r}")
    try:
        token = cfg.upload_token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UploadFailed(f"cannot read upload_token_file: {exc.strerror}") from None
    url = f"{cfg.upload_url.rstrip('/')}/sites/{site}/snapshots/{entry.name}"
    json_headers = {"Content-Type": "application/json"}
    declared = json.dumps({"size": entry.file_size, "sha256": entry.file_sha256}).encode()
    state = _request(cfg, token, "PUT", url, body=declared, headers=json_headers)
    sent = 0
    if not state.get("complete"):
        offset = int(state.get("received", 0))
        with open(entry.path, "rb") as fh:
            while offset < entry.file_size:
                fh.seek(offset)
                chunk = fh.read(cfg.upload_chunk_bytes)
                if not chunk:
                    raise UploadFailed(f"{entry.name} is shorter than the catalog says")
                headers = {
                    "Content-Type": "application/octet-stream",
                    "X-Chunk-Sha256": hashlib.sha256(chunk).hexdigest(),
                }
                answer = _request(cfg, token, "PATCH", f"{url}?offset={offset}", body=chunk, headers=headers)
                if not answer.get("conflict"):
                    sent += len(chunk)
                offset = int(answer["received"])  # on conflict: resume from what the hub really has
        state = _request(cfg, token, "POST", f"{url}/complete", body=b"", headers=json_headers)
    if not state.get("complete") or state.get("sha256") != entry.file_sha256:
        raise UploadFailed(f"hub did not confirm {entry.name} with our sha256", answered=True)
    return sent


async def run(ctx: AgentContext, *, wake: asyncio.Event) -> None:
    """Upload the newest verified snapshot not yet on the hub, whenever ``wake`` is set or every 15 min.

    Deferred while ``ctx.limp_home`` is set (Red), and then re-checked every
    :data:`LIMP_RECHECK_SECONDS`, so the upload follows the recovery instead of the next snapshot.
    """
    cfg = ctx.config.snapshots
    while True:
        if not ctx.limp_home.is_set():
            entry = catalog.newest_verified(ctx.store)
            if entry is not None and entry.uploaded_at is None:
                try:
                    sent = await asyncio.to_thread(upload_file, cfg, site=ctx.site, entry=entry)
                except (UploadFailed, OSError) as exc:
                    log.warning("snapshot upload failed; will resume later", name=entry.name, error=str(exc))
                    if not isinstance(exc, UploadFailed) or exc.answered:  # offline is normal, not news
                        ctx.emit(
                            "snapshot.upload-failed",
                            f"upload of {entry.name} to the hub failed: {exc}"[:500],
                            severity=protocol.Severity.WARNING,
                            data={"name": entry.name},
                        )
                else:
                    catalog.mark_uploaded(ctx.store, entry.name, at=datetime.now(UTC))
                    ctx.emit(
                        "snapshot.uploaded",
                        f"etcd snapshot {entry.name} copied to the hub and verified there",
                        data={"name": entry.name, "sha256": entry.file_sha256, "bytes_sent": sent},
                    )
                    continue  # a newer one may have appeared meanwhile
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), LIMP_RECHECK_SECONDS if ctx.limp_home.is_set() else RETRY_SECONDS)
