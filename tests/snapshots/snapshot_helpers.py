"""Helpers shared by the snapshot tests (fixtures are in conftest.py; this module has a unique name)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agent import outbox
from agent.context import AgentContext
from agent.snapshots import devetcd

MakeCtx = Callable[..., AgentContext]


def events(ctx: AgentContext, prefix: str = "snapshot.") -> list[dict[str, Any]]:
    rows = outbox.pending(ctx.store, limit=10_000)
    docs = [json.loads(r.payload) for r in rows if r.channel.value == "events"]
    return [d for d in docs if d["type"].startswith(prefix)]


def snapshot_files(ctx: AgentContext) -> list[str]:
    return sorted(p.name for p in ctx.config.snapshot_dir.iterdir() if not p.name.startswith("."))


async def put_keys(node: devetcd.Node, count: int, *, prefix: str = "/registry/test/") -> None:
    for i in range(count):
        await node.ctl("put", f"{prefix}{i:04d}", f"value-{i}")


def put_random(node: devetcd.Node, megabytes: int) -> None:
    """Incompressible bulk data through etcd's JSON gateway (one 1 MB value per key)."""
    import base64
    import os
    import urllib.request

    for i in range(megabytes):
        body = json.dumps(
            {
                "key": base64.b64encode(f"/bulk/{i}".encode()).decode(),
                "value": base64.b64encode(os.urandom(1 << 20)).decode(),
            }
        ).encode()
        urllib.request.urlopen(urllib.request.Request(f"{node.url}/v3/kv/put", data=body), timeout=30).read()


async def agent_cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(tmp_path: Path, endpoint: str, **snapshots: object) -> Path:
    path = tmp_path / "agent.yaml"
    doc = {
        "site_id": "store-17",
        "state_dir": str(tmp_path / "state"),
        "snapshots": {"preset": "custom", "endpoint": endpoint, "min_free_bytes": 0, **snapshots},
    }
    path.write_text(yaml.safe_dump(doc))
    return path
