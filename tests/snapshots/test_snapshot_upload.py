"""Optional upload to the hub: chunked, resumable, hash-verified (agent client against the real hub router)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from snapshot_helpers import MakeCtx, events, put_keys, put_random

from agent.snapshots import catalog, devetcd, take, task, upload
from hub import snapshot_upload

TOKEN = "site-a-upload-token"


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    storage = tmp_path / "hub-snapshots"
    app = FastAPI()
    app.include_router(snapshot_upload.router(storage_dir=storage, site_token={"site-a": TOKEN}.get))
    port = devetcd.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/api/v1", storage
    finally:
        server.should_exit = True
        await serving


def _configure(ctx, base: str, tmp_path: Path, *, token: str = TOKEN) -> None:
    token_file = tmp_path / "upload.token"
    token_file.write_text(token + "\n")
    cfg = ctx.config.snapshots
    cfg.upload_enabled, cfg.upload_url, cfg.upload_token_file = True, base, token_file
    cfg.upload_chunk_bytes = 64 << 10


async def test_upload_resumes_and_is_verified(etcd: devetcd.Node, make_ctx: MakeCtx, hub, tmp_path: Path):
    base, storage = hub
    await asyncio.to_thread(put_random, etcd, 1)
    ctx = make_ctx(etcd.url)
    _configure(ctx, base, tmp_path)
    entry = (await take.take(ctx, trigger="manual")).entry
    assert entry is not None and entry.file_size > 8 * (64 << 10)
    data = entry.path.read_bytes()
    url = f"{base}/sites/site-a/snapshots/{entry.name}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=auth) as client:
        # An earlier attempt died after the first 100 000 bytes.
        r = await client.put(url, json={"size": entry.file_size, "sha256": entry.file_sha256})
        assert r.json()["received"] == 0
        first = data[:100_000]
        r = await client.patch(
            url, params={"offset": 0}, content=first, headers={"X-Chunk-Sha256": hashlib.sha256(first).hexdigest()}
        )
        assert r.json()["received"] == 100_000
        # A chunk damaged in transit, and one at the wrong offset, are refused.
        r = await client.patch(
            url,
            params={"offset": 100_000},
            content=b"x" * 10,
            headers={"X-Chunk-Sha256": hashlib.sha256(b"y" * 10).hexdigest()},
        )
        assert r.status_code == 422
        r = await client.patch(url, params={"offset": 5}, content=b"x", headers={"X-Chunk-Sha256": "0" * 64})
        assert r.status_code == 409 and r.json()["detail"]["received"] == 100_000
        # Another site's token cannot touch this site; names cannot escape the site directory.
        r = await client.get(url, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403
        r = await client.get(f"{base}/sites/site-a/snapshots/..%2F..%2Fetc%2Fpasswd")
        assert r.status_code in (404, 422)

    sent = await asyncio.to_thread(upload.upload_file, ctx.config.snapshots, site="site-a", entry=entry)
    assert sent == entry.file_size - 100_000  # resumed, not restarted
    stored = storage / "site-a" / entry.name
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry.file_sha256
    assert not list((storage / "site-a").glob(".*.partial"))
    # Uploading again is a no-op: the hub already has it, verified.
    assert await asyncio.to_thread(upload.upload_file, ctx.config.snapshots, site="site-a", entry=entry) == 0


async def test_hub_rejects_a_mismatching_upload_and_a_wrong_token(etcd, make_ctx, hub, tmp_path):
    base, storage = hub
    await put_keys(etcd, 5)
    ctx = make_ctx(etcd.url)
    _configure(ctx, base, tmp_path)
    entry = (await take.take(ctx, trigger="manual")).entry
    assert entry is not None
    lying = catalog.Entry(**{**entry.__dict__, "file_sha256": "ab" * 32})  # catalog says another hash
    with pytest.raises(upload.UploadFailed, match="422") as failed:
        await asyncio.to_thread(upload.upload_file, ctx.config.snapshots, site="site-a", entry=lying)
    assert failed.value.answered
    assert not (storage / "site-a" / entry.name).exists()
    _configure(ctx, base, tmp_path, token="stolen")
    with pytest.raises(upload.UploadFailed, match="403"):
        await asyncio.to_thread(upload.upload_file, ctx.config.snapshots, site="site-a", entry=entry)


async def test_task_uploads_after_a_snapshot_when_enabled(etcd, make_ctx, hub, tmp_path):
    base, storage = hub
    await put_keys(etcd, 5)
    ctx = make_ctx(etcd.url, schedule="0 0 1 1 *", catchup_delay_seconds=0)
    _configure(ctx, base, tmp_path)
    runner = asyncio.create_task(task.run(ctx))  # first start: catch-up snapshot, then its upload
    try:
        for _ in range(200):
            if any(e["type"] == "snapshot.uploaded" for e in events(ctx)):
                break
            await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    [entry] = catalog.entries(ctx.store)
    assert entry.uploaded_at is not None
    assert [e["type"] for e in events(ctx)] == ["snapshot.succeeded", "snapshot.uploaded"]
    assert (storage / "site-a" / entry.name).is_file()
    assert json.loads((storage / "site-a" / f".{entry.name}.meta.json").read_text())["sha256"] == entry.file_sha256


async def test_upload_is_deferred_in_limp_home_and_follows_its_end(etcd, make_ctx, hub, tmp_path):
    """Red (``limp_home``): a new snapshot is not uploaded; once Red clears it is, without another snapshot."""
    base, storage = hub
    await put_keys(etcd, 5)
    ctx = make_ctx(etcd.url)
    _configure(ctx, base, tmp_path)
    entry = (await take.take(ctx, trigger="manual")).entry
    assert entry is not None
    ctx.limp_home.set()
    wake = asyncio.Event()
    uploader = asyncio.create_task(upload.run(ctx, wake=wake))
    try:
        for _ in range(2):  # the snapshot's own wake-up, and one from a later snapshot still in Red
            wake.set()
            # The uploader clears ``wake`` only at the end of a pass: cleared means it looked and decided.
            for _ in range(200):
                if not wake.is_set():
                    break
                await asyncio.sleep(0.05)
            assert not wake.is_set(), "the uploader never took its wake-up"
            assert catalog.entries(ctx.store)[0].uploaded_at is None
            assert not storage.exists() or not any(storage.rglob("*")), list(storage.rglob("*"))
        ctx.limp_home.clear()  # nothing else: no new snapshot, no wake-up
        for _ in range(int(3 * upload.LIMP_RECHECK_SECONDS / 0.05)):
            if any(e["type"] == "snapshot.uploaded" for e in events(ctx)):
                break
            await asyncio.sleep(0.05)
    finally:
        uploader.cancel()
        await asyncio.gather(uploader, return_exceptions=True)
    assert [e["type"] for e in events(ctx)] == ["snapshot.succeeded", "snapshot.uploaded"]
    assert catalog.entries(ctx.store)[0].uploaded_at is not None
    assert hashlib.sha256((storage / "site-a" / entry.name).read_bytes()).hexdigest() == entry.file_sha256
