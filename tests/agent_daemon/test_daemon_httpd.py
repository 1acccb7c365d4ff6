"""The local HTTP endpoint's edges, over a real socket: what curl, systemd or a scraper may send."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from daemon_helpers import write_config

from agent import config as agent_config
from agent import daemon, httpd
from agent.context import AgentContext
from agent.state import StateStore


async def _exchange(address: tuple[str, int], request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    return answer


def _split(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in headers)}, body


async def test_endpoint_answers_each_request_kind(tmp_path: Path) -> None:
    config = agent_config.load(write_config(tmp_path))
    store = StateStore.open(config.state_dir)
    server = await httpd.start(daemon.Runtime(ctx=AgentContext(config=config, store=store)))
    try:
        address = server.address
        status, headers, body = _split(await _exchange(address, b"GET /healthz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == "HTTP/1.1 200 OK" and json.loads(body)["status"] == "ok"
        assert headers["content-length"] == str(len(body)) and headers["connection"] == "close"

        status, headers, body = _split(await _exchange(address, b"HEAD /metrics HTTP/1.0\r\n\r\n"))
        assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["content-length"]) > 100

        status, _, body = _split(await _exchange(address, b"GET /readyz HTTP/1.1\r\n\r\n"))
        assert status == "HTTP/1.1 503 Service Unavailable" and json.loads(body)["checks"]["kube"]["ok"] is False

        status, _, body = _split(await _exchange(address, b"GET /nope HTTP/1.1\r\n\r\n"))
        assert status == "HTTP/1.1 404 Not Found" and b"/healthz" in body
        status, headers, _ = _split(await _exchange(address, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))
        assert status == "HTTP/1.1 405 Method Not Allowed" and headers["allow"] == "GET, HEAD"
        status, _, _ = _split(await _exchange(address, b"hello\r\n\r\n"))
        assert status == "HTTP/1.1 400 Bad Request"
        flood = b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (2 * httpd.MAX_HEAD_BYTES) + b"\r\n\r\n"
        status, _, _ = _split(await _exchange(address, flood))
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        # A client that hangs up half-way gets nothing and the server goes on answering the next.
        _, writer = await asyncio.open_connection(*address)
        writer.write(b"GET /heal")
        writer.close()
        status, _, _ = _split(await _exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert status == "HTTP/1.1 200 OK"
    finally:
        await server.close()
        store.close()


def test_the_daemon_does_not_load_a_web_framework() -> None:
    """aiohttp.web (with its MIME table) was ~2 MiB of the daemon's RSS for three GET endpoints."""
    probe = "import sys\nimport agent.daemon\nprint('aiohttp.web' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_a_failing_endpoint_answers_500_and_the_others_still_work() -> None:
    def broken() -> httpd.Answer:
        raise RuntimeError("store gone")

    routes = {"/healthz": lambda: (200, "text/plain", b"ok"), "/readyz": broken}
    assert httpd.answer(b"GET /readyz HTTP/1.1\r\n\r\n", routes) == (
        (500, "text/plain; charset=utf-8", b"internal error: RuntimeError\n"), True)
    assert httpd.answer(b"HEAD /healthz HTTP/1.1\r\n\r\n", routes) == ((200, "text/plain", b"ok"), False)
