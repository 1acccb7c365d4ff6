"""Kubeconfig files that kubectl and kubernetes-asyncio both accept."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import yaml


def write(path: Path, *, url: str, token: str | None = None, ca_file: Path | None = None,
          name: str = "edgefleet-sim") -> Path:
    """Write atomically (tmp + rename) with mode 0600: the file may hold a bearer token."""
    cluster: dict[str, object] = {"server": url}
    if ca_file is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_file.read_bytes()).decode()
    user: dict[str, object] = {"token": token} if token else {}
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def read_server(path: Path) -> tuple[str, str | None, str | None]:
    """(server URL, token, CA PEM or None) of the current context: what the admin CLI needs."""
    doc = yaml.safe_load(path.read_text())
    ctx_name = doc.get("current-context")
    ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next((u["user"] for u in doc.get("users") or [] if u["name"] == ctx.get("user")), {}) or {}
    ca = cluster.get("certificate-authority-data")
    return cluster["server"], user.get("token"), base64.b64decode(ca).decode() if ca else None
