"""Push a staged bundle's images to a site-local OCI registry (distribution API v2).

Public surface: ``Target``, ``push(target, images_dir) -> PushReport`` (resumable, bounded
memory, retried), ``verify(target, images) -> list[str]`` (problems; empty when every manifest
is there by digest and every tag points at it), ``repo_for(ref, layout)``,
``delete_manifest(target, repo, digest)``, ``has_manifest(target, repo, ref)``.

Why it is built this way (Zarf's pain points):

- **Resumable**: every blob is HEADed first and skipped when the registry has it, so a push
  interrupted by a registry restart, a crash or a reboot continues where it stopped; the unit of
  retry is one blob, never the whole image.
- **Bounded memory**: a blob is streamed from its file to one monolithic ``PUT`` (no chunk kept
  in memory beyond aiohttp's 64 KiB buffers), so a 5 GiB layer costs the same RAM as a 5 KiB one.
  The registry checks the digest of what it received (``?digest=``) and refuses a mismatch.
- **Retried with backoff**: connection errors, timeouts and 5xx answers are retried with
  exponential backoff and jitter, capped (``images.backoff_max_seconds``), ``images.retries``
  attempts per request; a 4xx answer is a real refusal and fails at once with the registry's text.
- **Nothing trusted**: blobs come only from a verified staged bundle; after the push every
  manifest is fetched back by digest and its ``Docker-Content-Digest`` compared.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog

from bundles import images as bundle_images
from bundles import oci

log = structlog.get_logger("edgefleet.images.registry")

ACCEPT = ", ".join([*oci.INDEX_TYPES, *oci.MANIFEST_TYPES])
T = TypeVar("T")


class PushError(Exception):
    """The registry refused something, or stayed unreachable through every retry."""


class _Retry(Exception):
    pass


@dataclass(frozen=True)
class Target:
    url: str
    repo_layout: str = "prefixed"
    tls_verify: bool = True
    ca_file: Path | None = None
    concurrency: int = 3
    retries: int = 10
    backoff_initial: float = 0.2
    backoff_max: float = 20.0
    timeout: float = 600.0

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https"):
            return False
        if not self.tls_verify:
            return False
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


@dataclass
class PushReport:
    images: int = 0
    blobs_uploaded: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    bytes_uploaded: int = 0
    manifests: int = 0
    retries: int = 0
    pushed: list[dict[str, Any]] = field(default_factory=list)  # per image: repo, tag, digest, manifests, blobs


def repo_for(ref: bundle_images.ImageRef, layout: str) -> str:
    """The site registry's repository for an image: see docs/images.md (k3s ``rewrite``)."""
    if layout == "flat":
        return ref.repository
    return f"{ref.registry.replace(':', '-')}/{ref.repository}"


