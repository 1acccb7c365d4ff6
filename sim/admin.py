"""Synchronous client of the sim's admin endpoint (``/sim/...``), for the CLI and sync test code."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sim import kubeconfig


class AdminError(RuntimeError):
    """The admin request failed (sim unreachable, unknown node, bad token)."""


def request(kubeconfig_path: Path, method: str, path: str, *, timeout: float = 10.0) -> dict[str, Any]:
    url, token, ca = kubeconfig.read_server(kubeconfig_path)
    if not url.startswith(("http://", "https://")):
        raise AdminError(f"kubeconfig server is not an http(s) URL: {url!r}")
    req = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None)  # noqa: S310
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cadata=ca) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:  # noqa: S310 - URL from kubeconfig
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", str(exc))
        except ValueError:
            message = str(exc)
        raise AdminError(f"{method} {path}: {exc.code} {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"cannot reach the sim at {url}: {exc}") from exc


def node(kubeconfig_path: Path, action: str, name: str) -> dict[str, Any]:
    return request(kubeconfig_path, "POST", f"/sim/nodes/{name}/{action}")
