"""Hub side of the optional etcd snapshot upload: chunked, resumable, hash-verified.

Mount with ``app.include_router(snapshot_upload.router(storage_dir=..., site_token=...))``.
``site_token(site)`` returns the bearer token that site uploads with (or None: uploads refused),
so a site can only ever write below its own directory. The agent side is
:mod:`agent.snapshots.upload`; it is off by default (``snapshots.upload_enabled``).

Protocol, under ``/api/v1/sites/{site}/snapshots/{name}``:

* ``PUT`` ``{"size": N, "sha256": H}``: start or resume; answers ``{"received": k, "complete": bool}``.
  A partial upload declared with another size/hash starts over (the snapshot changed).
* ``PATCH ?offset=k`` with the bytes and ``X-Chunk-Sha256``: appended and fsynced only if ``k`` is
  exactly what the hub has and the chunk hash matches; otherwise 409 with the hub's ``received``
  (the agent resumes from there) or 422.
* ``POST .../complete``: the whole file is hashed; only a match is renamed to its final name.
* ``GET``: the state, for resuming after either side restarted.

Names are the agent's snapshot names (``etcd-<time>.db[.zst]``) and sites are protocol site ids:
both are validated before any path is built from them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from agent import protocol

NAME_RE = re.compile(r"^etcd-\d{8}T\d{6}\.\d{3}Z\.db(\.zst)?$")
_SITE_RE = re.compile(protocol.SITE_ID_PATTERN)
MAX_CHUNK_BYTES = 16 << 20
MAX_SNAPSHOT_BYTES = 16 << 30

_bearer = HTTPBearer(auto_error=False)


class Declare(BaseModel):
    size: int = Field(ge=1, le=MAX_SNAPSHOT_BYTES)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class _Paths:
    final: Path
    partial: Path
    meta: Path


def _paths(storage_dir: Path, site: str, name: str) -> _Paths:
    if not _SITE_RE.match(site):
        raise HTTPException(422, f"invalid site id {site[:80]!r}")
    if not NAME_RE.match(name):
        raise HTTPException(422, f"invalid snapshot name {name[:80]!r}")
    base = storage_dir / site
    return _Paths(final=base / name, partial=base / f".{name}.partial", meta=base / f".{name}.meta.json")


def _state(paths: _Paths) -> dict[str, Any]:
    if paths.final.is_file():
        meta = json.loads(paths.meta.read_text()) if paths.meta.is_file() else {}
        size = paths.final.stat().st_size
        return {"received": size, "size": size, "sha256": meta.get("sha256"), "complete": True}
    if not paths.meta.is_file():
        return {"received": 0, "size": None, "sha256": None, "complete": False}
    meta = json.loads(paths.meta.read_text())
    received = paths.partial.stat().st_size if paths.partial.is_file() else 0
    return {"received": received, "size": meta["size"], "sha256": meta["sha256"], "complete": False}


def _declare(paths: _Paths, body: Declare) -> dict[str, Any]:
    state = _state(paths)
    if state["complete"] and state["sha256"] == body.sha256:
        return state
    if state["complete"]:
        raise HTTPException(409, "a different snapshot with this name is already stored")
    if state["size"] != body.size or state["sha256"] != body.sha256:
        paths.final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        paths.partial.unlink(missing_ok=True)
        tmp = paths.meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"size": body.size, "sha256": body.sha256}))
        os.replace(tmp, paths.meta)
        paths.partial.touch()
    return _state(paths)


def _append(paths: _Paths, offset: int, chunk: bytes, chunk_sha256: str) -> dict[str, Any]:
    state = _state(paths)
    if state["complete"]:
        return state
    if state["size"] is None:
        raise HTTPException(409, "declare the upload with PUT first")
    if offset != state["received"]:
        raise HTTPException(409, {"message": "offset does not match", "received": state["received"]})
    if hashlib.sha256(chunk).hexdigest() != chunk_sha256:
        raise HTTPException(422, "chunk sha256 mismatch: damaged in transit")
    if offset + len(chunk) > state["size"]:
        raise HTTPException(422, "chunk goes past the declared size")
    with open(paths.partial, "ab") as fh:
        fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return _state(paths)


def _complete(paths: _Paths) -> dict[str, Any]:
    state = _state(paths)
    if state["complete"]:
        return state
    if state["size"] is None or state["received"] != state["size"]:
        raise HTTPException(409, {"message": "upload incomplete", "received": state["received"]})
    with open(paths.partial, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != state["sha256"]:
        paths.partial.unlink(missing_ok=True)
        paths.meta.unlink(missing_ok=True)
        raise HTTPException(422, "sha256 of the whole upload does not match; discarded, start over")
    os.replace(paths.partial, paths.final)
    dir_fd = os.open(paths.final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return _state(paths)


def router(*, storage_dir: Path, site_token: Callable[[str], str | None]) -> APIRouter:
    """The upload endpoints, storing below ``storage_dir/<site>/``."""

    def authorize(site: str, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        expected = site_token(site) if _SITE_RE.match(site) else None
        if creds is None or creds.scheme.lower() != "bearer":
            raise HTTPException(401, "snapshot upload requires the site's bearer token")
        if expected is None or not hmac.compare_digest(creds.credentials.encode(), expected.encode()):
            raise HTTPException(403, "token not accepted for this site")

    api = APIRouter(
        prefix="/api/v1/sites/{site}/snapshots", dependencies=[Depends(authorize)], tags=["snapshot-upload"]
    )
    lock = asyncio.Lock()  # one writer at a time: appends and renames stay ordered

    @api.get("/{name}")
    async def status(site: str, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(_state, _paths(storage_dir, site, name))

    @api.put("/{name}")
    async def declare(site: str, name: str, body: Declare) -> dict[str, Any]:
        async with lock:
            return await asyncio.to_thread(_declare, _paths(storage_dir, site, name), body)

    @api.patch("/{name}")
    async def append(site: str, name: str, request: Request, offset: Annotated[int, Query(ge=0)]) -> dict[str, Any]:
        paths = _paths(storage_dir, site, name)
        chunk_sha256 = request.headers.get("x-chunk-sha256", "")
        chunk = bytearray()
        async for part in request.stream():
            chunk += part
            if len(chunk) > MAX_CHUNK_BYTES:
                raise HTTPException(413, f"chunks are limited to {MAX_CHUNK_BYTES} bytes")
        async with lock:
            return await asyncio.to_thread(_append, paths, offset, bytes(chunk), chunk_sha256)

    @api.post("/{name}/complete")
    async def complete(site: str, name: str) -> dict[str, Any]:
        async with lock:
            return await asyncio.to_thread(_complete, _paths(storage_dir, site, name))

    return api
