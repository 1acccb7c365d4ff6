"""Bundles uploaded to the hub, for connected sites to fetch with ``install-bundle``.

A bundle is offered only after it verified completely (signatures against the hub's trust root,
every file digest, every size cap) with :func:`bundles.verify.verify_only`, the same verifier the
sites run. The upload streams to a temporary file in the bundle directory, capped in size, and is
renamed to ``<sha256>.bundle`` only once verified, so a half-written or rejected upload is never
served. Sites verify again on their side: the hub is a convenience, not a trust anchor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from bundles import errors as bundle_errors
from bundles import trust, verify
from hub.context import HubContext
from hub.notify import Change
from hub.store import utcnow

log = structlog.get_logger("edgefleet.hub.uploads")


class UploadRejected(Exception):
    """A refused upload: ``status`` is the HTTP status, ``reason`` a stable label, the message one line."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def bundle_path(ctx: HubContext, sha256: str) -> Path:
    return ctx.config.bundle_dir / f"{sha256}.bundle"


async def receive(ctx: HubContext, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
    """Stream an upload to disk, verify it, and offer it; return its row. Raises :class:`UploadRejected`."""
    cfg = ctx.config
    if cfg.trust_root is None:
        raise UploadRejected(503, "no-trust-root", "the hub has no trust_root configured, so it cannot verify bundles")
    cap = cfg.api.max_bundle_bytes
    directory = cfg.bundle_dir
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, prefix=".upload-", dir=directory)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise UploadRejected(413, "too-large", f"bundle upload exceeds the {cap}-byte cap")
                digest.update(chunk)
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(_sync, fh)
        if size == 0:
            raise UploadRejected(400, "empty", "the upload is empty; send the bundle file as the request body")
        sha = digest.hexdigest()
        verified = await asyncio.to_thread(_verify, tmp, cfg.trust_root)
        final = bundle_path(ctx, sha)
        await asyncio.to_thread(os.replace, tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    m = verified.manifest
    row = await asyncio.to_thread(
        ctx.store.add_bundle,
        {
            "sha256": sha,
            "name": m.name,
            "version": m.version,
            "release": m.release,
            "size_bytes": size,
            "filename": final.name,
            "uploaded_at": utcnow(),
            "info": {
                "bundle_id": verified.bundle_id,
                "channel": m.channel,
                "created": m.created.isoformat(),
                "expires": m.expires.isoformat(),
                "signers": sorted(verified.signers),
                "components": len(m.components),
                "files": len(m.files),
                "description": m.description,
            },
        },
    )
    log.info("bundle offered", sha256=sha, name=m.name, version=m.version, release=m.release, size=size)
    ctx.notifier.publish(Change(kind="bundle", ref=sha))
    return row


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _verify(path: Path, root_path: Path) -> verify.Verified:
    try:
        root = trust.load_root(root_path)
    except bundle_errors.BundleError as exc:
        raise UploadRejected(503, "trust-root", f"the hub's trust root is unusable: {exc.message}") from None
    try:
        return verify.verify_only(path, root=root)
    except bundle_errors.BundleError as exc:
        log.warning("bundle upload rejected", reason=exc.reason, error=exc.message)
        raise UploadRejected(422, exc.reason, f"bundle rejected ({exc.reason}): {exc.message}") from None
