"""Dashboard routes on the hub's app: pages, static assets, page data and a server-sent-events stream.

* ``/dashboard/`` and ``/dashboard/sites/{site}``: static HTML shells (no data in them, so they need
  no auth); the script fetches the data below with the operator's token, if any.
* ``/dashboard/api/overview``, ``/dashboard/api/sites/{site}``: page data (read auth).
* ``/dashboard/api/stream``: ``text/event-stream`` of store changes (read auth). The script reads it
  with ``fetch`` rather than ``EventSource`` because ``EventSource`` cannot send an
  ``Authorization`` header, and a token in the URL would end up in proxy logs.
* Writes (snapshot now, install bundle) use ``POST /api/v1/sites/{site}/commands``: the API's
  write auth, nothing dashboard-specific.

A change event only says *what* changed; the page re-reads the data. So a lost event costs
freshness until the next one, never correctness, and a reconnect simply re-reads everything.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from agent import protocol
from hub import api
from hub.context import HubContext
from hub.dashboard import data

STATIC_DIR = Path(__file__).with_name("static")
#: A comment line this often keeps proxies from closing an idle stream and notices gone clients.
KEEPALIVE_SECONDS = 15.0
#: Streams end after this long; the page reconnects and re-reads (bounds any state a stream holds).
MAX_STREAM_SECONDS = 3600.0
#: Pages may load only what the hub serves: no CDN, no inline script.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _ctx(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.hub
    return ctx


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers=_HEADERS)


def _sse(event: str, payload: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def change_stream(ctx: HubContext, request: Request) -> AsyncIterator[str]:
    """The SSE body: ``hello`` once subscribed (the page loads its data *after* it, so nothing falls
    between the load and the subscription), then one ``change`` per store change."""
    async with ctx.notifier.subscribe() as changes:
        yield "retry: 2000\n" + _sse("hello", {"subscribed": True})
        deadline = time.monotonic() + MAX_STREAM_SECONDS
        while time.monotonic() < deadline:
            try:
                change = await asyncio.wait_for(changes.get(), timeout=KEEPALIVE_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keepalive\n\n"
                continue
            yield _sse("change", {"kind": change.kind, "site": change.site, "ref": change.ref, **change.detail})


def mount(app: FastAPI) -> None:
    """Add the dashboard to the hub's app (``app.state.hub`` must be the :class:`HubContext`)."""
    pages = APIRouter(include_in_schema=False)
    data_api = APIRouter(
        prefix="/dashboard/api", include_in_schema=False, dependencies=[Depends(api.require_read)]
    )

    @pages.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=307)

    @pages.get("/dashboard")
    def dashboard_noslash() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=307)

    @pages.get("/dashboard/")
    def overview_page() -> FileResponse:
        return _page("overview.html")

    @pages.get("/dashboard/sites/{site}")
    def site_page(site: Annotated[str, PathParam(pattern=protocol.SITE_ID_PATTERN)]) -> FileResponse:
        return _page("site.html")

    @pages.get("/dashboard/api/config")
    def config(request: Request) -> dict[str, Any]:
        """What the page needs to know before it has a token (no secrets)."""
        ctx = _ctx(request)
        return {
            "read_requires_token": bool(ctx.config.api.read_tokens),
            "writes_enabled": bool(ctx.config.api.write_tokens),
            "commands_enabled": ctx.command_key is not None,
            "staleness_factor": ctx.config.staleness_factor,
        }

    @data_api.get("/overview")
    def overview(request: Request) -> dict[str, Any]:
        return data.overview(_ctx(request))

    @data_api.get("/sites/{site}")
    def site(request: Request, site: Annotated[str, PathParam(pattern=protocol.SITE_ID_PATTERN)]) -> dict[str, Any]:
        doc = data.site_page(_ctx(request), site)
        if doc is None:
            raise HTTPException(404, f"no site {site!r} has reported to this hub")
        return doc

    @data_api.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(
            change_stream(_ctx(request), request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    app.include_router(pages)
    app.include_router(data_api)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
