"""The demo's embedded broker (amqtt, MQTT 3.1.1, demo only) carries the real hub <-> agent traffic:
statuses reach the hub and a signed command gets the agent's reply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from dash_harness import WRITE_TOKEN, agent_context, agent_link, free_port, hub_config_for, hub_running, wait_until

from hub import demo

pytest.importorskip("amqtt")
ROOT = Path(__file__).resolve().parents[2]


async def test_hub_and_agent_over_the_embedded_broker(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hub.demo", "--embedded-broker", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await demo.wait_port(port, child=None, timeout=30, what="amqtt")
        broker = demo.Broker(kind="amqtt", port=port, argv=[])
        assert broker.protocol == "3.1.1"

        cfg = hub_config_for(tmp_path, port, mqtt={"protocol": "3.1.1", "client_id": "hub-amqtt"})
        async with hub_running(cfg) as hub:
            ctx = agent_context(tmp_path, port, "amqtt-site", hub_pub=tmp_path / "hubkeys" / "hub-command.pub",
                                protocol="3.1.1")
            async with agent_link(ctx):
                await wait_until(lambda: hub.ctx.store.get_site("amqtt-site") is not None, what="status over amqtt")
                async with httpx.AsyncClient(base_url=hub.api_url) as http:
                    r = await http.post("/api/v1/sites/amqtt-site/commands", json={"name": "report-now"},
                                        headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
                    assert r.status_code == 202, r.text
                    cmd = r.json()["cmd_id"]
                await wait_until(lambda: hub.ctx.store.get_command(cmd)["state"] == "done",  # type: ignore[index]
                                 what="reply over amqtt")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert b"DEMO ONLY" in out
