"""The agent's local HTTP endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on loopback.

* ``/healthz`` — liveness: the process answers and its event loop is not wedged (the heartbeat
  ran recently). 503 otherwise. Use it for "restart me" decisions.
* ``/readyz`` — readiness: the state store answers, every supervised task is running (not
  crashed and waiting for its restart), the API server answered recently, and the daemon is not
  shutting down. 503 with the failing checks otherwise. Use it for "is this site's agent doing
  its job".
* ``/metrics`` — Prometheus text format (prometheus-client's default registry; see agent/metrics.py).

Both health endpoints answer JSON with every check, so ``curl`` at the node explains itself.
It is unauthenticated and must stay on 127.0.0.1 (the default).
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from agent import kube, metrics

if TYPE_CHECKING:
    from agent.daemon import Runtime

log = structlog.get_logger("edgefleet.http")

#: /healthz fails when the heartbeat (1 s tick) has not run for this long.
HEARTBEAT_STALE_SECONDS = 10.0


@dataclass
class Server:
    runner: web.AppRunner
    address: tuple[str, int]

    async def close(self) -> None:
        await self.runner.cleanup()


def health(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    since_beat = time.monotonic() - runtime.last_beat
    ok = since_beat <= HEARTBEAT_STALE_SECONDS
    return ok, {
        "status": "ok" if ok else "stalled",
        "heartbeat_age_seconds": round(since_beat, 3),
        "loop_lag_seconds": round(runtime.loop_lag, 4),
        "uptime_seconds": round(time.time() - runtime.started, 1),
    }


def readiness(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    try:
        runtime.ctx.store.db.execute("SELECT 1").fetchone()
        checks["store"] = {"ok": True}
    except sqlite3.Error as exc:
        checks["store"] = {"ok": False, "error": str(exc)}
    down = sorted(name for name, t in runtime.tasks.items() if not t.up and not t.finished)
    checks["tasks"] = {"ok": not down, "down": down} if down else {"ok": True}
    max_age = runtime.ctx.config.daemon.kube_contact_max_age_seconds
    if kube.last_contact is None:
        checks["kube"] = {"ok": False, "error": "the API server has not answered yet"}
    else:
        age = time.monotonic() - kube.last_contact
        checks["kube"] = {"ok": age <= max_age, "last_contact_age_seconds": round(age, 1)}
    checks["running"] = {"ok": not runtime.stopping} if not runtime.stopping else {"ok": False, "error": "stopping"}
    ok = all(c["ok"] for c in checks.values())
    return ok, {"status": "ready" if ok else "not ready", "checks": checks}


def _app(runtime: Runtime) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, body = health(runtime)
        return web.json_response(body, status=200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok, body = readiness(runtime)
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_view(_: web.Request) -> web.Response:
        try:
            metrics.refresh(runtime.ctx.store)
        except sqlite3.Error as exc:  # serve what we have; the store check in /readyz tells the story
            log.warning("metrics refresh failed", error=str(exc))
        last = kube.last_contact
        metrics.KUBE_LAST_CONTACT_AGE.set(time.monotonic() - last if last is not None else -1)
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start(runtime: Runtime) -> Server:
    """Bind and serve; port 0 picks a free port (the bound address is in the result)."""
    settings = runtime.ctx.config.http
    runner = web.AppRunner(_app(runtime), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    host, port = addresses[0][:2] if addresses else (settings.host, settings.port)
    log.info("http listening", host=host, port=port)
    if not _is_loopback(str(host)):
        log.warning("http endpoint reachable beyond loopback; it is unauthenticated", host=host, port=port)
    return Server(runner=runner, address=(str(host), int(port)))