class _Client:
    def __init__(self, target: Target, session: aiohttp.ClientSession, report: PushReport) -> None:
        self.t = target
        self.s = session
        self.report = report
        self.base = target.url.rstrip("/")
        self.where: dict[str, str] = {}  # digest -> a repository of this registry that has it (cross-repo mount)

    async def retrying(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        delay = self.t.backoff_initial
        for attempt in range(1, self.t.retries + 1):
            try:
                return await fn()
            except (TimeoutError, aiohttp.ClientError, ConnectionError, _Retry) as exc:
                if attempt == self.t.retries:
                    raise PushError(f"{what}: registry {self.base} unreachable after {attempt} attempts: "
                                    f"{type(exc).__name__}: {exc}") from None
                self.report.retries += 1
                log.info("registry request failed, retrying", what=what, attempt=attempt, error=str(exc)[:200])
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.t.backoff_max)
        raise AssertionError("unreachable")

    @staticmethod
    async def _check(resp: aiohttp.ClientResponse, what: str, ok: tuple[int, ...]) -> None:
        if resp.status in ok:
            return
        text = (await resp.text(errors="replace"))[:300]
        if resp.status >= 500 or resp.status == 429:
            raise _Retry(f"HTTP {resp.status}: {text}")
        raise PushError(f"{what}: registry answered HTTP {resp.status}: {' '.join(text.split())}")

    def _abs(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    async def has_blob(self, repo: str, digest: str) -> bool:
        async def go() -> bool:
            async with self.s.head(f"{self.base}/v2/{repo}/blobs/{digest}") as r:
                if r.status == 404:
                    return False
                await self._check(r, f"HEAD blob {digest}", (200,))
                return True

        return await self.retrying(f"blob {digest} in {repo}", go)

    async def upload_blob(self, repo: str, digest: str, size: int, path: Path) -> str:
        """"uploaded", "mounted" (from another repository of the registry) or "skipped" (already there)."""
        if await self.has_blob(repo, digest):
            self.where.setdefault(digest, repo)
            return "skipped"
        mounted = False

        async def go() -> None:
            nonlocal mounted
            url = f"{self.base}/v2/{repo}/blobs/uploads/"
            other = self.where.get(digest)
            if other and other != repo:
                url += f"?mount={digest}&from={other}"
            async with self.s.post(url) as r:
                if r.status == 201:  # mounted: no bytes move
                    mounted = True
                    return
                await self._check(r, f"start upload of {digest} to {repo}", (202,))
                location = self._abs(r.headers["Location"])
            sep = "&" if "?" in location else "?"
            with open(path, "rb") as fh:  # noqa: ASYNC230 - aiohttp reads it in its executor, 64 KiB at a time
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
                async with self.s.put(f"{location}{sep}digest={digest}", data=fh, headers=headers) as r:
                    await self._check(r, f"upload of {digest} to {repo}", (201,))

        async def attempt() -> None:
            # A retried attempt HEADs again: the previous one may have completed before the error.
            if await self.has_blob(repo, digest):
                return
            await go()

        await self.retrying(f"upload of blob {digest} to {repo}", attempt)
        self.where.setdefault(digest, repo)
        if mounted:
            return "mounted"
        self.report.bytes_uploaded += size
        return "uploaded"

    async def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> None:
        async def go() -> None:
            async with self.s.put(f"{self.base}/v2/{repo}/manifests/{reference}", data=data,
                                  headers={"Content-Type": media_type}) as r:
                await self._check(r, f"manifest {reference} of {repo}", (201,))

        await self.retrying(f"manifest {reference} of {repo}", go)
        self.report.manifests += 1

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        async def go() -> str | None:
            async with self.s.head(f"{self.base}/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT}) as r:
                if r.status == 404:
                    return None
                await self._check(r, f"HEAD manifest {reference} of {repo}", (200,))
                return r.headers.get("Docker-Content-Digest")

        return await self.retrying(f"manifest {reference} of {repo}", go)

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        async def go() -> bool:
            async with self.s.delete(f"{self.base}/v2/{repo}/manifests/{digest}") as r:
                if r.status == 404:
                    return False
                await self._check(r, f"DELETE manifest {digest} of {repo}", (202, 200))
                return True

        return await self.retrying(f"delete manifest {digest} of {repo}", go)


def session(target: Target) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=target.timeout)
    conn = aiohttp.TCPConnector(limit=target.concurrency + 2, ssl=target.ssl_context())
    return aiohttp.ClientSession(timeout=timeout, connector=conn)


def _structure(layout: Path, desc: oci.Descriptor) -> list[tuple[oci.Descriptor, list[oci.Descriptor]]]:
    """(manifest, its config+layers) for every single-arch manifest under ``desc``, children first."""
    doc = oci.read_json(layout, desc)
    if desc.media_type in oci.INDEX_TYPES:
        out = []
        for child in doc.get("manifests") or []:
            out.extend(_structure(layout, oci.Descriptor.from_json(child)))
        return out
    config = oci.Descriptor.from_json(doc.get("config"), default_type=oci.MT_CONFIG)
    layers = [oci.Descriptor.from_json(x) for x in doc.get("layers") or []]
    return [(desc, [config, *layers])]


async def push(target: Target, images_dir: Path, *, report: PushReport | None = None) -> PushReport:
    """Push every image of a staged bundle's OCI layout; resumes from whatever the registry has."""
    meta = bundle_images.load_meta(images_dir)
    report = report or PushReport()
    sem = asyncio.Semaphore(target.concurrency)
    async with session(target) as s:
        c = _Client(target, s, report)
        for image in meta["images"]:
            ref = bundle_images.parse_ref(image["ref"])
            repo = repo_for(ref, target.repo_layout)
            top = oci.Descriptor(media_type=image["mediaType"], digest=image["digest"], size=image["size"])
            parts = _structure(images_dir, top)
            blobs = {b.digest: b for _m, bl in parts for b in bl}

            async def one(b: oci.Descriptor, repo: str = repo, name: str = image["ref"]) -> None:
                async with sem:
                    path = oci.blob_path(images_dir, b.digest)
                    if not path.is_file():
                        raise PushError(f"image {name}: blob {b.digest} is not in the staged bundle")
                    how = await c.upload_blob(repo, b.digest, b.size, path)
                    if how == "uploaded":
                        report.blobs_uploaded += 1
                    elif how == "mounted":
                        report.blobs_mounted += 1
                    else:
                        report.blobs_skipped += 1

            await asyncio.gather(*(one(b) for b in blobs.values()))
            manifests = []
            for m, _bl in parts:
                if m.digest != top.digest:
                    await c.put_manifest(repo, m.digest, oci.read_blob(images_dir, m), m.media_type)
                    manifests.append(m.digest)
            await c.put_manifest(repo, ref.tag or top.digest, oci.read_blob(images_dir, top), top.media_type)
            manifests.append(top.digest)
            report.images += 1
            report.pushed.append({"ref": image["ref"], "repo": repo, "tag": ref.tag, "digest": top.digest,
                                  "manifests": manifests, "blobs": sorted(blobs)})
            log.info("image pushed", ref=image["ref"], repo=repo, digest=top.digest)
    return report


async def verify(target: Target, pushed: list[dict[str, Any]]) -> list[str]:
    """Every manifest by digest, every tag → its digest; a list of problems naming the image."""
    problems: list[str] = []
    async with session(target) as s:
        c = _Client(target, s, PushReport())
        for image in pushed:
            for digest in image["manifests"]:
                got = await c.manifest_digest(image["repo"], digest)
                if got != digest:
                    problems.append(f"image {image['ref']}: manifest {digest} missing from {image['repo']}")
            if image.get("tag"):
                got = await c.manifest_digest(image["repo"], image["tag"])
                if got != image["digest"]:
                    problems.append(f"image {image['ref']}: tag {image['tag']} points at {got}, not {image['digest']}")
    return problems


async def has_manifest(target: Target, repo: str, reference: str) -> bool:
    async with session(target) as s:
        return await _Client(target, s, PushReport()).manifest_digest(repo, reference) is not None


async def delete_manifests(target: Target, manifests: list[tuple[str, str]]) -> int:
    deleted = 0
    async with session(target) as s:
        c = _Client(target, s, PushReport())
        for repo, digest in manifests:
            if await c.delete_manifest(repo, digest):
                deleted += 1
    return deleted
