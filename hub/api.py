"""The hub's REST API (FastAPI; OpenAPI schema at ``/openapi.json``, docs at ``/docs``).

``create_app(ctx)`` builds the app around a running :class:`hub.context.HubContext`; the dashboard
mounts its own routes on the same app (``app.state.hub`` is the context, ``require_read`` and
``require_write`` are the auth dependencies to reuse).

Auth: ``Authorization: Bearer <token>``. Every write endpoint requires one of ``api.write_tokens``
(compared in constant time; with none configured, writes are refused). Reads are anonymous unless
``api.read_tokens`` is set (write tokens can read too). Bundle downloads are public by content
address: sites fetch them without a token, and the bundle's signatures, not the URL, make it
trustworthy.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from agent import protocol
from hub import commands, uploads
from hub.context import HubContext
from hub.store import is_stale, utcnow

_bearer = HTTPBearer(auto_error=False, description="A hub API token (write tokens for write endpoints).")


def _ctx(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.hub
    return ctx


def _matches(given: str, tokens: list[SecretStr]) -> bool:
    ok = False
    for token in tokens:  # compare against every token: timing does not reveal which one matched
        ok |= hmac.compare_digest(given.encode("utf-8"), token.get_secret_value().encode("utf-8"))
    return ok


def _check(creds: HTTPAuthorizationCredentials | None, tokens: list[SecretStr], *, what: str) -> None:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(401, f"{what} requires a bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not tokens or not _matches(creds.credentials, tokens):
        raise HTTPException(403, f"token not accepted for {what}")


def require_write(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    _check(creds, _ctx(request).config.api.write_tokens, what="this write endpoint")


def require_read(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    api = _ctx(request).config.api
    if not api.read_tokens:
        return
    _check(creds, [*api.read_tokens, *api.write_tokens], what="reading")


# ---- response models ----------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SiteOut(_Out):
    site: str
    state: str | None
    state_reason: str
    install_state: str | None
    bundle_name: str | None
    bundle_version: str | None
    bundle_release: int | None
    agent_version: str | None
    interval_seconds: float | None
    first_seen: datetime
    last_seen: datetime
    status_at: datetime | None
    status_ts: datetime | None
    status_seq: int | None
    online: bool | None
    online_at: datetime | None
    stale: bool
    stale_since: datetime | None


class SiteDetail(SiteOut):
    status: dict[str, Any] | None


class SitePage(_Out):
    total: int
    items: list[SiteOut]


class FleetSummary(_Out):
    sites: int
    by_state: dict[str, int]
    stale: int
    offline: int


class SampleOut(_Out):
    id: int
    msg_id: str
    seq: int
    ts: datetime
    received_at: datetime
    state: str
    changed: bool
    summary: dict[str, Any]


class EventOut(_Out):
    id: int
    msg_id: str
    site: str
    seq: int
    ts: datetime
    received_at: datetime
    type: str
    severity: str
    summary: str
    data: dict[str, Any]


class EventPage(_Out):
    items: list[EventOut]
    #: Pass as ``before_id`` (fleet feed) or ``after_seq`` (site events) to get the next page; null at the end.
    next: int | None


class SnapshotOut(_Out):
    site: str
    taken_at: datetime
    ok: bool
    size_bytes: int | None
    revision: int | None
    detail: str
    source: str
    received_at: datetime


class ReplyOut(_Out):
    msg_id: str
    seq: int
    ts: datetime
    received_at: datetime
    status: str
    detail: str
    data: dict[str, Any]


class CommandOut(_Out):
    cmd_id: str
    site: str
    seq: int
    name: str
    args: dict[str, Any]
    issued: datetime
    expires: datetime
    state: str
    detail: str
    result: dict[str, Any] | None
    published_at: datetime | None
    updated_at: datetime


class CommandDetail(CommandOut):
    envelope: str
    replies: list[ReplyOut]


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: protocol.CommandName
    #: install-bundle: ``{"bundle": "<sha256 of an uploaded bundle>"}`` or ``{"url": ..., "sha256": ...}``.
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_seconds: float | None = Field(default=None, gt=0, le=7 * 86400)


class BundleOut(_Out):
    sha256: str
    name: str
    version: str
    release: int | None
    size_bytes: int
    uploaded_at: datetime
    info: dict[str, Any]
    download_url: str


# ---- helpers -------------------------------------------------------------------------------------


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _site_or_404(ctx: HubContext, site: str) -> dict[str, Any]:
    row = ctx.store.get_site(site)
    if row is None:
        raise HTTPException(404, f"no site {site!r} has reported to this hub")
    return _with_live_stale(ctx, row)


def _with_live_stale(ctx: HubContext, row: dict[str, Any]) -> dict[str, Any]:
    # The sweeper persists staleness every few seconds; answer with the exact value at read time.
    row["stale"] = is_stale(
        status_at=row["status_at"],
        interval=row["interval_seconds"],
        last_seen=row["last_seen"],
        factor=ctx.config.staleness_factor,
        now=utcnow(),
    )
    return row


def _bundle_out(request: Request, row: dict[str, Any]) -> BundleOut:
    ctx = _ctx(request)
    base = (ctx.config.api.public_url or str(request.base_url)).rstrip("/")
    return BundleOut(**row, download_url=f"{base}/api/v1/bundles/{row['sha256']}/download")


SiteSort = Literal["site", "-site", "last_seen", "-last_seen", "state", "-state", "status_at", "-status_at"]
SiteParam = Annotated[str, PathParam(pattern=protocol.SITE_ID_PATTERN)]


def create_app(ctx: HubContext) -> FastAPI:
    """The API app for a running hub. Sync endpoints run in FastAPI's thread pool (the store is sync)."""
    app = FastAPI(
        title="edgefleet hub",
        version="1",
        description="Fleet state, history and events of edge sites; signed commands; bundle distribution.",
    )
    app.state.hub = ctx
    read = APIRouter(prefix="/api/v1", dependencies=[Depends(require_read)], tags=["read"])
    write = APIRouter(prefix="/api/v1", dependencies=[Depends(require_write)], tags=["write"])

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {"ok": True, "mqtt_connected": ctx.link.client is not None}

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_read)])
    def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @read.get("/fleet", response_model=FleetSummary)
    def fleet() -> dict[str, Any]:
        return ctx.store.fleet_summary()

    @read.get("/sites", response_model=SitePage)
    def sites(
        state: protocol.SiteState | None = None,
        stale: bool | None = None,
        online: bool | None = None,
        prefix: str | None = Query(default=None, max_length=63),
        bundle_version: str | None = None,
        sort: SiteSort = "site",
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> dict[str, Any]:
        total, rows = ctx.store.list_sites(
            state=state.value if state else None,
            stale=stale,
            online=online,
            prefix=prefix,
            bundle_version=bundle_version,
            sort=sort,
            limit=limit,
            offset=offset,
        )
        return {"total": total, "items": rows}

    @read.get("/sites/{site}", response_model=SiteDetail)
    def site_detail(site: SiteParam) -> dict[str, Any]:
        return _site_or_404(ctx, site)

    @read.get("/sites/{site}/history", response_model=list[SampleOut])
    def history(
        site: SiteParam,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = Query(default=500, ge=1, le=10000),
    ) -> list[dict[str, Any]]:
        _site_or_404(ctx, site)
        return ctx.store.history(site, since=_aware(since), until=_aware(until), limit=limit)

    @read.get("/sites/{site}/events", response_model=EventPage)
    def site_events(
        site: SiteParam,
        after_seq: int | None = Query(default=None, description="Page cursor: the `next` of the previous page."),
        order: Literal["asc", "desc"] = "asc",
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        _site_or_404(ctx, site)
        rows = ctx.store.site_events(site, after_seq=after_seq, limit=limit, order=order)
        return {"items": rows, "next": rows[-1]["seq"] if len(rows) == limit else None}

    @read.get("/events", response_model=EventPage)
    def events(
        before_id: int | None = Query(default=None, description="Page cursor: the `next` of the previous page."),
        site: str | None = Query(default=None, pattern=protocol.SITE_ID_PATTERN),
        type: str | None = Query(default=None, max_length=100, description="Event type prefix, e.g. `snapshot.`"),
        severity: protocol.Severity | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        rows = ctx.store.events(
            before_id=before_id,
            site=site,
            type_prefix=type,
            severity=severity.value if severity else None,
            limit=limit,
        )
        return {"items": rows, "next": rows[-1]["id"] if len(rows) == limit else None}

    @read.get("/sites/{site}/snapshots", response_model=list[SnapshotOut])
    def snapshots(site: SiteParam, limit: int = Query(default=100, ge=1, le=1000)) -> list[dict[str, Any]]:
        _site_or_404(ctx, site)
        return ctx.store.snapshots(site, limit=limit)

    @read.get("/sites/{site}/commands", response_model=list[CommandOut])
    def site_commands(site: SiteParam, limit: int = Query(default=100, ge=1, le=1000)) -> list[dict[str, Any]]:
        return ctx.store.commands(site=site, limit=limit)

    @read.get("/commands", response_model=list[CommandOut])
    def all_commands(limit: int = Query(default=100, ge=1, le=1000)) -> list[dict[str, Any]]:
        return ctx.store.commands(limit=limit)

    @read.get("/commands/{cmd_id}", response_model=CommandDetail)
    def command_detail(cmd_id: str) -> dict[str, Any]:
        row = ctx.store.get_command(cmd_id)
        if row is None:
            raise HTTPException(404, f"no command {cmd_id!r}")
        return row

    @read.get("/bundles", response_model=list[BundleOut])
    def list_bundles(request: Request) -> list[BundleOut]:
        return [_bundle_out(request, r) for r in ctx.store.list_bundles()]

    @write.post("/sites/{site}/commands", response_model=CommandDetail, status_code=202)
    async def post_command(site: SiteParam, body: CommandIn, request: Request) -> dict[str, Any]:
        try:
            return await commands.issue(
                ctx,
                site=site,
                name=body.name,
                args=body.args,
                ttl_seconds=body.ttl_seconds,
                base_url=str(request.base_url),
            )
        except commands.CommandError as exc:
            status = 503 if ctx.command_key is None else 400
            raise HTTPException(status, str(exc)) from None

    @write.post(
        "/bundles",
        response_model=BundleOut,
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        responses={422: {"description": "The bundle failed verification; `detail` names why."}},
    )
    async def upload_bundle(request: Request) -> BundleOut | JSONResponse:
        """Upload a bundle file as the raw request body; it is verified before it is offered."""
        try:
            row = await uploads.receive(ctx, request.stream())
        except uploads.UploadRejected as exc:
            return JSONResponse({"detail": str(exc), "reason": exc.reason}, status_code=exc.status)
        return _bundle_out(request, row)

    @app.get("/api/v1/bundles/{sha256}/download", tags=["bundles"], response_class=FileResponse)
    def download_bundle(sha256: Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]) -> FileResponse:
        row = ctx.store.get_bundle(sha256)
        path = uploads.bundle_path(ctx, sha256)
        if row is None or not path.is_file():
            raise HTTPException(404, f"no bundle {sha256} on this hub")
        return FileResponse(
            path, media_type="application/octet-stream", filename=f"{row['name']}-{row['version']}.bundle"
        )

    app.include_router(read)
    app.include_router(write)
    _mount_snapshot_upload(app, ctx)
    from hub.dashboard import router as dashboard  # the dashboard builds on this module's auth

    dashboard.mount(app)
    return app


def _mount_snapshot_upload(app: FastAPI, ctx: HubContext) -> None:
    """Optional etcd snapshot uploads (``snapshot_upload.enabled``); each site has its own token file."""
    cfg = ctx.config.snapshot_upload
    if not cfg.enabled:
        return
    from hub import snapshot_upload

    token_dir = cfg.token_dir or ctx.config.data_dir / "snapshot-tokens"

    def site_token(site: str) -> str | None:
        try:  # site ids are validated by the router before this is called: no path tricks
            token = (token_dir / site).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return token or None

    app.include_router(
        snapshot_upload.router(storage_dir=cfg.storage_dir or ctx.config.data_dir / "snapshots", site_token=site_token)
    )
