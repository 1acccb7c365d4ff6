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

Why not aiohttp.web: three GET endpoints for curl, systemd and a Prometheus scrape need one
request per connection and nothing of a web framework, while importing aiohttp.web (its
request/response machinery, the file responder's MIME table) costs the daemon ~2 MiB of RSS for
life, 3 % of its 64 MiB budget. So this is plain ``asyncio.start_server``: one request per
connection (``Connection: close``), the request head bounded in size and time, GET and HEAD only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from agent import kube, metrics

if TYPE_CHECKING:
    from agent.daemon import Runtime

log = structlog.get_logger("edgefleet.http")

#: /healthz fails when the heartbeat (1 s tick) has not run for this long.
HEARTBEAT_STALE_SECONDS = 10.0
#: A request head (request line and headers) larger than this, or slower than the timeout, is refused.
MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT_SECONDS = 5.0

_TEXT = "text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Server:
    server: asyncio.Server
    address: tuple[str, int]

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


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


#: What a route answers: (status, content type, body).
Answer = tuple[int, str, bytes]


def _json(ok: bool, body: dict[str, Any]) -> Answer:
    return 200 if ok else 503, "application/json; charset=utf-8", json.dumps(body).encode()


def _routes(runtime: Runtime) -> dict[str, Callable[[], Answer]]:
    def metrics_view() -> Answer:
        try:
            metrics.refresh(runtime.ctx.store)
        except sqlite3.Error as exc:  # serve what we have; the store check in /readyz tells the story
            log.warning("metrics refresh failed", error=str(exc))
        last = kube.last_contact
        metrics.KUBE_LAST_CONTACT_AGE.set(time.monotonic() - last if last is not None else -1)
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)

    return {
        "/healthz": lambda: _json(*health(runtime)),
        "/readyz": lambda: _json(*readiness(runtime)),
        "/metrics": metrics_view,
    }


def answer(head: bytes, routes: dict[str, Callable[[], Answer]]) -> tuple[Answer, bool]:
    """The answer to one request head, and whether its body goes out (not for HEAD)."""
    request_line = head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return (400, _TEXT, b"malformed request line\n"), True
    method, target = parts[0], parts[1].split(b"?", 1)[0].decode("latin-1")
    route = routes.get(target)
    if route is None:
        return (404, _TEXT, f"no such endpoint; try {', '.join(routes)}\n".encode()), True
    if method not in (b"GET", b"HEAD"):
        return (405, _TEXT, b"only GET and HEAD\n"), True
    try:
        return route(), method == b"GET"
    except Exception as exc:  # a broken check must not take the endpoint down: answer 500 and log it
        log.exception("http endpoint failed", path=target)
        return (500, _TEXT, f"internal error: {type(exc).__name__}\n".encode()), True


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 routes: dict[str, Callable[[], Answer]]) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_SECONDS):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                (status, content_type, body), with_body = (431, _TEXT, b"request head too large\n"), True
            except (asyncio.IncompleteReadError, TimeoutError):
                return  # the client went away or never finished its request: nothing to answer
            else:
                (status, content_type, body), with_body = answer(head, routes)
            extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode("latin-1")
                + (body if with_body else b"")
            )
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start(runtime: Runtime) -> Server:
    """Bind and serve; port 0 picks a free port (the bound address is in the result)."""
    settings = runtime.ctx.config.http
    routes = _routes(runtime)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve(reader, writer, routes=routes)

    server = await asyncio.start_server(serve, settings.host, settings.port, reuse_address=True,
                                        limit=MAX_HEAD_BYTES)
    sockets = server.sockets
    host, port = sockets[0].getsockname()[:2] if sockets else (settings.host, settings.port)
    log.info("http listening", host=host, port=port)
    if not _is_loopback(str(host)):
        log.warning("http endpoint reachable beyond loopback; it is unauthenticated", host=host, port=port)
    return Server(server=server, address=(str(host), int(port)))
